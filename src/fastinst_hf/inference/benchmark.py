"""Per-stage latency of a FastInst model on one image at the model's test size.

Stages: preprocess (image processor: resize, normalise, pad, copy to the device), backbone, pixel decoder
(PPM-FPN), decoder + heads (query proposal, dual-path decoder and prediction heads: the rest of the forward pass),
postprocess (instance inference to masks at the image size) and total (all of them, end to end). The backbone and
pixel-decoder times come from forward hooks on `model.model.backbone` and `model.model.pixel_decoder`; on CUDA every
boundary synchronises the device, so the stage times add up to the measured forward time.

Command line: `fastinst-hf benchmark` (`fastinst_hf.cli.benchmark`) and `scripts/benchmark.py`.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..utils.device import synchronize

STAGES = ("preprocess", "backbone", "pixel decoder", "decoder + heads", "postprocess", "total")


class _StageTimer:
    """Forward hooks that record the wall-clock time spent inside a submodule (device synchronised at both ends)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.elapsed = 0.0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, module, args) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        synchronize(self.device)
        self.elapsed = time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.inference_mode()
def benchmark(
    model, processor, image, device: torch.device, runs: int = 10, warmup: int = 3, fp16: bool = False
) -> dict[str, list[float]]:
    """Time every stage `runs` times after `warmup` untimed runs; returns the times in ms per stage (see `STAGES`).

    `fp16` runs the forward pass under CUDA autocast (float16); pre- and post-processing stay in float32.
    """
    model.eval().to(device)
    timers = {
        "backbone": _StageTimer(model.model.backbone, device),
        "pixel decoder": _StageTimer(model.model.pixel_decoder, device),
    }
    autocast = torch.autocast("cuda", dtype=torch.float16) if fp16 else contextlib.nullcontext()
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}

    try:
        for run in range(warmup + runs):
            synchronize(device)
            start = time.perf_counter()
            pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"].to(device)
            synchronize(device)
            preprocessed = time.perf_counter()
            with autocast:
                outputs = model(pixel_values=pixel_values)
            synchronize(device)
            forwarded = time.perf_counter()
            processor.post_process_instance_segmentation(
                outputs, threshold=0.5, target_sizes=[(image.height, image.width)], return_binary_maps=True
            )
            synchronize(device)
            end = time.perf_counter()
            if run < warmup:
                continue
            backbone, pixel_decoder = timers["backbone"].elapsed, timers["pixel decoder"].elapsed
            for stage, seconds in (
                ("preprocess", preprocessed - start),
                ("backbone", backbone),
                ("pixel decoder", pixel_decoder),
                ("decoder + heads", forwarded - preprocessed - backbone - pixel_decoder),
                ("postprocess", end - forwarded),
                ("total", end - start),
            ):
                times[stage].append(seconds * 1000)
    finally:
        for timer in timers.values():
            timer.remove()
    return times


def format_table(times: dict[str, list[float]]) -> str:
    """Median and 90th-percentile ms per stage, and the FPS of the median total."""
    lines = [f"{'stage':<16} {'median ms':>10} {'p90 ms':>10}"]
    for stage in STAGES:
        values = np.asarray(times[stage])
        lines.append(f"{stage:<16} {np.median(values):10.2f} {np.percentile(values, 90):10.2f}")
    median_total = float(np.median(times["total"]))
    lines.append(f"FPS (1000 / median total): {1000.0 / median_total:.1f}")
    return "\n".join(lines)
