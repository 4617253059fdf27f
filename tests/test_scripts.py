"""Smoke tests of every script in `scripts/`, each run as a user would (a subprocess), on tiny inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize(
    "script, command",
    [("train.py", "train"), ("evaluate_model.py", "evaluate"), ("convert_fastinst_to_hf.py", "convert")],
)
def test_command_scripts_show_their_command_help(script, command):
    assert f"usage: fastinst-hf {command}" in run_script(script, "--help").stdout


def test_convert_script_writes_a_loadable_folder(tmp_path):
    fixture = FIXTURES / "d1_r50slim_small"
    output = tmp_path / "converted"
    run_script(
        "convert_fastinst_to_hf.py",
        "--checkpoint", fixture / "model_state_dict.pt", "--config", fixture / "config.yaml", "--output-dir", output,
    )  # fmt: skip
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "fastinst" and (output / "model.safetensors").is_file()


def test_benchmark_script_times_the_default_model():
    from fastinst_hf.inference.resolve import DEFAULT_MODEL_DIR

    options = ["--model", DEFAULT_MODEL_DIR, "--device", "cpu", "--runtimes", "eager", "--batch-sizes", "1"]
    stdout = run_script(
        "benchmark.py", *options, "--throughput-runtimes", "eager", "--runs", "1", "--warmup", "0"
    ).stdout
    assert "| fastinst_hf eager |" in stdout and "images/s" in stdout


def test_benchmark_postprocess_script():
    stdout = run_script("benchmark_postprocess.py", "--repeats", "1").stdout
    assert "ms" in stdout


def test_measure_mask_probe_script():
    output = run_script("measure_mask_probe.py", "--sizes", "2", "--masks", "1", "8", "--repeats", "1").stdout
    rows = [line.split() for line in output.splitlines()[1:-1]]
    assert [(row[0], row[1], row[-1]) for row in rows] == [
        ("480x640", "1", "dense"), ("480x640", "8", "tiled"), ("640x480", "1", "dense"), ("640x480", "8", "tiled")
    ]  # fmt: skip
    assert output.splitlines()[-1].startswith("worst first/dense:")


def test_check_reduced_precision_script_compares_bf16_with_fp32(tmp_path):
    out = tmp_path / "precision.json"
    run_script("check_reduced_precision.py", "--shapes", "3", "--json", out)
    result = json.loads(out.read_text())
    assert result["images"] == 3 and 0.0 <= result["matched_share"] <= 1.0 and "AP_bf16" in result


def test_check_reduced_precision_script_measures_a_bf16_weights_split(tmp_path):
    out = tmp_path / "precision.json"
    run_script(
        "check_reduced_precision.py",
        "--shapes",
        "2",
        "--precision",
        "bf16-weights",
        "--split",
        "decoder",
        "--json",
        out,
    )
    result = json.loads(out.read_text())
    assert result["split"] == "decoder" and result["images"] == 2 and "AP_bf16-weights" in result


@pytest.mark.slow  # exports the embedded model and quantizes it
def test_check_reduced_precision_script_compares_int8_with_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTINST_HF_CACHE", str(tmp_path / "cache"))  # the graph and its int8 IR go there
    out = tmp_path / "precision.json"
    run_script(
        "check_reduced_precision.py", "--shapes", "2", "--precision", "int8", "--calibration-size", "2", "--json", out
    )
    result = json.loads(out.read_text())
    assert result["calibration_images"] == 2 and result["int8_scheme"] == "backbone" and "AP_int8" in result
    assert 0.0 <= result["matched_share"] <= 1.0


def test_check_official_parity_script_passes_on_the_shipped_fixture(tmp_path):
    table = tmp_path / "parity.json"
    run_script("check_official_parity.py", FIXTURES / "d1_r50slim_small", "--threads", "1", "--json", table)
    assert json.loads(table.read_text())


def test_learning_check_script_runs_a_tiny_check(tmp_path):
    args = ("--out-dir", tmp_path, "--steps", "2", "--num-images", "5", "--image-size", "96", "--batch-size", "2")
    run_script("learning_check.py", *args)
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert result["dataset"] == "shapes" and result["steps"] == 2 and "AP" in result["trained"]
