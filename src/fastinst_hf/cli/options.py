"""Options shared by several commands."""

import argparse

from ..inference.resolve import DEFAULT_NAME


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_NAME,
        help="model folder, official variant name (e.g. fastinst-d3-r50), Hub repo id, or 'default': the demo model "
        "bundled with the package, trained on synthetic shapes (default: %(default)s)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs; auto: the first CUDA GPU when there is one, else the CPU (default: %(default)s)",
    )
