"""Smoke tests of `scripts/benchmark_cpu_vs_official.py` and of the benchmark's optional peers and training step on
a tiny config, in-process (the script times full-size variants; `tests/test_scripts.py` runs the other scripts as
subprocesses)."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

SCRIPTS = Path(__file__).parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_cpu_vs_official_times_every_stage(tmp_path):
    script = load_script("benchmark_cpu_vs_official")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    result = script.bench("d1", warmup=0, runs=1, image=str(image), config=tiny_config())
    assert result["model_input_hw"] == [64, 85] and result["padded_hw"] == [64, 96]
    for stage in ("full", "network", "stage_backbone", "stage_pixel_decoder", "stage_transformer_decoder"):
        assert result[stage]["median_ms"] > 0, stage


def test_benchmark_peer_without_its_package_is_skipped_in_one_line(monkeypatch):
    from fastinst_hf import FastInstForInstanceSegmentation
    from fastinst_hf.benchmarks import runtimes as benchmark
    from fastinst_hf.image_processing_fastinst import FastInstImageProcessor

    real_find_spec = benchmark.importlib.util.find_spec
    monkeypatch.setattr(
        benchmark.importlib.util, "find_spec", lambda name: None if name == "rfdetr" else real_find_spec(name)
    )
    model = FastInstForInstanceSegmentation(tiny_config())
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    options = benchmark.BenchmarkOptions(
        runtimes=("eager",), runs=1, warmup=0, batch_sizes=(), peers=("rfdetr-seg-nano",)
    )
    result = benchmark.run_benchmark(model, FastInstImageProcessor(), image, torch.device("cpu"), options)
    assert "rfdetr-seg-nano" not in result and result["setup_ms"]["eager"] > 0
    line = "skipped rfdetr-seg-nano: the optional package rfdetr is not installed (pip install rfdetr)"
    assert line in benchmark.format_table(result).splitlines()


def test_benchmark_rfdetr_peer_builds_random_weights_and_predicts_every_query(monkeypatch):
    from fastinst_hf.benchmarks import runtimes as benchmark

    calls = []

    class FakeSegNano:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def predict(self, image, threshold):
            calls.append((image.shape, threshold))

    monkeypatch.setitem(sys.modules, "rfdetr", types.SimpleNamespace(RFDETRSegNano=FakeSegNano))
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    result = benchmark.time_rfdetr("rfdetr-seg-nano", image, warmup=1, runs=2)
    assert calls == [{"pretrain_weights": None, "device": "cpu"}] + [((48, 64, 3), 0.0)] * 3
    assert len(result["full"]["runs_ms"]) == 2


def test_benchmark_table_gives_no_fastinst_rate_to_a_peer_network():
    from fastinst_hf.benchmarks import runtimes as benchmark

    def stage(ms):
        return {"median_ms": ms, "min_ms": ms, "max_ms": ms, "runs_ms": [ms]}

    result = {
        "cpu": "test CPU", "cpu_flags": ["avx2"], "passive_threads": True, "threads": 1, "torch": "x",
        "image_hw": [480, 640], "model_input_hw": [576, 768], "padded_hw": [576, 768], "runs": 1,
        "flops": 100e9, "matmul_peak_gflops": {"fp32": 200.0},
        "runtimes": {"eager": {"network": stage(500.0), "postprocess": stage(50.0), "full": stage(560.0)}},
        "mask2former": {"network": stage(2000.0), "full": stage(2100.0)},
    }  # fmt: skip
    rows = benchmark.format_table(result).splitlines()
    assert "| fastinst_hf eager | 500 (500-500) | 50 (50-50) | 560 (560-560) | - | 200 |" in rows
    assert "| peer: mask2former | 2000 (2000-2000) | - | 2100 (2100-2100) | - | - |" in rows


def test_benchmark_times_our_training_step_and_skips_the_official_one(tmp_path, capsys):
    """`--train-step` without `--official-root`: our step in its worker process, the official one named as skipped."""
    from fastinst_hf import FastInstForInstanceSegmentation
    from fastinst_hf.cli import main
    from fastinst_hf.conversion.official import save_converted

    torch.manual_seed(0)
    model_dir = save_converted(FastInstForInstanceSegmentation(tiny_config()), tmp_path / "model")
    argv = ["benchmark", "--model", str(model_dir), "--device", "cpu", "--runtimes", "eager", "--batch-sizes", ""]
    out = tmp_path / "bench.json"
    assert main([*argv, "--runs", "2", "--warmup", "0", "--train-step", "--train-profile", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| fastinst_hf | " in table and "official trainer" not in table
    assert "skipped official: no --official-root" in table
    assert "| convolutions | " in table and "| total | " in table
    step = json.loads(out.read_text())["train_step"]
    assert (step["batch_size"], step["size"], set(step) - {"batch_size", "size", "threads"}) == (
        2,
        512,
        {"fastinst_hf", "profile"},
    )
    profile = step["profile"]["fastinst_hf"]
    assert profile["convolutions"] > 0 and profile["matrix products"] > 0 and profile["optimizer step"] > 0
    assert profile["total"] == pytest.approx(sum(v for k, v in profile.items() if k != "total"))
    ours = step["fastinst_hf"]
    assert len(ours["runs_ms"]) == len(ours["cpu"]["runs_ms"]) == 2 and ours["median_ms"] > 0
    assert ours["peak_rss_mib"] >= ours["peak_rss_before_steps_mib"] > 0


def test_profile_categories_sum_self_times_by_the_first_matching_category():
    from fastinst_hf.benchmarks.training_step import profile_categories

    ops = [
        ["aten::mkldnn_convolution", 5.0],
        ["aten::convolution_backward", 7.0],
        ["aten::addmm", 2.0],
        ["aten::mm", 1.0],
        ["Optimizer.step#AdamW.step", 0.5],
        ["aten::native_group_norm", 0.25],
        ["aten::add_", 1.0],
    ]
    totals = profile_categories(ops)
    assert totals["convolutions"] == 12.0 and totals["matrix products"] == 3.0 and totals["optimizer step"] == 0.5
    assert totals["normalisation"] == 0.25 and totals["other ops"] == 1.0 and totals["total"] == 16.75


def test_train_profile_needs_the_training_step(capsys):
    from fastinst_hf.cli import main

    assert main(["benchmark", "--device", "cpu", "--train-profile"]) == 2
    assert "--train-profile profiles the training step: add --train-step" in capsys.readouterr().err


def test_peer_timing_keeps_the_thread_count_a_peer_changes():
    from fastinst_hf.benchmarks import runtimes as benchmark

    threads = torch.get_num_threads()
    seen = []

    def peer_call():  # as ultralytics' first CPU predict: sets its own thread count
        seen.append(torch.get_num_threads())
        torch.set_num_threads(threads + 1)

    try:
        benchmark._time_calls(peer_call, warmup=1, runs=2)
        assert seen == [threads, threads, threads]
    finally:
        torch.set_num_threads(threads)
