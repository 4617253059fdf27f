"""`fastinst-hf export`: the model as ONNX (dynamic batch, height and width by default)."""

from __future__ import annotations

import argparse

from ..utils.arguments import HelpFormatter
from ..utils.errors import InputError, one_line
from ..utils.files import check_output_file
from .options import add_model_argument


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export",
        description="Export a FastInst model to ONNX; the instance post-processing stays in Python.",
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("--output", default="fastinst.onnx", help="ONNX file to write")
    parser.add_argument("--height", type=int, default=None, help="example input height (default: padded test size)")
    parser.add_argument("--width", type=int, default=None, help="example input width (default: padded test size)")
    parser.add_argument("--static", action="store_true", help="fix the input to 1x3xHEIGHTxWIDTH")
    parser.set_defaults(run=run)


def validate(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 32):
            raise InputError(f"--{name} must be a positive multiple of 32, got {value}")
    check_output_file(args.output, "--output")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..inference.loading import load_model_and_processor
    from ..inference.onnx_export import export_onnx

    model, _, _ = load_model_and_processor(args.model)
    config = model.config
    # Default example input: the model's test size, rounded up to the padded size.
    height = args.height or -(-config.test_shortest_edge // 32) * 32
    width = args.width or -(-config.test_longest_edge // 32) * 32
    with torch.no_grad():
        try:
            path = export_onnx(model, args.output, height=height, width=width, dynamic=not args.static)
        except OSError as error:
            raise InputError(f"--output: cannot write {args.output}: {error.strerror or one_line(error)}") from error
    shape = f"1x3x{height}x{width}" if args.static else "Bx3xHxW (H, W multiples of 32)"
    print(f"wrote {path} (input pixel_values {shape}; outputs class_queries_logits, masks_queries_logits)")
    return 0
