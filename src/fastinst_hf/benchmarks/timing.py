"""Timing helpers shared by the benchmarks: the official input normalisation, run summaries and line-driven worker
processes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import torch
from torch.nn import functional as F


def summarise(times_ms: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "runs_ms": [round(t, 3) for t in times_ms],
    }


class StepWorker:
    """A worker process that prints one JSON line when ready (`info`) and one per line it reads (`measure()`)."""

    def __init__(self, command: list[str], cwd: str | None = None, environment: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            command, cwd=cwd, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker process {self.process.args[:3]} ended (exit status {self.process.wait()})")
        return json.loads(line)

    def measure(self) -> dict[str, float]:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def official_process(parity_root: str, driver: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run `driver` with the Python of the environment that
    `shared/tools/official_parity/setup_official.sh` built under `parity_root` (detectron2 never enters this
    process); run it with the parity tools folder as working directory."""
    python = Path(parity_root) / "venv" / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"no official environment at {parity_root} (expected {python})")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["PARITY_ROOT"] = str(parity_root)
    return [str(python), "-W", "ignore", "-c", driver, *args], environment


# ImageNet mean / std on 0-255 values, as the official model normalises its input.
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def normalise_and_pad(images: torch.Tensor, size_divisibility: int = 32) -> torch.Tensor:
    """`(B, 3, H, W)` 0-255 float -> normalised, zero-padded at the bottom/right to a multiple of 32."""
    images = (images - PIXEL_MEAN.to(images.device)) / PIXEL_STD.to(images.device)
    height, width = images.shape[-2:]
    pad_h = -(-height // size_divisibility) * size_divisibility - height
    pad_w = -(-width // size_divisibility) * size_divisibility - width
    return F.pad(images, (0, pad_w, 0, pad_h))
