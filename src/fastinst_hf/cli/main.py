"""`fastinst-hf`: command line for FastInst instance segmentation.

    fastinst-hf predict photo.jpg images/ "shots/**/*.png" [--model NAME_OR_DIR] [--threshold 0.5]
                [--device auto|cpu|cuda] [--output ./fastinst_predictions] [--max-instances N]
    fastinst-hf evaluate --coco-json val.json --images val_images/ [--model NAME_OR_DIR] [--threshold 0]
    fastinst-hf benchmark [--variant fastinst-d1-r50 | --model NAME_OR_DIR] [--runtimes eager,folded,...] [--json OUT]
    fastinst-hf convert --checkpoint FILE.pth --variant fastinst-d1-r50 --output-dir DIR
    fastinst-hf train --train-json ... --train-images ... --output-dir runs/x [...]
    fastinst-hf export [--model NAME_OR_DIR] [--output model.onnx] [--height H --width W] [--static]

`--model` takes a folder written by `save_pretrained`/`convert`, an official release name (`fastinst-d3-r50`, ...:
downloaded and converted once into `~/.cache/fastinst_hf`), or a Hub repo id; without it the small default model
bundled with the package is used (trained on synthetic shapes, for trying the tool out: use an official variant for
real photos). See `fastinst_hf.inference.resolve`.

Each command lives in its own module (`add_parser(commands)` + `run(args)`); `main` parses, dispatches, and is the
one place where errors become exit codes. Exit status: 0 on success; 2 for bad arguments or inputs (`InputError`:
missing file, empty folder, glob without images, wrong model folder, unknown model, download failure, no CUDA
device, invalid option value, unwritable output, broken model folder or dataset); 1 when `predict` could not read or
segment some of the images: it names each one, goes on with the others and reports the count at the end; 130 when
`predict` is interrupted with Ctrl-C (it says how many images were written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..utils.errors import InputError, one_line
from . import benchmark, convert, demo, evaluate, export, predict, train

COMMANDS = (predict, evaluate, benchmark, convert, train, export, demo)


def version_line() -> str:
    """What `--version` prints: this package's version and those of the libraries that decide its numerics."""
    import torch
    import transformers

    return f"fastinst-hf {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastinst-hf",
        description="FastInst real-time instance segmentation (Hugging Face transformers port).",
        epilog="Run `fastinst-hf COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fastinst-hf`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as error:
        print(f"fastinst-hf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
