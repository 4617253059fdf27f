"""Smoke test of `scripts/benchmark_cpu_vs_official.py` on a tiny config, in-process (the script times full-size
variants; `tests/test_scripts.py` runs the other scripts as subprocesses)."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import ResNetConfig

from fastinst_hf import FastInstConfig

SCRIPTS = Path(__file__).parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config() -> FastInstConfig:
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    return FastInstConfig(
        backbone_config=backbone,
        hidden_dim=32,
        pixel_decoder_channels=32,
        mask_dim=32,
        group_norm_groups=8,
        num_queries=10,
        num_attention_heads=4,
        dim_feedforward=64,
        decoder_layers=1,
        test_shortest_edge=64,
        test_longest_edge=96,
    )


def test_benchmark_cpu_vs_official_times_every_stage(tmp_path):
    script = load_script("benchmark_cpu_vs_official")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    result = script.bench("d1", warmup=0, runs=1, image=str(image), config=tiny_config())
    assert result["model_input_hw"] == [64, 85] and result["padded_hw"] == [64, 96]
    for stage in ("full", "network", "stage_backbone", "stage_pixel_decoder", "stage_transformer_decoder"):
        assert result[stage]["median_ms"] > 0, stage
