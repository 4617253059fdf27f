"""`fastinst-hf convert`: an official FastInst checkpoint to a transformers folder (config, safetensors, processor,
model card, code files)."""

from __future__ import annotations

import argparse

from ..utils.arguments import HelpFormatter
from ..utils.files import check_output_folder
from .options import VARIANT_NAMES, check_file, check_repo_id


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "convert",
        description="Convert an official FastInst checkpoint to a transformers folder.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="official .pth file (detectron2 checkpoint or state dict)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="upstream config YAML (its _BASE_ is followed) or a detectron2 cfg dump")
    source.add_argument("--variant", choices=VARIANT_NAMES, help="one of the five released COCO models")
    parser.add_argument("--output-dir", required=True, help="folder to write config.json and model.safetensors to")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also push model, processor and model card here")
    parser.set_defaults(run=run)


def validate(args: argparse.Namespace) -> None:
    check_file(args.checkpoint, "--checkpoint")
    check_file(args.config, "--config")
    check_output_folder(args.output_dir, "--output-dir")
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)


def run(args: argparse.Namespace) -> int:
    from ..conversion.official import convert_checkpoint, save_converted

    model = convert_checkpoint(args.checkpoint, config_file=args.config, variant=args.variant)
    output_dir = save_converted(model, args.output_dir, args.push_to_hub, variant=args.variant)
    num_values = sum(t.numel() for t in model.state_dict().values())
    print(f"converted {args.checkpoint} ({num_values / 1e6:.2f}M values) -> {output_dir}")
    return 0
