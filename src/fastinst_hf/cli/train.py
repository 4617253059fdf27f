"""`fastinst-hf train`: train on a COCO-format dataset (see `fastinst_hf.training.loop` for the recipe and the run
folder). Data-parallel: `accelerate launch -m fastinst_hf.cli train ...`."""

from __future__ import annotations

import argparse

from ..training.arguments import DESCRIPTION, add_arguments, validate_args
from ..training.loop import train
from ..utils.arguments import HelpFormatter


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train on a COCO-format dataset (`accelerate launch -m fastinst_hf.cli train ...` for data-parallel)",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    train(validate_args(args))
    return 0
