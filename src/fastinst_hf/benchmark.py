"""Per-stage latency of a FastInst model on one image at the model's test size.

Stages: preprocess (image processor: resize, normalise, pad, copy to the device), backbone, pixel decoder
(PPM-FPN), decoder + heads (query proposal, dual-path decoder and prediction heads: the rest of the forward pass),
postprocess (instance inference to masks at the image size) and total (all of them, end to end). The backbone and
pixel-decoder times come from forward hooks on `model.model.backbone` and `model.model.pixel_decoder`; on CUDA every
boundary synchronises the device, so the stage times add up to the measured forward time.

    fastinst-hf benchmark [--model NAME_OR_DIR] [--image FILE] [--device auto] [--runs 10] [--warmup 3] [--fp16]
    python scripts/benchmark.py ...   (same options)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

STAGES = ("preprocess", "backbone", "pixel decoder", "decoder + heads", "postprocess", "total")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, so wall-clock times need it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastinst-hf benchmark",
        description="Per-stage latency (median / p90 ms) and FPS of a FastInst model on one image, batch size 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help="model folder, official variant name or Hub repo id (default: bundled model)"
    )
    parser.add_argument("--image", default=None, help="image file (default: the first bundled demo image)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--runs", type=int, default=10, help="timed runs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--fp16", action="store_true", help="forward pass under CUDA float16 autocast")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fastinst-hf benchmark` and `scripts/benchmark.py`; returns the exit status."""
    from .cli import CliError, _one_line, load_image, load_model, select_device
    from .hub_models import DEMO_IMAGE_DIR, ModelResolutionError

    args = build_parser().parse_args(argv)
    try:
        if args.runs < 1 or args.warmup < 0:
            raise CliError(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
        if args.image is None:
            demos = sorted(DEMO_IMAGE_DIR.glob("*.png"))
            if not demos:
                raise CliError(f"no bundled demo image in {DEMO_IMAGE_DIR}; pass --image")
            image_path = demos[0]
        else:
            image_path = Path(args.image)
            if not image_path.is_file():
                raise CliError(f"--image: file not found: {image_path}")
        image = load_image(image_path)
        device = select_device(args.device)
        if args.fp16 and device.type != "cuda":
            raise CliError("--fp16 needs a CUDA device (float16 autocast); use --device cuda or drop --fp16")
        model, processor, model_dir = load_model(args.model, device)
    except (CliError, ModelResolutionError, OSError) as error:
        print(f"fastinst-hf benchmark: error: {_one_line(error)}", file=sys.stderr)
        return 2

    times = benchmark(model, processor, image, device, args.runs, args.warmup, args.fp16)
    input_size = tuple(processor(images=[image], return_tensors="pt")["pixel_values"].shape[-2:])
    config = model.config
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{torch.get_num_threads()} CPU threads"
    print(f"model: {model_dir}")
    print(
        f"image: {image_path} ({image.width}x{image.height}) -> padded input {input_size[1]}x{input_size[0]} "
        f"(test size: short side {config.test_shortest_edge}, long side <= {config.test_longest_edge})"
    )
    print(
        f"device: {device} ({hardware}), torch {torch.__version__}, "
        f"{'float16 autocast' if args.fp16 else 'float32'}, batch size 1, {args.runs} runs after {args.warmup} warm-up"
    )
    print(format_table(times))
    return 0
