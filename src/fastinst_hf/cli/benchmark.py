"""`fastinst-hf benchmark`: per-stage latency (median / p90 ms) and FPS of a model on one image, batch size 1."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..inference.benchmark import benchmark, format_table
from ..inference.loading import load_model_and_processor
from ..inference.resolve import DEMO_IMAGE_DIR
from ..utils.device import select_device
from ..utils.errors import InputError
from ..utils.images import load_image
from .options import add_device_argument, add_model_argument


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "benchmark",
        help="time each stage of the model on one image",
        description="Per-stage latency (median / p90 ms) and FPS of a FastInst model on one image, batch size 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("--image", default=None, help="image file (default: the first bundled demo image)")
    add_device_argument(parser)
    parser.add_argument("--runs", type=int, default=10, help="timed runs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--fp16", action="store_true", help="forward pass under CUDA float16 autocast")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0:
        raise InputError(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    image_path = benchmark_image_path(args.image)
    try:
        image = load_image(image_path)
    except OSError as error:
        raise InputError(str(error)) from error
    device = select_device(args.device)
    if args.fp16 and device.type != "cuda":
        raise InputError("--fp16 needs a CUDA device (float16 autocast); use --device cuda or drop --fp16")
    model, processor, model_dir = load_model_and_processor(args.model, device)

    times = benchmark(model, processor, image, device, args.runs, args.warmup, args.fp16)
    input_size = tuple(processor(images=[image], return_tensors="pt")["pixel_values"].shape[-2:])
    config = model.config
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
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


def benchmark_image_path(image: str | None) -> Path:
    """`--image`, or the first bundled demo image."""
    if image is None:
        demos = sorted(DEMO_IMAGE_DIR.glob("*.png"))
        if not demos:
            raise InputError(f"no bundled demo image in {DEMO_IMAGE_DIR}; pass --image")
        return demos[0]
    path = Path(image)
    if not path.is_file():
        raise InputError(f"--image: file not found: {path}")
    return path
