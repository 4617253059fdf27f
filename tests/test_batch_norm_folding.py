"""The model's own eval-mode batch-norm folding: same outputs, cache invalidation, training untouched, parity."""

import copy

import pytest
import torch
from conftest import TINY_RESNET_VD, tiny_config
from test_modeling_fastinst import converted_model, load_eval_fixture, relative_error

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.modeling_fastinst import FastInstFoldingConv2d


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
