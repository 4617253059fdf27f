"""One way to load a FastInst model and its image processor from a name given by a user."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers.utils import logging

from .. import modeling_fastinst
from ..image_processing_fastinst import FastInstImageProcessor, image_processor_for_config
from ..modeling_fastinst import FastInstForInstanceSegmentation, non_finite_tensors
from ..utils.errors import InputError, one_line
from .resolve import resolve_model

# Loading errors that mean a broken folder: unreadable or truncated files, invalid config values, weights whose
# shapes do not match the config (transformers raises RuntimeError for those).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, StrictDataclassError)


def load_model_and_processor(
    name: str | os.PathLike | None, device: torch.device | str = "cpu"
) -> tuple[FastInstForInstanceSegmentation, FastInstImageProcessor, Path]:
    """Resolve `name` (see `resolve_model`), load the model (eval mode, on `device`) and its image processor.

    A folder without `preprocessor_config.json` gets the processor that matches its config. Returns
    `(model, processor, model_dir)`; raises `InputError` naming the file or folder when it cannot be loaded, when
    weights are missing from it (they would be random), when a weight holds NaN/Inf (it would find nothing) or when
    the processor cannot preprocess an image.
    """
    model_dir = resolve_model(name)
    model = load_pretrained(model_dir)
    config_file = model_dir / "preprocessor_config.json"
    try:
        if config_file.is_file():
            processor = FastInstImageProcessor.from_pretrained(model_dir)
        else:
            processor, config_file = image_processor_for_config(model.config), model_dir / "config.json"
    except LOAD_ERRORS as error:
        raise InputError(f"could not load the image processor of {config_file}: {one_line(error)}") from error
    check_processor(processor, config_file)
    return model.to(device).eval(), processor, model_dir


def load_pretrained(model_dir: Path, **kwargs) -> FastInstForInstanceSegmentation:
    """`FastInstForInstanceSegmentation.from_pretrained(model_dir, **kwargs)`, refused with an `InputError` naming
    the file or folder when a weights file is unreadable, the folder cannot be loaded, or `check_weights` fails."""
    check_weights_files(model_dir)
    try:
        with quiet_loading():
            # Mismatched shapes are loaded as random weights and listed in `info`, then refused by `check_weights`.
            model, info = FastInstForInstanceSegmentation.from_pretrained(
                model_dir, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except LOAD_ERRORS as error:
        raise InputError(f"could not load the model in {model_dir}: {one_line(error)}") from error
    check_weights(model, info, model_dir)
    return model


def check_weights_files(model_dir: Path) -> None:
    """Raise `InputError` naming the file when a `*.safetensors` file of `model_dir` is not a complete safetensors
    file (truncated download, garbage): its header must parse and cover the whole file."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise InputError(
                f"{path} is not a complete safetensors file (truncated or corrupted?): {one_line(error)}"
            ) from error


def check_processor(processor: FastInstImageProcessor, config_file: Path) -> None:
    """Raise `InputError` naming `config_file` when `processor` cannot preprocess a small image (e.g. an invalid
    `size`): every image would fail otherwise."""
    try:
        processor(images=np.zeros((16, 16, 3), dtype=np.uint8), return_tensors="pt")
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise InputError(f"{config_file}: the image processor settings are unusable: {one_line(error)}") from error


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' progress bar and multi-line load report, and the model's own NaN warning: the
    problems they describe are raised as one-line errors by `check_weights` instead."""
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    model_level = modeling_fastinst.logger.level
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    modeling_fastinst.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        modeling_fastinst.logger.setLevel(model_level)
        if bars:
            logging.enable_progress_bar()


def check_weights(model: FastInstForInstanceSegmentation, info: dict, model_dir: Path) -> None:
    """Raise `InputError` when the checkpoint lacked some of the model's weights, had some of another shape than
    config.json gives (e.g. another label count), or holds non-finite values."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, checkpoint_shape, model_shape = mismatched[0]
        raise InputError(
            f"the weights in {model_dir} do not match its config.json: {len(mismatched)} tensor(s) differ in shape, "
            f"e.g. {key} is {tuple(checkpoint_shape)} in the weights but {tuple(model_shape)} by the config "
            f"(num_labels={model.config.num_labels})"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise InputError(
            f"the weights in {model_dir} lack {len(missing)} tensor(s) of the model ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): they would be random"
        )
    non_finite = non_finite_tensors(model)
    if non_finite:
        raise InputError(
            f"the weights in {model_dir} hold NaN or Inf values in {len(non_finite)} tensor(s) "
            f"({', '.join(non_finite[:3])}{', ...' if len(non_finite) > 3 else ''})"
        )
