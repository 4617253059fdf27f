"""`fastinst-hf predict`: segment images; writes `<stem>_overlay.png` and `<stem>.json` per image.

Exit status 1 when some images could not be read: each is named, the others are still processed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..inference.levers import OnnxRuntimeModel
from ..inference.loading import load_model_and_processor
from ..inference.predict import instances_to_records, predict_image
from ..utils.arguments import HelpFormatter
from ..utils.device import select_device
from ..utils.errors import InputError
from ..utils.files import atomic_path, atomic_write_text
from ..utils.images import collect_image_paths, load_image, unique_stems
from ..utils.visualize import draw_instances
from .options import add_device_argument, add_model_argument

DEFAULT_OUTPUT_DIR = "fastinst_predictions"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "predict",
        help="segment images; writes <stem>_overlay.png and <stem>.json per image",
        description="Segment images; writes <stem>_overlay.png and <stem>.json per image.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="image file, folder, or quoted glob pattern")
    add_model_argument(parser)
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum instance score")
    add_device_argument(parser)
    parser.add_argument("--output", default=DEFAULT_OUTPUT_DIR, help="output folder")
    parser.add_argument("--max-instances", type=int, default=None, help="keep at most this many per image")
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="onnxruntime: export the model to ONNX once (about a minute) and run it with onnxruntime (CPU)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.max_instances is not None and args.max_instances < 1:
        raise InputError(f"--max-instances must be >= 1, got {args.max_instances}")
    paths = collect_image_paths(args.sources)
    output_dir = Path(args.output)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output {output_dir} exists and is not a folder")
    device = select_device(args.device)
    model, processor, model_dir = load_model_and_processor(args.model, device)
    if args.runtime == "onnxruntime":
        if device.type != "cpu":
            raise InputError("--runtime onnxruntime runs on the CPU; use --device cpu")
        model = OnnxRuntimeModel.from_model(model)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"model: {model_dir}  device: {device}  images: {len(paths)}  output: {output_dir}")

    failures = []
    progress = tqdm(zip(paths, unique_stems(paths)), total=len(paths), unit="img", disable=len(paths) < 2)
    for path, stem in progress:
        try:
            image = load_image(path)
        except OSError as error:
            failures.append(path)
            print(f"error: {error}", file=sys.stderr)
            continue
        record = segment_and_write(model, processor, model_dir, image, path, output_dir / stem, args)
        timings = record["timing_ms"]
        tqdm.write(
            f"{path}: {len(record['instances'])} instances | preprocess {timings['preprocess']:.1f} ms | "
            f"inference {timings['inference']:.1f} ms | postprocess {timings['postprocess']:.1f} ms",
            file=sys.stdout,
        )
    print(f"wrote {len(paths) - len(failures)} overlay(s) and JSON file(s) to {output_dir}")
    if failures:
        print(
            f"error: {len(failures)} of {len(paths)} image(s) could not be read: {', '.join(map(str, failures))}",
            file=sys.stderr,
        )
        return 1
    return 0


def segment_and_write(model, processor, model_dir: Path, image, path: Path, output_stem: Path, args) -> dict:
    """Segment `image`, write `<output_stem>_overlay.png` and `<output_stem>.json` atomically; returns the record."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    masks, labels, scores, timings = predict_image(
        model, processor, image, model.device, args.threshold, args.max_instances
    )
    overlay = draw_instances(image, masks, labels, scores, id2label)
    record = {
        "image": str(path),
        "width": image.width,
        "height": image.height,
        "model": str(model_dir),
        "threshold": args.threshold,
        "timing_ms": {name: round(value, 3) for name, value in timings.items()},
        "instances": instances_to_records(masks, labels, scores, id2label),
    }
    with atomic_path(output_stem.with_name(f"{output_stem.name}_overlay.png")) as temporary:
        overlay.save(temporary, format="PNG")
    atomic_write_text(output_stem.with_name(f"{output_stem.name}.json"), json.dumps(record, indent=1))
    return record
