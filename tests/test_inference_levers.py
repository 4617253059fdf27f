"""Inference levers: batch-norm folding, in-place ReLU, channels_last, autocast switches, onnxruntime runtime."""

import copy

import pytest
import torch
from conftest import TINY_RESNET_VD, tiny_config
from transformers import ResNetConfig

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.inference.levers import (
    OnnxRuntimeModel,
    OpenVinoModel,
    autocast_context,
    cached_graph,
    cpu_supports_bf16,
    fold_batch_norms,
    graph_key,
    prepare_for_inference,
    relu_in_place,
    to_channels_last,
)
from fastinst_hf.modeling_fastinst import FastInstFrozenBatchNorm2d


def tiny_model(backbone_config) -> FastInstForInstanceSegmentation:
    config = tiny_config(backbone_config=backbone_config)
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(config).eval()
    # Non-trivial statistics, so that a wrong fold cannot pass.
    for module in model.modules():
        if isinstance(module, FastInstFrozenBatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
    return model


RESNET = ResNetConfig(
    embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]
)


@pytest.mark.parametrize("backbone_config", [RESNET, TINY_RESNET_VD], ids=["resnet", "resnet-vd-dcn"])
def test_folded_model_gives_the_same_outputs_and_leaves_the_original_alone(backbone_config):
    model = tiny_model(backbone_config)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    folded = fold_batch_norms(model)
    norms = [m for m in folded.model.backbone.modules() if isinstance(m, FastInstFrozenBatchNorm2d)]
    # Only the stem's last norm (after a Sequential) and the deformable convs' norms are kept.
    assert len(norms) == (4 if backbone_config is TINY_RESNET_VD else 0)
    pixel_values = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        expected, actual = model(pixel_values), folded(pixel_values)
    torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("backbone_config", [RESNET, TINY_RESNET_VD], ids=["resnet", "resnet-vd-dcn"])
def test_relu_in_place_gives_bit_identical_outputs(backbone_config):
    folded = fold_batch_norms(tiny_model(backbone_config))
    in_place = relu_in_place(copy.deepcopy(folded))
    relus = [m for m in in_place.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    pixel_values = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        expected, actual = folded(pixel_values), in_place(pixel_values)
    assert torch.equal(actual.masks_queries_logits, expected.masks_queries_logits)
    assert torch.equal(actual.class_queries_logits, expected.class_queries_logits)
    # The copy was switched, the model it came from was not.
    assert sum(m.inplace for m in folded.modules() if isinstance(m, torch.nn.ReLU)) < len(relus)


def test_channels_last_gives_the_same_outputs():
    model = tiny_model(RESNET)
    fast = prepare_for_inference(model, fold_norms=True, channels_last=True)
    pixel_values = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        expected, actual = model(pixel_values), fast(to_channels_last(pixel_values))
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=1e-4, atol=1e-4)


def test_autocast_switches():
    assert isinstance(cpu_supports_bf16(), bool)
    with autocast_context("bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context("fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_context("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_context("int4")


@pytest.mark.slow  # an ONNX export
def test_onnxruntime_model_matches_pytorch(tmp_path):
    from fastinst_hf.inference.onnx_export import export_onnx

    model = tiny_model(RESNET)
    path = export_onnx(model, tmp_path / "model.onnx", height=128, width=160, dynamic=False)
    pixel_values = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        expected = model(pixel_values)
    actual = OnnxRuntimeModel(path, num_threads=1)(pixel_values)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=1e-3, atol=1e-3)


def test_graph_key_follows_weights_and_config():
    model = tiny_model(RESNET)
    key = graph_key(model)
    assert key == graph_key(model)
    model.config.num_detections += 1
    assert graph_key(model) != key
    model.config.num_detections -= 1
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert graph_key(model) != key


def test_graph_key_hashes_zero_dimensional_buffers():
    model = tiny_model(RESNET)
    key = graph_key(model)
    model.register_buffer("num_batches_tracked", torch.tensor(3))  # as nn.BatchNorm2d has
    assert graph_key(model) != key


@pytest.mark.slow  # an ONNX export
def test_onnxruntime_model_exports_once_per_model_into_the_cache(tmp_path, monkeypatch):
    from fastinst_hf.inference import onnx_export

    model = tiny_model(RESNET)
    path = cached_graph(model, tmp_path)
    assert path == tmp_path / graph_key(model) / "model.onnx" and path.is_file()
    first = OnnxRuntimeModel(path, num_threads=1)

    def no_export(*args, **kwargs):
        raise AssertionError("the cached graph should have been reused")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    second = OnnxRuntimeModel(cached_graph(model, tmp_path), num_threads=1)
    pixel_values = torch.randn(1, 3, 128, 160)
    torch.testing.assert_close(second(pixel_values).masks_queries_logits, first(pixel_values).masks_queries_logits)


@pytest.mark.slow  # an ONNX export
def test_openvino_model_matches_pytorch(tmp_path):
    from fastinst_hf.inference.onnx_export import export_onnx

    model = tiny_model(RESNET)
    path = export_onnx(model, tmp_path / "model.onnx", height=128, width=160)
    for shape in ((1, 3, 128, 160), (2, 3, 160, 128)):
        pixel_values = torch.randn(shape)
        with torch.no_grad():
            expected = model(pixel_values)
        actual = OpenVinoModel(path, num_threads=1)(pixel_values)
        for name in ("class_queries_logits", "masks_queries_logits"):
            torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-3, atol=1e-3)


def test_graph_runtimes_say_when_their_package_is_missing(monkeypatch):
    import importlib.util

    from fastinst_hf.benchmarks.runtimes import RUNTIMES, available

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert available(RUNTIMES["openvino"], torch.device("cpu")) == "the package openvino is not installed"
    assert available(RUNTIMES["onnxruntime"], torch.device("cpu")) == "the package onnxruntime is not installed"
    assert available(RUNTIMES["eager"], torch.device("cpu")) is None
