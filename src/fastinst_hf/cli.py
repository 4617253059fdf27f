"""`fastinst-hf`: command line for FastInst instance segmentation.

    fastinst-hf predict photo.jpg images/ "shots/**/*.png" [--model NAME_OR_DIR] [--threshold 0.5]
                [--device auto|cpu|cuda] [--output ./fastinst_predictions] [--max-instances N]
    fastinst-hf evaluate --coco-json val.json --images val_images/ [--model NAME_OR_DIR] [--threshold 0]
    fastinst-hf benchmark [--model NAME_OR_DIR] [--image FILE] [--device auto] [--runs 10] [--warmup 3] [--fp16]
    fastinst-hf convert --checkpoint FILE.pth --variant fastinst-d1-r50 --output-dir DIR
    fastinst-hf train --train-json ... --train-images ... --output-dir runs/x [...]
    fastinst-hf export [--model NAME_OR_DIR] [--output model.onnx] [--height H --width W] [--static]

`--model` takes a folder written by `save_pretrained`/`convert`, an official release name (`fastinst-d3-r50`, ...:
downloaded and converted once into `~/.cache/fastinst_hf`), or a Hub repo id; without it the small default model
bundled with the package is used (trained on synthetic shapes, for trying the tool out: use an official variant for
real photos). See `fastinst_hf.hub_models`.

`train` passes every argument to `fastinst_hf.training.main` (`fastinst-hf train --help`). For data-parallel training
launch this module or the script with accelerate, e.g. `accelerate launch -m fastinst_hf.cli train ...` or
`accelerate launch scripts/train.py ...` (CPU-only machines: see `fastinst_hf.training`).

Exit status: 0 on success; 2 for bad arguments or inputs (missing file, empty folder, glob without images, wrong
model folder, unknown model, download failure, no CUDA device); 1 when `predict` could not read some of the images:
it names each one, goes on with the others and reports the count at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .io_utils import atomic_path, atomic_write_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
DEFAULT_OUTPUT_DIR = "fastinst_predictions"


class CliError(Exception):
    """A bad argument or input; `main` prints its message on one line and exits with status 2."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def collect_image_paths(sources: Sequence[str]) -> list[Path]:
    """Expand every SOURCE (image file, folder, or glob pattern) into image paths, in order, without opening them.

    A folder contributes its files with an image extension (not recursive), sorted by name; a glob pattern its
    matches with an image extension (`**` recurses). An explicitly named file is taken whatever its extension.
    Raises `CliError` for a missing file, a folder without images or a pattern without image matches.
    """
    paths: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(entry for entry in path.iterdir() if entry.is_file() and _is_image_name(entry.name))
            if not found:
                raise CliError(f"no images in folder {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(source):
            found = sorted(
                Path(match)
                for match in glob.glob(os.path.expanduser(source), recursive=True)
                if os.path.isfile(match) and _is_image_name(match)
            )
            if not found:
                raise CliError(f"no images match the pattern {source!r}")
        else:
            raise CliError(f"input not found: {source}")
        paths.extend(found)
    return paths


def load_image(path: Path):
    """The image at `path` as an RGB PIL image, EXIF orientation applied; raises `OSError` naming an unreadable file."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {_one_line(error)}") from error


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output stems per image; a repeated stem (same name in two folders) gets `-2`, `-3`, ... appended."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


# --------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------


def select_device(name: str):
    """`torch.device` for `--device` (`auto` picks CUDA when available); `CliError` if CUDA is asked but absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def load_model(name: str | None, device):
    """Resolve `--model`, load model (eval mode, on `device`) and image processor; returns (model, processor, dir)."""
    from .evaluate_model import processor_for_config
    from .hub_models import resolve_model
    from .image_processing_fastinst import FastInstImageProcessor
    from .modeling_fastinst import FastInstForInstanceSegmentation

    model_dir = resolve_model(name)
    try:
        model = FastInstForInstanceSegmentation.from_pretrained(model_dir)
        if (model_dir / "preprocessor_config.json").is_file():
            processor = FastInstImageProcessor.from_pretrained(model_dir)
        else:
            processor = processor_for_config(model.config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f"could not load the model in {model_dir}: {_one_line(error)}") from error
    return model.to(device).eval(), processor, model_dir


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------


def instances_to_records(masks, labels, scores, id2label) -> list[dict]:
    """JSON records of instances: label id and name, score, COCO RLE (str counts), bbox [x, y, w, h] and area."""
    import numpy as np
    import pycocotools.mask as mask_util

    records = []
    for index, (mask, label, score) in enumerate(zip(masks, labels, scores)):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        records.append(
            {
                "id": index,
                "label_id": int(label),
                "label": id2label.get(int(label), str(int(label))),
                "score": round(float(score), 6),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "area": int(mask_util.area(rle)),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            }
        )
    return records


def predict_image(model, processor, image, device, threshold: float, max_instances: int | None):
    """Segment one PIL image; returns (masks `(N, H, W)` bool numpy, labels, scores, stage times in ms)."""
    import torch

    from .benchmark import synchronize

    start = time.perf_counter()
    inputs = processor(images=[image], return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device)
    synchronize(device)
    preprocessed = time.perf_counter()
    with torch.inference_mode():
        outputs = model(pixel_values=pixel_values)
    synchronize(device)
    inferred = time.perf_counter()
    result = processor.post_process_instance_segmentation(
        outputs, threshold=threshold, target_sizes=[(image.height, image.width)], return_binary_maps=True
    )[0]
    infos = result["segments_info"][:max_instances]
    masks = result["segmentation"][: len(infos)].cpu().numpy()
    done = time.perf_counter()
    timings = {
        "preprocess": (preprocessed - start) * 1000,
        "inference": (inferred - preprocessed) * 1000,
        "postprocess": (done - inferred) * 1000,
    }
    return masks, [info["label_id"] for info in infos], [info["score"] for info in infos], timings


def run_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .visualize import draw_instances

    if not 0.0 <= args.threshold <= 1.0:
        raise CliError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.max_instances is not None and args.max_instances < 1:
        raise CliError(f"--max-instances must be >= 1, got {args.max_instances}")
    paths = collect_image_paths(args.sources)
    output_dir = Path(args.output)
    if output_dir.exists() and not output_dir.is_dir():
        raise CliError(f"--output {output_dir} exists and is not a folder")
    device = select_device(args.device)
    model, processor, model_dir = load_model(args.model, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    print(f"model: {model_dir}  device: {device}  images: {len(paths)}  output: {output_dir}")

    failures = []
    progress = tqdm(zip(paths, _unique_stems(paths)), total=len(paths), unit="img", disable=len(paths) < 2)
    for path, stem in progress:
        try:
            image = load_image(path)
        except OSError as error:
            failures.append(path)
            print(f"error: {error}", file=sys.stderr)
            continue
        masks, labels, scores, timings = predict_image(
            model, processor, image, device, args.threshold, args.max_instances
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
        with atomic_path(output_dir / f"{stem}_overlay.png") as temporary:
            overlay.save(temporary, format="PNG")
        atomic_write_text(output_dir / f"{stem}.json", json.dumps(record, indent=1))
        tqdm.write(
            f"{path}: {len(labels)} instances | preprocess {timings['preprocess']:.1f} ms | "
            f"inference {timings['inference']:.1f} ms | postprocess {timings['postprocess']:.1f} ms",
            file=sys.stdout,
        )
    written = len(paths) - len(failures)
    print(f"wrote {written} overlay(s) and JSON file(s) to {output_dir}")
    if failures:
        print(
            f"error: {len(failures)} of {len(paths)} image(s) could not be read: {', '.join(map(str, failures))}",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# evaluate, export
# --------------------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace) -> int:
    from . import evaluate_model
    from .hub_models import resolve_model

    if not Path(args.coco_json).is_file():
        raise CliError(f"--coco-json: file not found: {args.coco_json}")
    if not Path(args.images).is_dir():
        raise CliError(f"--images: folder not found: {args.images}")
    select_device(args.device)
    model_dir = resolve_model(args.model)
    return evaluate_model.main(
        [
            "--model",
            str(model_dir),
            "--coco-json",
            args.coco_json,
            "--images",
            args.images,
            "--threshold",
            str(args.threshold),
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
        ]
    )


def run_export(args: argparse.Namespace) -> int:
    import torch

    from .hub_models import resolve_model
    from .modeling_fastinst import FastInstForInstanceSegmentation
    from .onnx_export import export_onnx

    model_dir = resolve_model(args.model)
    model = FastInstForInstanceSegmentation.from_pretrained(model_dir).eval()
    config = model.config
    # Default example input: the model's test size, rounded up to the padded size.
    height = args.height or -(-config.test_shortest_edge // 32) * 32
    width = args.width or -(-config.test_longest_edge // 32) * 32
    if height % 32 or width % 32:
        raise CliError(f"--height and --width must be multiples of 32, got {height}x{width}")
    with torch.no_grad():
        path = export_onnx(model, args.output, height=height, width=width, dynamic=not args.static)
    shape = f"1x3x{height}x{width}" if args.static else "Bx3xHxW (H, W multiples of 32)"
    print(f"wrote {path} (input pixel_values {shape}; outputs class_queries_logits, masks_queries_logits)")
    return 0


# --------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------


def _forward_convert(argv: list[str]) -> int:
    from .convert_fastinst import main as convert_main

    return convert_main(argv)


def _forward_train(argv: list[str]) -> int:
    from .training import main as train_main

    return train_main(argv)


def _forward_benchmark(argv: list[str]) -> int:
    from .benchmark import main as benchmark_main

    return benchmark_main(argv)


# Subcommands whose own parsers take every argument after the subcommand name.
FORWARDED = {"convert": _forward_convert, "train": _forward_train, "benchmark": _forward_benchmark}


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, official variant name (e.g. fastinst-d3-r50) or Hub repo id "
        "(default: the bundled demo model trained on synthetic shapes)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastinst-hf",
        description="FastInst real-time instance segmentation (Hugging Face transformers port).",
        epilog="Run `fastinst-hf COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="segment images; writes <stem>_overlay.png and <stem>.json per image",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    predict.add_argument("sources", nargs="+", metavar="SOURCE", help="image file, folder, or quoted glob pattern")
    _add_model_argument(predict)
    predict.add_argument("--threshold", type=float, default=0.5, help="minimum instance score")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--output", default=DEFAULT_OUTPUT_DIR, help="output folder")
    predict.add_argument("--max-instances", type=int, default=None, help="keep at most this many per image")
    predict.set_defaults(handler=run_predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="COCO mask AP and per-image time on a COCO-format dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_argument(evaluate)
    evaluate.add_argument("--coco-json", required=True, help="COCO instances JSON with the ground truth")
    evaluate.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    evaluate.add_argument("--threshold", type=float, default=0.0, help="minimum instance score (0 = upstream AP)")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.set_defaults(handler=run_evaluate)

    commands.add_parser("benchmark", add_help=False, help="time each stage of the model (see `benchmark --help`)")
    commands.add_parser("convert", add_help=False, help="convert an official checkpoint (see `convert --help`)")
    commands.add_parser(
        "train",
        add_help=False,
        help="train on a COCO-format dataset (see `train --help`; `accelerate launch -m fastinst_hf.cli train ...` "
        "for data-parallel)",
    )
    export = commands.add_parser(
        "export",
        help="export the model to ONNX (dynamic batch, height and width)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_argument(export)
    export.add_argument("--output", default="fastinst.onnx", help="ONNX file to write")
    export.add_argument("--height", type=int, default=None, help="example input height (default: padded test size)")
    export.add_argument("--width", type=int, default=None, help="example input width (default: padded test size)")
    export.add_argument("--static", action="store_true", help="fix the input to 1x3xHEIGHTxWIDTH")
    export.set_defaults(handler=run_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fastinst-hf`; returns the exit status."""
    from .hub_models import ModelResolutionError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return FORWARDED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CliError, ModelResolutionError) as error:
        print(f"fastinst-hf {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
