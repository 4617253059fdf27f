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


# Idle thread pools must sleep, not spin: a timed process otherwise shares its cores with the spinning pools of the
# processes waiting for their turn (measured: the official model 1.3-1.4x slower next to our idle process).
# libgomp (torch's OpenMP) and Intel's OpenMP read these when they load, so they must be set before torch is imported.
PASSIVE_THREADS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def isolated_environment(environment: dict[str, str] | None = None) -> dict[str, str]:
    """`environment` (default: this process's) with `PASSIVE_THREADS` set: what every timed process runs with."""
    return {**(os.environ if environment is None else environment), **PASSIVE_THREADS}


def threads_are_passive() -> bool:
    """Whether this process was started with `PASSIVE_THREADS` (its OpenMP pool sleeps when idle)."""
    return all(os.environ.get(key) == value for key, value in PASSIVE_THREADS.items())


class StepWorker:
    """A worker process that prints one JSON line when ready (`info`) and one per line it reads (`measure()`); its
    environment always carries `PASSIVE_THREADS`, so it sleeps while another process is timed."""

    def __init__(self, command: list[str], cwd: str | None = None, environment: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=isolated_environment(environment),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker process {self.process.args[:3]} ended (exit status {self.process.wait()})")
        return json.loads(line)

    def measure(self, command: str = "") -> dict:
        """One step: the worker's JSON answer to the line `command` (empty: a timed step)."""
        self.process.stdin.write(command + "\n")
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
