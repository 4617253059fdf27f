"""Smoke test of `scripts/benchmark_cpu_vs_official.py` on a tiny config, in-process (the script times full-size
variants; `tests/test_scripts.py` runs the other scripts as subprocesses)."""

import importlib.util
from pathlib import Path

import numpy as np
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
