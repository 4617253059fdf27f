"""scripts/gpu_check.py: the quick CPU run executes every section's code, each case reports its own status."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_script()


def test_case_statuses_and_one_failure_does_not_stop_the_rest(gpu_check, tmp_path):
    check = gpu_check.Check(torch.device("cpu"), True, tmp_path, skip=("skip me",))

    def unavailable():
        raise gpu_check.Unavailable("no such package")

    def body(check):
        check.case("passes", lambda: {"ok": True, "value": 1.5})
        check.case("fails", lambda: {"ok": False})
        check.case("raises", lambda: 1 / 0)
        check.case("unavailable", unavailable)
        check.case("please skip me", lambda: {"ok": True})

    check.run_section("speed", body)
    cases = check.sections["speed"]["cases"]
    assert {name: case["status"] for name, case in cases.items()} == {
        "passes": "pass",
        "fails": "fail",
        "raises": "error",
        "unavailable": "skipped",
        "please skip me": "skipped",
    }
    assert cases["passes"]["value"] == 1.5 and cases["unavailable"]["reason"] == "no such package"
    assert cases["raises"]["error"] == "ZeroDivisionError: division by zero"
    assert check.sections["speed"]["status"] == "fail"

    check.run_section("training", lambda check: 1 / 0)  # a section whose set-up fails is recorded, not raised
    assert check.sections["training"]["status"] == "fail" and "ZeroDivisionError" in check.sections["training"]["error"]


def test_clock_and_peak_memory_on_cpu(gpu_check):
    clock, peak = gpu_check.Clock(torch.device("cpu")), gpu_check.PeakMemory(torch.device("cpu"))
    peak.reset()
    before = peak.mib()
    summary = clock.repeat(lambda: torch.ones(2000, 2000).sum(), warmup=1, runs=3)
    assert len(summary["runs_ms"]) == 3 and 0 < summary["min_ms"] <= summary["median_ms"] <= summary["max_ms"]
    assert peak.mib() >= before > 0


def test_quick_cpu_run_covers_every_section(gpu_check, tmp_path, capsys):
    out = tmp_path / "out" / "check.json"
    # torch.compile and the ONNX export take minutes on a busy 2-core CPU: the slow test below runs them.
    status = gpu_check.main(["--device", "cpu", "--quick", "--json", str(out), "--skip", "compile", "onnxruntime"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["check.json", "check.md"]  # no temporary left
    assert set(gpu_check.SECTIONS) <= set(result) and result["device"]["device"] == "cpu"
    assert all(result[section]["status"] in ("pass", "fail") for section in gpu_check.SECTIONS)

    correctness = result["correctness"]["cases"]
    assert result["correctness"]["status"] == "pass", correctness
    assert correctness["official fixture d1_r50slim_small"]["compared"] > 30
    assert correctness["R50-vd-DCN forward+backward vs CPU"]["conv2_gradients_compared"] > 0
    assert correctness["post-processing vs CPU"]["instances"] == 100

    precision = result["precision"]["cases"]
    assert len(precision) == 12  # 3 models x fp16/bf16 x autocast/dtype
    assert precision["embedded fp16 autocast"]["status"] == "skipped"  # fp16 autocast is CUDA-only
    bf16 = precision["fastinst-d3-r50-vd-dcn random bf16 dtype"]
    assert bf16["status"] == "pass" and bf16["parameter_dtypes"] and bf16["nonfinite_outputs"] == 0
    assert "AP_difference" in precision["embedded bf16 autocast"] and "matched_share" in bf16

    speed = result["speed"]["cases"]
    for variant in ("fastinst-d1-r50", "fastinst-d3-r50-vd-dcn"):
        for batch in (1, 2):
            case = speed[f"{variant} eager fp32 batch {batch}"]
            assert case["status"] == "pass" and case["network_ms"] > 0 and case["full_img_s"] > 0
            assert case["input"][0] == batch and case["peak_mib"] > 0
    assert speed["eager fp16"]["status"] == "skipped"  # said once, not per model and batch
    assert speed["torch-tensorrt fp16"]["status"] == "skipped"
    assert speed["fastinst-d1-r50 compile batch 1"] == {"status": "skipped", "reason": "--skip"}

    training = result["training"]["cases"]
    assert result["training"]["status"] == "pass", training
    assert training["bf16"]["mixed_precision_used"] == "bf16" and training["bf16"]["steps"] == 4
    assert training["resume after SIGKILL (fp32)"]["killed_after_checkpoint"] == "step_2"
    assert result["large_image"]["status"] == "pass"
    assert result["large_image"]["cases"]["512x512 end to end"]["instances"] > 0

    table = (tmp_path / "out" / "check.md").read_text()
    assert "| section | case | status | result |" in table and "| fastinst-d1-r50 eager fp32 batch 1 |" in table
    assert table.strip() in printed
    assert result["finished"] and status == (0 if result["status"] == "pass" else 1)


@pytest.mark.slow
def test_quick_cpu_speed_with_compile_and_onnxruntime_and_launched_training(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    gpu_check.main(
        ["--device", "cpu", "--quick", "--sections", "speed", "training", "--launch-training", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    speed = result["speed"]["cases"]
    for name in ("compile", "onnxruntime CPU"):
        assert speed[f"fastinst-d3-r50-vd-dcn {name} batch 2"]["status"] == "pass", speed
    assert speed["compile reduce-overhead"]["status"] == "skipped"
    assert result["training"]["status"] == "pass", result["training"]
