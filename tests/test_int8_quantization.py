"""int8: the exported graph quantized by NNCF and run by OpenVINO (`quantized_graph`), its benchmark runtime and the
missing-package errors."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.benchmarks.runtimes import RUNTIMES, available
from fastinst_hf.inference import levers
from fastinst_hf.inference.levers import OpenVinoModel, quantized_graph
from fastinst_hf.utils.errors import InputError


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    """A tiny model and its dynamic ONNX export."""
    from fastinst_hf.inference.onnx_export import export_onnx

    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    return model, export_onnx(model, tmp_path_factory.mktemp("graph") / "model.onnx", height=128, width=160)


def calibration(seed: int, count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 128, 160, generator=generator) for _ in range(count)]


def cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0))


@pytest.mark.slow  # an ONNX export and a quantization
@pytest.mark.parametrize("scheme", ["all", "backbone"])
def test_int8_graph_is_close_to_float32_and_keeps_the_output_shapes(tiny_graph, scheme):
    model, graph = tiny_graph
    path = quantized_graph(graph, calibration(0), scheme)
    assert path.name == "model.xml" and path.with_suffix(".bin").is_file() and path.parent.parent == graph.parent
    pixel_values = torch.randn(2, 3, 160, 128, generator=torch.Generator().manual_seed(1))  # still dynamic
    with torch.no_grad():
        expected = model(pixel_values)
    actual = OpenVinoModel(path, num_threads=1)(pixel_values)
    for name in ("class_queries_logits", "masks_queries_logits"):
        assert getattr(actual, name).shape == getattr(expected, name).shape
        # A random tiny model on noise is a hard case for int8 (about 0.9 here); an unrelated tensor gives about 0,
        # the float graph 1.
        assert 0.8 < cosine(getattr(actual, name), getattr(expected, name)) < 0.9999, name


@pytest.mark.slow  # an ONNX export and a quantization
def test_int8_graph_is_cached_per_calibration_set(tiny_graph, monkeypatch):
    _, graph = tiny_graph
    first = quantized_graph(graph, calibration(0), "all")
    other = quantized_graph(graph, calibration(2), "all")
    assert other != first and other.is_file()

    def no_quantization(*args, **kwargs):
        raise AssertionError("the cached int8 graph should have been reused")

    import nncf

    monkeypatch.setattr(nncf, "quantize", no_quantization)
    assert quantized_graph(graph, calibration(0), "all") == first
    assert not [p for p in graph.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_int8_says_when_nncf_is_missing_or_the_scheme_is_unknown(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="int8 scheme must be one of"):
        quantized_graph(tmp_path / "model.onnx", calibration(0), "int4")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "nncf" else real_find_spec(name))
    with pytest.raises(InputError, match=r"pip install 'fastinst-hf\[openvino\]'"):
        quantized_graph(tmp_path / "model.onnx", calibration(0))
    assert "nncf" in available(RUNTIMES["openvino-int8"], torch.device("cpu"))
    assert available(RUNTIMES["openvino"], torch.device("cpu")) is None


def test_backbone_scheme_ignores_every_op_outside_the_backbone(tmp_path):
    import onnx
    from onnx import helper

    def node(name: str, scopes: list[str]):
        made = helper.make_node("Relu", ["x"], ["y"], name=name)
        made.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
        return made

    nodes = [node("node_Conv_1", ["", "model", "model.model.backbone.embedder", "conv"]), node("node_Add_2", ["x"])]
    nodes.append(node("node_MatMul_3", ["", "model", "model.model.decoder.layers.0", "matmul"]))
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [], [])), path)
    patterns = levers._ops_outside(path, ("model.model.backbone",))
    assert patterns == [r"node_Add_2(/.*)?", r"node_MatMul_3(/.*)?"]


@pytest.mark.slow  # an ONNX export and a quantization
def test_benchmark_times_openvino_int8(monkeypatch):
    from fastinst_hf.benchmarks import runtimes as benchmark
    from fastinst_hf.image_processing_fastinst import FastInstImageProcessor

    model = FastInstForInstanceSegmentation(tiny_config())
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    options = benchmark.BenchmarkOptions(runtimes=("openvino", "openvino-int8"), runs=1, warmup=0, batch_sizes=())
    result = benchmark.run_benchmark(model, FastInstImageProcessor(), image, torch.device("cpu"), options)
    assert result["runtimes"]["openvino-int8"]["full"]["median_ms"] > 0
    assert "| fastinst_hf openvino-int8 |" in benchmark.format_table(result)
