"""Options shared by several commands, and the checks of their values. Light: nothing here imports torch."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..utils.errors import InputError, one_line

# The names of `releases.VARIANTS` (tests/test_cli.py keeps them equal), for the choices and help texts
# of the parsers, which must not import transformers.
VARIANT_NAMES = (
    "fastinst-d1-r50",
    "fastinst-d1-r50-vd-dcn",
    "fastinst-d3-r101",
    "fastinst-d3-r50",
    "fastinst-d3-r50-vd-dcn",
)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, official variant name (e.g. fastinst-d3-r50), Hub repo id, or 'default' (the default): "
        "the demo model bundled with the package, trained on synthetic shapes",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs; auto: the first CUDA GPU when there is one, else the CPU (default: %(default)s)",
    )


def option_name(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


def check_file(path: str | None, option: str) -> None:
    """`path` (when given) is an existing file."""
    if path is not None and not Path(path).is_file():
        raise InputError(f"{option}: file not found: {path}")


def check_folder(path: str | None, option: str) -> None:
    """`path` (when given) is an existing folder."""
    if path is not None and not Path(path).is_dir():
        raise InputError(f"{option}: folder not found: {path}")


def check_at_least(args: argparse.Namespace, minimum: int, *dests: str) -> None:
    """Each of the options `dests` (when given) is >= `minimum`."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < minimum:
            raise InputError(f"{option_name(dest)} must be >= {minimum}, got {value}")


def check_fraction(args: argparse.Namespace, *dests: str) -> None:
    """Each of the options `dests` is a number in [0, 1]."""
    for dest in dests:
        value = getattr(args, dest)
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise InputError(f"{option_name(dest)} must be in [0, 1], got {value}")


def check_finite(args: argparse.Namespace, *dests: str) -> None:
    """Each of the options `dests` (when given) is a finite number (argparse's float() accepts nan and inf)."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and not math.isfinite(value):
            raise InputError(f"{option_name(dest)} must be a finite number, got {value}")


def check_repo_id(repo_id: str, option: str = "--push-to-hub") -> None:
    """`repo_id` is a valid Hub repo id: checked before the work whose result would be pushed."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InputError(f"{option}: {repo_id!r} is not a Hub repo id ({one_line(error)})") from error
