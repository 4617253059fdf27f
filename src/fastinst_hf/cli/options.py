"""Options shared by several commands."""

import argparse


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, official variant name (e.g. fastinst-d3-r50) or Hub repo id "
        "(default: the bundled demo model trained on synthetic shapes)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
