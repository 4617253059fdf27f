"""`fastinst-hf predict`: segment images; writes `<stem>_overlay.png` and `<stem>.json` per image.

Exit status 1 when some images could not be read or segmented: each is named, the others are still processed.
The output folder is checked before the model is loaded; a write error (read-only folder, full disk) ends the run
with a one-line error naming the file. Ctrl-C ends it with a one-line summary (exit 130); the files written until
then are complete (atomic writes). A closed stdout (`... | head -1`) silences the progress lines, and the images
are still written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from ..inference.levers import OnnxRuntimeModel, OpenVinoModel, cached_graph, prepare_for_inference
from ..inference.loading import load_model_and_processor
from ..inference.predict import instances_to_records, predict_images
from ..inference.resolve import cache_root
from ..utils.arguments import HelpFormatter
from ..utils.device import select_device
from ..utils.errors import InputError, one_line
from ..utils.files import atomic_path, atomic_write_text, check_output_folder
from ..utils.images import collect_image_paths, load_image, unique_stems
from ..utils.visualize import draw_instances
from .options import add_device_argument, add_model_argument

GRAPH_RUNTIMES = {"onnxruntime": OnnxRuntimeModel, "openvino": OpenVinoModel}

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
        "--batch-size", type=int, default=1, help="images per forward pass (results are those of batch size 1)"
    )
    parser.add_argument(
        "--runtime",
        choices=("torch", "eager", *GRAPH_RUNTIMES),
        default="torch",
        help="torch: PyTorch with the batch norms folded into the convolutions (and channels_last on CPU), the "
        "fastest torch path in `fastinst-hf benchmark`; eager: the model exactly as loaded; onnxruntime / openvino "
        "(optional package): the model's ONNX graph on the CPU, exported once per model (about a minute) under the "
        "cache root ($FASTINST_HF_CACHE, else ~/.cache/fastinst_hf)/onnx",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.max_instances is not None and args.max_instances < 1:
        raise InputError(f"--max-instances must be >= 1, got {args.max_instances}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.runtime in GRAPH_RUNTIMES and importlib.util.find_spec(args.runtime) is None:
        raise InputError(f"--runtime {args.runtime}: the package {args.runtime} is not installed")
    paths = collect_image_paths(args.sources)
    output_dir = check_output_folder(args.output, "--output")
    device = select_device(args.device)
    model, processor, model_dir = load_model_and_processor(args.model, device)
    if args.runtime in GRAPH_RUNTIMES:
        if device.type != "cpu":
            raise InputError(f"--runtime {args.runtime} runs on the CPU; use --device cpu")
        model = GRAPH_RUNTIMES[args.runtime](cached_graph(model, cache_root() / "onnx"), config=model.config)
    elif args.runtime == "torch":
        model = prepare_for_inference(model, fold_norms=True, channels_last=device.type == "cpu")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--output: cannot create {output_dir}: {error.strerror or one_line(error)}") from error
    echo(f"model: {model_dir}  device: {device}  images: {len(paths)}  output: {output_dir}")

    failures: list[Path] = []
    written = 0
    jobs = list(zip(paths, unique_stems(paths)))
    progress = tqdm(total=len(paths), unit="img", disable=len(paths) < 2)
    try:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            for _ in predict_and_write(model, processor, model_dir, batch, output_dir, args, failures):
                written += 1
            progress.update(len(batch))
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: wrote {written} of {len(paths)} image(s) to {output_dir}", file=sys.stderr)
        return 130
    progress.close()
    echo(f"wrote {written} overlay(s) and JSON file(s) to {output_dir}")
    if failures:
        print(
            f"error: {len(failures)} of {len(paths)} image(s) could not be read or segmented: "
            f"{', '.join(map(str, failures))}",
            file=sys.stderr,
        )
        return 1
    return 0


def predict_and_write(
    model, processor, model_dir: Path, batch, output_dir: Path, args, failures: list
) -> Iterator[Path]:
    """Read, segment and write the `(path, stem)` pairs of `batch`, yielding each path once its files are written;
    unreadable or unsegmentable images are named on stderr and added to `failures`."""
    loaded = []
    for path, stem in batch:
        try:
            loaded.append((path, stem, load_image(path)))
        except OSError as error:
            failures.append(path)
            tqdm.write(f"error: {error}", file=sys.stderr)
    if not loaded:
        return
    images = [image for _, _, image in loaded]
    try:
        results, timings = predict_images(model, processor, images, model.device, args.threshold, args.max_instances)
    except (ValueError, RuntimeError) as error:  # e.g. out of memory on a huge image: the next batch may fit
        failures.extend(path for path, _, _ in loaded)
        tqdm.write(
            f"error: cannot segment {', '.join(str(p) for p, _, _ in loaded)}: {one_line(error)}", file=sys.stderr
        )
        return
    for (path, stem, image), (masks, labels, scores) in zip(loaded, zip(*results)):
        record = write_outputs(model, model_dir, image, path, output_dir / stem, masks, labels, scores, timings, args)
        yield path  # counted at once: a Ctrl-C while printing must not leave written files out of the summary
        echo(
            f"{path}: {len(record['instances'])} instances | preprocess {timings['preprocess']:.1f} ms | "
            f"inference {timings['inference']:.1f} ms | postprocess {timings['postprocess']:.1f} ms"
        )


def write_outputs(model, model_dir, image, path, output_stem: Path, masks, labels, scores, timings, args) -> dict:
    """Write `<output_stem>_overlay.png` and `<output_stem>.json` atomically; returns the JSON record. A write error
    becomes an `InputError` naming the file."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
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
    overlay_path = output_stem.with_name(f"{output_stem.name}_overlay.png")
    json_path = output_stem.with_name(f"{output_stem.name}.json")
    target = overlay_path
    try:
        with atomic_path(overlay_path) as temporary:
            overlay.save(temporary, format="PNG")
        target = json_path
        atomic_write_text(json_path, json.dumps(record, indent=1))
    except OSError as error:
        raise InputError(f"cannot write {target}: {error.strerror or one_line(error)}") from error
    return record


def echo(text: str) -> None:
    """Print a progress line on stdout; once stdout is closed (`| head -1`), send it and later lines nowhere."""
    try:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice: point stdout at devnull so that the final flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
