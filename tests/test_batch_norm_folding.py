"""The model's own eval-mode inference paths: batch-norm folding (same outputs, cache invalidation, training untouched,
parity) and oneDNN's fused convolution / linear ops."""

import copy

import pytest
import torch
from conftest import TINY_RESNET_VD, tiny_config
from test_modeling_fastinst import converted_model, load_eval_fixture, relative_error

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.modeling_fastinst import FastInstFoldedReLU, FastInstFoldingConv2d, FastInstLinear


def tiny_model(freeze: bool = True, backbone_config=None) -> FastInstForInstanceSegmentation:
    overrides = {"freeze_backbone_batch_norm": freeze}
    if backbone_config is not None:
        overrides["backbone_config"] = backbone_config
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config(**overrides)).eval()
    randomise_norms(model)
    return model


def randomise_norms(model, seed: int = 0):
    """Non-trivial statistics, so that a stale or wrong fold cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in folding_convs(model):
            norm = conv.folded_norm
            for tensor, low, high in ((norm.running_mean, -0.5, 0.5), (norm.running_var, 0.5, 2.0)):
                tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
            norm.weight.copy_(torch.empty(norm.weight.shape).uniform_(0.5, 1.5, generator=generator))


def folding_convs(model):
    return [module for module in model.modules() if isinstance(module, FastInstFoldingConv2d)]


def outputs(model, pixel_values, fold: bool = True):
    model.set_batch_norm_folding(fold)
    with torch.no_grad():
        result = model(pixel_values).masks_queries_logits
    model.set_batch_norm_folding(True)
    return result


PIXELS = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen-bn", "eval-bn"])
def test_eval_mode_folds_every_conv_norm_pair_with_the_same_outputs(freeze):
    model = tiny_model(freeze)
    keys = set(model.state_dict())
    convs = folding_convs(model)
    assert len(convs) == 1 + 4 * 2 + 3  # the stem, two per basic block (4 stages), the 3 downsampling shortcuts
    torch.testing.assert_close(outputs(model, PIXELS), outputs(model, PIXELS, fold=False), rtol=1e-5, atol=1e-5)
    assert all(conv._fold_cache is not None for conv in convs)
    assert set(model.state_dict()) == keys  # the norms are no submodules of the convolutions


def test_resnet_vd_backbone_folds_its_plain_convolutions():
    model = tiny_model(backbone_config=TINY_RESNET_VD)
    convs = folding_convs(model)
    # 2 stem convs (the third is followed by a norm outside its Sequential), conv1/conv3 and the shortcut of each
    # block, conv2 of the first (non-deformable) block
    assert len(convs) == 2 + 4 * 3 + 1
    torch.testing.assert_close(outputs(model, PIXELS), outputs(model, PIXELS, fold=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("backbone_config", "expected_relus"),
    # resnet: the stem, then per basic block the first ReLU and the one after the shortcut sum; resnet-vd: two
    # stem ReLUs, per block act1 and act3 (after the sum), act2 of the first (non-deformable) block
    [(None, 1 + 4 * 2), (TINY_RESNET_VD, 2 + 4 * 2 + 1)],
    ids=["resnet", "resnet-vd"],
)
def test_relus_after_folded_norms_run_inside_the_convolution(backbone_config, expected_relus, monkeypatch):
    model = tiny_model(backbone_config=backbone_config)
    relus = [module for module in model.modules() if isinstance(module, FastInstFoldedReLU)]
    assert len(relus) == expected_relus
    probe = torch.zeros(1)
    with torch.no_grad():
        assert all(relu.folding_conv.fuses_relu(probe) for relu in relus)
        fused = outputs(model, PIXELS)
        assert not any(relu.folding_conv.fuses_relu(probe.double()) for relu in relus)  # float32 / bfloat16 only
        with torch.autocast("cpu", dtype=torch.bfloat16):  # it casts the inputs of conv2d only: no fusing
            assert not any(relu.folding_conv.fuses_relu(probe) for relu in relus)
            assert model(PIXELS).masks_queries_logits.isfinite().all()
    monkeypatch.setattr(FastInstFoldingConv2d, "runs_onednn", lambda self, hidden_state: False)  # F.conv2d, ReLU
    torch.testing.assert_close(fused, outputs(model, PIXELS))  # the same convolutions, ReLU and sums: float32 ulps
    model.train()
    monkeypatch.undo()
    assert not any(relu.folding_conv.fuses_relu(probe) for relu in relus)  # training: separate ReLUs


def test_fold_is_cached_and_recomputed_after_an_in_place_edit():
    model = tiny_model()
    before = outputs(model, PIXELS)
    conv = folding_convs(model)[0]
    cache = conv._fold_cache
    outputs(model, PIXELS)
    assert conv._fold_cache is cache  # reused
    with torch.no_grad():
        conv.folded_norm.weight.mul_(3.0)  # in place: same tensor, new version
    after = outputs(model, PIXELS)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, outputs(model, PIXELS, fold=False), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        conv.weight.add_(0.5)  # a convolution weight, in place
    torch.testing.assert_close(outputs(model, PIXELS), outputs(model, PIXELS, fold=False), rtol=1e-5, atol=1e-5)


def test_fold_follows_load_state_dict_and_dtype_changes():
    model, other = tiny_model(), tiny_model()
    randomise_norms(other, seed=5)
    outputs(model, PIXELS)  # fills the caches
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(outputs(model, PIXELS), outputs(other, PIXELS), rtol=1e-5, atol=1e-5)
    model.to(torch.float64)
    folded = outputs(model, PIXELS.double())
    assert folded.dtype == torch.float64
    torch.testing.assert_close(folded, outputs(model, PIXELS.double(), fold=False), rtol=1e-10, atol=1e-10)


def test_training_and_gradients_run_unfolded():
    model = tiny_model(freeze=False)
    outputs(model, PIXELS)
    model.train()
    assert all(conv._fold_cache is None and not conv.folds() for conv in folding_convs(model))
    model.eval()
    with torch.enable_grad():  # eval mode, but the weights want gradients: the norms must stay in the graph
        assert not any(conv.folds() for conv in folding_convs(model))
        model(PIXELS).masks_queries_logits.sum().backward()
    assert all(conv.folded_norm.weight.grad is not None for conv in folding_convs(model))


def test_a_deep_copy_folds_its_own_weights():
    model = tiny_model()
    outputs(model, PIXELS)
    clone = copy.deepcopy(model)
    assert all(conv.folded_norm.folding_conv is conv for conv in folding_convs(clone))
    with torch.no_grad():
        folding_convs(clone)[0].weight.mul_(2.0)
    assert not torch.allclose(outputs(clone, PIXELS), outputs(model, PIXELS), atol=1e-3)


def test_folded_official_variant_is_as_accurate_as_the_unfolded_one(variant):
    """The parity tests run op for op (the official float32 rounding); the folded default rounds differently but
    no worse: against a float64 run of the same weights its error stays within 1.25x the unfolded one's, and
    against the official features within 2e-4 (the fixture's random weights amplify rounding ~20x per stage)."""
    from conftest import fixture_pixel_values

    model, reference = converted_model(variant), load_eval_fixture(variant)
    pixel_values = fixture_pixel_values(variant)
    exact64 = copy.deepcopy(model).double().set_batch_norm_folding(False)
    with torch.no_grad():
        truth = exact64.model(pixel_values.double(), output_hidden_states=True).encoder_hidden_states
        model.set_batch_norm_folding(True)
        folded = model.model(pixel_values, output_hidden_states=True).encoder_hidden_states
        model.set_batch_norm_folding(False)
        unfolded = model.model(pixel_values, output_hidden_states=True).encoder_hidden_states
    for index, name in enumerate(("res3", "res4", "res5")):
        folded_error = relative_error(folded[index].double(), truth[index])
        assert folded_error <= 1.25 * relative_error(unfolded[index].double(), truth[index]) + 1e-7, name
        assert relative_error(folded[index], reference[f"backbone.{name}"]) <= 2e-4, name


@pytest.mark.parametrize("relu", [False, True])
def test_linear_layers_use_onednn_at_inference_only(relu, monkeypatch):
    layer = FastInstLinear(16, 24)
    inputs = torch.randn(2, 50, 16)
    expected = torch.nn.functional.linear(inputs, layer.weight, layer.bias)
    expected = expected.relu() if relu else expected
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(args[3]) or onednn(*args))
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs, relu=relu), expected)
        assert layer.double()(inputs.double(), relu=relu).dtype == torch.float64  # float64: F.linear
        layer.float()
    assert calls == ["relu" if relu else "none"]
    trained = layer(inputs, relu=relu)  # gradients wanted: F.linear, in the graph
    assert calls == ["relu" if relu else "none"] and trained.requires_grad
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
