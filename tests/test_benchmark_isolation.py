"""Benchmark isolation: every timed process starts with sleeping idle thread pools, the benchmark itself runs in such
a child, graph runtimes do not spin, and the table states the CPU flags and the official-alone check."""

import json
import subprocess
import sys

import pytest

from fastinst_hf.benchmarks import runtimes
from fastinst_hf.benchmarks.timing import PASSIVE_THREADS, StepWorker, isolated_environment, threads_are_passive
from fastinst_hf.cli import benchmark as cli_benchmark
from fastinst_hf.cli.main import main

REPORT_ENV = (
    "import json, os, sys\n"
    "print(json.dumps({key: os.environ.get(key) for key in ('OMP_WAIT_POLICY', 'KMP_BLOCKTIME')}), flush=True)\n"
    "for _ in sys.stdin:\n"
    "    print(json.dumps({'full': 1.0}), flush=True)\n"
)


def test_every_worker_process_starts_with_passive_thread_pools():
    environment = {"PATH": "/usr/bin", "OMP_WAIT_POLICY": "ACTIVE"}  # even when the caller asks otherwise
    assert isolated_environment(environment) == {"PATH": "/usr/bin", **PASSIVE_THREADS}
    worker = StepWorker([sys.executable, "-c", REPORT_ENV], environment=environment)
    try:
        assert worker.info == PASSIVE_THREADS
        assert worker.measure() == {"full": 1.0}
    finally:
        worker.close()


def test_benchmark_command_reruns_itself_in_a_passive_child(monkeypatch, capsys):
    seen = {}

    def fake_run(command, env, capture_output, text):
        seen.update(command=command, env=env)
        return subprocess.CompletedProcess(command, 3, stdout="child table\n", stderr="child error\n")

    monkeypatch.setattr(cli_benchmark.subprocess, "run", fake_run)
    for key in PASSIVE_THREADS:
        monkeypatch.delenv(key, raising=False)
    assert not threads_are_passive()
    assert main(["benchmark", "--runtimes", "eager", "--runs", "1"]) == 3  # the child's exit status
    printed = capsys.readouterr()
    assert printed.out == "child table\n" and printed.err == "child error\n"  # the child's stderr passed on
    assert all(seen["env"][key] == value for key, value in PASSIVE_THREADS.items())
    assert json.loads(seen["command"][-1])["runtimes"] == ["eager"]
    # bad options fail in the parent, before any child starts
    seen.clear()
    assert main(["benchmark", "--runs", "0"]) == 2 and not seen


def test_command_line_names_follow_the_benchmark_module():
    assert cli_benchmark.RUNTIME_NAMES == tuple(runtimes.RUNTIMES)
    assert cli_benchmark.DEFAULT_RUNTIME_NAMES == runtimes.DEFAULT_RUNTIMES
    assert cli_benchmark.PEER_NAMES == tuple(runtimes.PEER_PACKAGES)


def test_onnxruntime_sessions_of_the_benchmark_do_not_spin(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from fastinst_hf.inference.levers import OnnxRuntimeModel

    value = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3])
    output = helper.make_tensor_value_info("class_queries_logits", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixel_values"], ["class_queries_logits"])], "g", [value], [output]
    )
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    options = OnnxRuntimeModel(path, num_threads=1, spinning=False).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_table_states_cpu_flags_flops_and_the_official_alone_check():
    stats = {"median_ms": 100.0, "min_ms": 90.0, "max_ms": 110.0}
    result = {
        "cpu": "Some CPU",
        "cpu_flags": ["avx2", "avx512f", "avx512_bf16"],
        "passive_threads": True,
        "threads": 2,
        "torch": "x",
        "image_hw": [480, 640],
        "model_input_hw": [576, 768],
        "padded_hw": [576, 768],
        "runs": 3,
        "official": {"network": stats, "full": {**stats, "median_ms": 200.0}},
        "official_script_alone": {"network": stats, "full": {**stats, "median_ms": 190.0}},
        "runtimes": {"eager": {"network": stats, "postprocess": stats, "full": stats}},
        "flops": 100e9,
        "matmul_peak_gflops": {"fp32": 500.0, "bf16": 1500.0},
        "variant": "fastinst-d1-r50",
    }
    table = runtimes.format_table(result)
    assert "CPU flags: avx2, avx512f, avx512_bf16; idle thread pools passive: yes" in table
    assert "| fastinst_hf eager | 100 (90-110) | 100 (90-110) | 100 (90-110) | 0.50 | 1000 |" in table
    assert "| official, bench_official.py | 100 (90-110) | - | 190 (90-110) | 0.95 | 1000 |" in table
    assert "interleaved vs its script alone: +5.3% (agree)" in table
    assert "50.0 GFLOPs in the paper's unit (paper: 49.6" in table and "fp32 500, bf16 1500" in table
