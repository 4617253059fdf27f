"""FastInst as transformers expects a model to behave: our own equivalents of the common-test checks that apply to it
(batch-first outputs through the pipeline, weight initialisation incl. `from_pretrained` with missing keys, composite
config, attentions, gradient checkpointing, Trainer prediction tuple, image-processor round trip and kwargs)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import two_layer_config
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForUniversalSegmentation,
    pipeline,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastinst_hf import (
    FastInstConfig,
    FastInstForInstanceSegmentation,
    FastInstImageProcessor,
    FastInstImageProcessorPil,
    FastInstModel,
    FastInstResNetVdConfig,
)
from fastinst_hf.image_processing_pil_fastinst import FastInstImageProcessorKwargs
from fastinst_hf.modeling_fastinst import (
    FastInstAttention,
    FastInstConvNormLayer,
    FastInstFeedForwardLayer,
    FastInstFrozenBatchNorm2d,
)
from fastinst_hf.releases import variant_config


def tiny_config(**kwargs) -> FastInstConfig:
    return two_layer_config(**{"num_queries": 10, "test_shortest_edge": 64, "test_longest_edge": 96, **kwargs})


def tiny_targets(batch_size: int, height: int, width: int):
    masks, labels = [], []
    for index in range(batch_size):
        mask = torch.zeros(index % 2 + 1, height, width)
        mask[0, 8:30, 10:40] = 1
        mask[-1, 35:60, 20:50] = 1
        masks.append(mask)
        labels.append(torch.arange(mask.shape[0]) % 3)
    return masks, labels


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-fastinst")
    FastInstForInstanceSegmentation(tiny_config()).save_pretrained(folder)
    FastInstImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------
def test_default_outputs_are_batch_first_tensors():
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    with torch.no_grad():
        output = model(torch.randn(3, 3, 64, 96), pixel_mask=torch.ones(3, 64, 96, dtype=torch.long))
    assert set(output.keys()) == {
        "class_queries_logits",
        "masks_queries_logits",
        "proposal_logits",
        "proposal_indices",
        "encoder_last_hidden_state",
        "pixel_decoder_last_hidden_state",
        "transformer_decoder_last_hidden_state",
        "image_sizes",
    }
    assert all(isinstance(value, torch.Tensor) and value.shape[0] == 3 for value in output.values())


def test_last_hidden_states_by_default_under_mask2former_names():
    """Backbone's last map, the pixel features of the last mask head and the final queries, without asking; equal to
    the last entries of the per-layer fields; the tuple output keeps the logits first."""
    torch.manual_seed(0)
    model = FastInstModel(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        output = model(pixel_values)
        full = model(pixel_values, output_hidden_states=True)
        as_tuple = model(pixel_values, return_dict=False)
    assert len(as_tuple) == 7 and torch.equal(as_tuple[1], output.masks_queries_logits)
    assert torch.equal(as_tuple[4], output.encoder_last_hidden_state)
    assert output.encoder_last_hidden_state.shape == (2, 128, 2, 3)
    assert output.pixel_decoder_last_hidden_state.shape == (2, 32, 8, 12)
    assert output.transformer_decoder_last_hidden_state.shape == (2, 10 + 4, 32)
    assert torch.equal(full.encoder_last_hidden_state, full.encoder_hidden_states[-1])
    assert torch.equal(full.transformer_decoder_last_hidden_state, full.query_hidden_states[-1])
    pixels = full.pixel_hidden_states[-1]  # [B, h*w, C]
    assert torch.equal(full.pixel_decoder_last_hidden_state.flatten(2).transpose(1, 2), pixels)
    # the masks are made from these pixel features and the final queries
    head = model.decoder.prediction_heads[-1]
    _, masks = head(full.transformer_decoder_last_hidden_state, pixels, (8, 12), predict_class=False)
    torch.testing.assert_close(masks, full.masks_queries_logits)


def test_optional_outputs_only_when_asked():
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True, output_auxiliary_logits=True)
    assert len(output.auxiliary_logits) == 2
    assert all(entry["class_queries_logits"].shape == (2, 10, 4) for entry in output.auxiliary_logits)
    assert len(output.query_hidden_states) == len(output.pixel_hidden_states) == 3
    assert len(output.encoder_hidden_states) == len(output.pixel_decoder_hidden_states) == 3
    base = FastInstModel(tiny_config()).eval()
    with torch.no_grad():
        base_output = base(pixel_values, output_hidden_states=True)
    # every hidden-state field is batch-first, the shared pixel positions included
    assert base_output.pixel_position_embeddings.shape == (2, 8 * 12, 32)
    assert base_output.query_position_embeddings.shape == (2, 14, 32)


def test_labels_give_loss_and_auxiliary_logits_without_matching_indices():
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    masks, labels = tiny_targets(2, 64, 96)
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 96), mask_labels=masks, class_labels=labels)
    assert torch.isfinite(output.loss)
    # 2 GT-mask-guided + 2 earlier heads; nothing whose size follows the number of targets
    assert len(output.auxiliary_logits) == 4
    assert all(set(entry) == {"class_queries_logits", "masks_queries_logits"} for entry in output.auxiliary_logits)
    # What the Trainer keeps as predictions: the class and mask logits first.
    ignore = model.config.keys_to_ignore_at_inference
    predictions = tuple(value for key, value in output.items() if key not in ignore + ["loss"])
    assert predictions[0] is output.class_queries_logits and predictions[1] is output.masks_queries_logits
    assert all(isinstance(value, torch.Tensor) and value.shape[0] == 2 for value in predictions)


def test_output_attentions():
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 96), output_attentions=True)
        plain = model(torch.randn(2, 3, 64, 96))
    assert plain.attentions is None
    # per layer: pixel cross-attention, masked query cross-attention, query self-attention
    queries, pixels = 10 + 4, 8 * 12
    shapes = [(2, 4, pixels, queries), (2, 4, queries, pixels), (2, 4, queries, queries)] * 2
    assert [tuple(a.shape) for a in output.attentions] == shapes
    for weights in output.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    # transformers only lets the configuration ask for attentions under eager; a call asking runs eager anyway
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    with torch.no_grad():
        assert len(model(torch.randn(1, 3, 64, 96)).attentions) == 6


def test_attention_maps_are_in_the_graph():
    """An attention map returned with `output_attentions=True` receives a gradient (the upstream common test
    `test_retain_grad_hidden_states_attentions`); the masked query cross-attention's map is zero where it is blocked."""
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config())
    output = model(torch.randn(1, 3, 64, 96), output_attentions=True)
    for weights in output.attentions:
        weights.retain_grad()
    output.masks_queries_logits.sum().backward()
    assert all(weights.grad is not None and weights.grad.abs().sum() > 0 for weights in output.attentions)
    cross = output.attentions[1]  # layer 0's masked cross-attention, under the mask of the initial head's masks
    assert (cross == 0).any() and not (cross == 0).all(dim=-1).any()


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flash_attention_2"])
def test_attention_implementations_give_the_same_outputs(implementation, monkeypatch):
    """sdpa and a flash implementation give eager's outputs. Recorders stand in for the registered functions (the
    flash kernels need a GPU; the stand-in computes with sdpa): the unmasked attentions (pixel cross, query self) run
    the configured implementation, the masked query cross-attention (a dense mask) falls back to sdpa under flash."""
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation._from_config(tiny_config(), attn_implementation="eager").eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values)
    sdpa, calls = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def recorder(name):
        def attention(module, query, key, value, attention_mask, **kwargs):
            calls.append((name, attention_mask is not None))
            return sdpa(module, query, key, value, attention_mask, **kwargs)

        return attention

    for name in ("sdpa", "flash_attention_2"):
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, name, recorder(name))
    model.config._attn_implementation_internal = implementation
    with torch.no_grad():
        actual = model(pixel_values)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits, rtol=1e-4, atol=1e-4)
    # 2 layers, each: pixel cross (no mask), masked query cross, query self (no mask)
    per_layer = {
        "eager": [],
        "sdpa": [("sdpa", False), ("sdpa", True), ("sdpa", False)],
        "flash_attention_2": [("flash_attention_2", False), ("sdpa", True), ("flash_attention_2", False)],
    }
    assert calls == per_layer[implementation] * 2


def test_pipeline_batches_give_per_image_results(saved_folder):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)) for _ in range(4)]
    segmenter = pipeline("image-segmentation", model=str(saved_folder), trust_remote_code=False)
    alone = [segmenter(image, subtask="instance", threshold=0.0) for image in images]
    assert all(alone)
    for batch_size in (1, 2, 3, 4):
        batched = segmenter(images, subtask="instance", threshold=0.0, batch_size=batch_size)
        assert len(batched) == len(images)
        for expected, got in zip(alone, batched):
            assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-4)
            assert [r["label"] for r in got] == [r["label"] for r in expected]
            assert all(r["mask"].size == (90, 60) for r in got)


def test_pipeline_names_fastinst_as_supported(saved_folder, caplog):
    segmenter = pipeline("image-segmentation", model=str(saved_folder), trust_remote_code=False)
    assert isinstance(segmenter.model, FastInstForInstanceSegmentation)
    assert "not supported" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Weight initialisation
# ---------------------------------------------------------------------------------------------------------------------
def xavier_bound(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return (6 / (fan_in + fan_out)) ** 0.5


def assert_upstream_init(model: FastInstForInstanceSegmentation):
    for module in model.modules():
        if isinstance(module, FastInstConvNormLayer):
            # c2_xavier_fill = kaiming_uniform(a=1): bound sqrt(3 / fan_in), above torch's default 1 / sqrt(fan_in)
            weight, bound = module.conv.weight, (3 / module.conv.weight[0].numel()) ** 0.5
            assert weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound
        elif isinstance(module, FastInstAttention):
            for weight in (module.in_proj_weight, module.out_proj.weight):
                assert weight.abs().max() <= xavier_bound(weight) and weight.abs().max() > 0.8 * xavier_bound(weight)
            assert not module.in_proj_bias.any() and not module.out_proj.bias.any()
        elif isinstance(module, FastInstFeedForwardLayer):
            for weight in (module.fc1.weight, module.fc2.weight):
                assert weight.abs().max() <= xavier_bound(weight) and weight.abs().max() > 0.8 * xavier_bound(weight)
        elif isinstance(module, FastInstFrozenBatchNorm2d):
            assert (module.weight == 1).all() and (module.running_var == 1).all()
            assert not module.bias.any() and not module.running_mean.any()


def test_new_model_gets_upstream_init():
    torch.manual_seed(0)
    assert_upstream_init(FastInstForInstanceSegmentation(tiny_config()))


@pytest.mark.parametrize("backbone", ["resnet", "resnet_vd"])
def test_from_pretrained_initialises_every_missing_weight(tmp_path, backbone):
    """With no weights in the file at all, every parameter and buffer is initialised as a new model's (no
    uninitialised memory), and partly missing weights leave the loaded ones untouched."""
    config = tiny_config()
    if backbone == "resnet_vd":
        backbone_config = FastInstResNetVdConfig(
            stem_width=8,
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        )
        config = tiny_config(backbone_config=backbone_config)
    torch.manual_seed(0)
    reference = FastInstForInstanceSegmentation(config)
    reference.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    empty = FastInstForInstanceSegmentation.from_pretrained(tmp_path)
    assert_upstream_init(empty)
    expected = reference.state_dict()
    for name, tensor in empty.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        if not tensor.is_floating_point() or expected[name].std() == 0:  # constants (norms, zero-init offsets)
            assert torch.equal(tensor, expected[name]), name
        elif tensor.numel() > 64:
            # same initialisation (not the same draws): similar spread; uninitialised memory is 0 or garbage
            ratio = tensor.std() / expected[name].std()
            assert 0.5 < ratio < 2, (name, ratio)

    # Decoder weights missing: loaded ones are kept as saved.
    kept = {name: tensor for name, tensor in weights.items() if ".decoder." not in name}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    partial = FastInstForInstanceSegmentation.from_pretrained(tmp_path)
    assert_upstream_init(partial)
    state = partial.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in kept.items())


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------
def test_backbone_is_a_sub_config(saved_folder):
    assert FastInstConfig.sub_configs == {"backbone_config": AutoConfig}
    config = AutoConfig.from_pretrained(saved_folder, attn_implementation="eager")
    assert config.backbone_config._attn_implementation == "eager"
    model = AutoModel.from_pretrained(saved_folder, attn_implementation="eager")
    assert model.config.backbone_config._attn_implementation == "eager"
    # a ResNet-vd backbone (not an AutoConfig type without this package) survives the dict round trip
    config = variant_config("fastinst-d1-r50-vd-dcn")
    assert isinstance(FastInstConfig.from_dict(config.to_dict()).backbone_config, FastInstResNetVdConfig)


def test_universal_segmentation_auto_class(saved_folder):
    model = AutoModelForUniversalSegmentation.from_pretrained(saved_folder)
    assert isinstance(model, FastInstForInstanceSegmentation)
    auto_map = json.loads((saved_folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForUniversalSegmentation"] == "modeling_fastinst.FastInstForInstanceSegmentation"


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_recomputes_decoder_layers_with_equal_gradients():
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config()).train()
    pixel_values = torch.randn(2, 3, 64, 96)
    masks, labels = tiny_targets(2, 64, 96)
    calls = []
    for module in model.modules():
        if isinstance(module, FastInstFeedForwardLayer):
            module.register_forward_hook(lambda *args: calls.append(1))

    def gradients():
        calls.clear()
        model.zero_grad()
        torch.manual_seed(1)  # the point sampling of the loss draws random numbers
        model(pixel_values, mask_labels=masks, class_labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients()
    assert model.supports_gradient_checkpointing
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    checkpointed, checkpointed_calls = gradients()
    # 2 FFNs per layer, 2 layers, run twice in training (main + GT-mask-guided); checkpointing recomputes in backward
    assert plain_calls == 8 and checkpointed_calls > plain_calls
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Image processors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("processor_class", [FastInstImageProcessor, FastInstImageProcessorPil])
def test_image_processor_round_trip_keeps_to_dict(tmp_path, processor_class):
    processor = processor_class(size={"shortest_edge": 128, "longest_edge": 200}, num_detections=50)
    processor.save_pretrained(tmp_path)
    loaded = processor_class.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert set(saved["auto_map"]["AutoImageProcessor"]) == {"torchvision", "pil"}
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path, backend="pil"), FastInstImageProcessorPil)


def test_image_processor_kwargs_visible_from_both_backends():
    assert FastInstImageProcessorPil.valid_kwargs is FastInstImageProcessorKwargs
    assert {"ignore_index", "do_reduce_labels", "size_divisor"} <= set(FastInstImageProcessorKwargs.__annotations__)


@pytest.mark.parametrize("processor_class", [FastInstImageProcessor, FastInstImageProcessorPil])
def test_example_script_call_with_fixed_size_and_reduced_labels(processor_class):
    """The call of transformers' instance-segmentation example scripts: a fixed `size={"height", "width"}`, an
    instance-id map and its instance -> semantic mapping, with and without `do_reduce_labels`."""
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    instances = np.zeros((50, 70), dtype=np.uint8)
    instances[5:20, 5:30], instances[25:40, 30:60] = 1, 2
    mapping = {0: 0, 1: 3, 2: 5}  # instance 0 is the background, semantic 0
    processor = processor_class(size={"height": 64, "width": 96})
    plain = processor(images=[image], segmentation_maps=[instances], instance_id_to_semantic_id=mapping)
    assert plain["pixel_values"][0].shape == (3, 64, 96)
    assert plain["mask_labels"][0].shape == (3, 64, 96)
    assert plain["class_labels"][0].tolist() == [0, 3, 5]
    reduced = processor_class(size={"height": 64, "width": 96}, do_reduce_labels=True)(
        images=[image], segmentation_maps=[instances], instance_id_to_semantic_id=mapping, return_tensors="pt"
    )
    assert reduced["class_labels"][0].tolist() == [2, 4]
    assert torch.equal(reduced["mask_labels"][0], plain["mask_labels"][0][1:])
    # ignore_index 255 (Mask2Former's convention) marks void pixels
    instances[45:, :] = 255
    voided = processor(images=[image], segmentation_maps=[instances], instance_id_to_semantic_id=mapping)
    assert voided["class_labels"][0].tolist() == [0, 3, 5]


# ---------------------------------------------------------------------------------------------------------------------
# Remote code without torchvision for the PIL processor (without scipy & co: test_auto_and_pipeline.py)
# ---------------------------------------------------------------------------------------------------------------------
REMOTE_CODE_SCRIPT = """
import sys
for name in sys.argv[3].split(","):
    sys.modules[name] = None  # `import name` now fails, and transformers sees the package as absent
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

folder, copy = sys.argv[1], sys.argv[2]
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
"""


def run_remote_code(folder, tmp_path, blocked: str, body: str) -> str:
    script = REMOTE_CODE_SCRIPT + textwrap.dedent(body)
    # A private dynamic-module cache: the default one is shared by every process on the machine.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    args = [sys.executable, "-c", script, str(folder), str(tmp_path / "copy"), blocked]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_pil_processor_without_torchvision(saved_folder, tmp_path):
    body = """
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="pil")
        assert type(processor).__name__ == "FastInstImageProcessorPil"
        inputs = processor(images=image, return_tensors="pt")
        outputs = type("Outputs", (), {})()
        outputs.class_queries_logits = torch.randn(1, 10, 4)
        outputs.masks_queries_logits = torch.randn(1, 10, *(s // 8 for s in inputs["pixel_values"].shape[-2:]))
        result = processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=[(60, 90)])[0]
        print(tuple(inputs["pixel_values"].shape), tuple(result["segmentation"].shape))
        """
    stdout = run_remote_code(saved_folder, tmp_path, "fastinst_hf,torchvision", body)
    assert stdout.split("\n")[-2] == "(1, 3, 64, 96) (60, 90)"
