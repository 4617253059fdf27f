"""`fastinst-hf`: command line for FastInst instance segmentation.

    fastinst-hf predict photo.jpg images/ "shots/**/*.png" [--model NAME_OR_DIR] [--threshold 0.5]
                [--device auto|cpu|cuda] [--output ./fastinst_predictions] [--max-instances N]
    fastinst-hf evaluate --coco-json val.json --images val_images/ [--model NAME_OR_DIR] [--iou-type segm|boundary]
    fastinst-hf benchmark [--variant fastinst-d1-r50 | --model NAME_OR_DIR] [--runtimes eager,folded,...] [--json OUT]
    fastinst-hf convert --checkpoint FILE.pth --variant fastinst-d1-r50 --output-dir DIR
    fastinst-hf train --train-json ... --train-images ... --output-dir runs/x [...]
    fastinst-hf export [--model NAME_OR_DIR] [--output model.onnx] [--height H --width W] [--static]
    fastinst-hf info [MODEL | --variant NAME]

`--model` takes a folder written by `save_pretrained`/`convert`, an official release name (`fastinst-d3-r50`, ...:
downloaded and converted once into `~/.cache/fastinst_hf`), or a Hub repo id; without it the small default model
bundled with the package is used (trained on synthetic shapes, for trying the tool out: use an official variant for
real photos). See `fastinst_hf.inference.resolve`.

Each command is the module `fastinst_hf.cli.<command>`, imported only when that command is run:
- `add_parser(commands)` declares its options; the module imports only light things at module level (argparse, the
  standard library, `cli.options`, `utils.arguments`, `utils.errors`, `utils.files`), so `--help` is instant;
- `validate(args)` (optional) checks every option value and path that argparse's `type`/`choices` do not, raising
  `InputError` naming the option; it imports nothing heavy and writes nothing;
- `run(args)` imports torch, transformers and the model code it needs, may refuse more inputs (`InputError`) before
  its work starts, and returns the exit status.
`main` parses, calls `validate`, registers the model with transformers, calls `run`, and is the one place where errors
become exit codes. Exit status: 0 on success; 2 for bad arguments or inputs (`InputError`: missing file, empty folder,
glob without images, wrong model folder, unknown model, download failure, no CUDA device, invalid option value,
unwritable output, broken model folder or dataset); 1 when `predict` could not read or segment some of the images:
it names each one, goes on with the others and reports the count at the end; 130 when `predict` is interrupted with
Ctrl-C (it says how many images were written).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__, register_auto_classes
from ..utils.errors import InputError, one_line

# The commands and their one-line summaries for `fastinst-hf --help`, in that order.
COMMANDS = {
    "predict": "segment images, videos, URLs and webcams; writes overlays and JSON / JSONL",
    "evaluate": "COCO mask AP (or Boundary AP) and per-image time on a COCO-format dataset",
    "benchmark": "time runtimes and precisions side by side",
    "convert": "convert an official checkpoint to a transformers folder",
    "train": "train on a COCO-format dataset (`accelerate launch -m fastinst_hf.cli train ...` for data-parallel)",
    "export": "export the model to ONNX (dynamic batch, height and width)",
    "info": "parameters, FLOPs, input size, classes, backbone and origin of a model",
    "demo": "the Gradio demo app: images, videos and the webcam in the browser",
}


def version_line() -> str:
    """What `--version` prints: this package's version and those of the libraries that decide its numerics."""
    import torch
    import transformers

    return f"fastinst-hf {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


class VersionAction(argparse.Action):
    """`--version`, importing torch and transformers only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def command_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the commands only the one named in `argv` (the first word not starting with "-") is imported
    and gets its options, the others are listed with their summaries."""
    parser = argparse.ArgumentParser(
        prog="fastinst-hf",
        description="FastInst real-time instance segmentation (Hugging Face transformers port).",
        epilog="Run `fastinst-hf COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action=VersionAction, help="show the versions of fastinst-hf, torch, transformers")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, summary in COMMANDS.items():
        if name == chosen:
            command_module(name).add_parser(commands)
        else:
            commands.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fastinst-hf`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        validate = getattr(command_module(args.command), "validate", None)
        if validate is not None:
            validate(args)
        register_auto_classes()
        return args.run(args)
    except InputError as error:
        print(f"fastinst-hf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
