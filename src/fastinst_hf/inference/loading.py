"""One way to load a FastInst model and its image processor from a name given by a user."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..image_processing_fastinst import FastInstImageProcessor, image_processor_for_config
from ..modeling_fastinst import FastInstForInstanceSegmentation
from ..utils.errors import InputError, one_line
from .resolve import resolve_model


def load_model_and_processor(
    name: str | os.PathLike | None, device: torch.device | str = "cpu"
) -> tuple[FastInstForInstanceSegmentation, FastInstImageProcessor, Path]:
    """Resolve `name` (see `resolve_model`), load the model (eval mode, on `device`) and its image processor.

    A folder without `preprocessor_config.json` gets the processor that matches its config. Returns
    `(model, processor, model_dir)`; raises `InputError` naming the folder when it cannot be loaded.
    """
    model_dir = resolve_model(name)
    try:
        model = FastInstForInstanceSegmentation.from_pretrained(model_dir)
        if (model_dir / "preprocessor_config.json").is_file():
            processor = FastInstImageProcessor.from_pretrained(model_dir)
        else:
            processor = image_processor_for_config(model.config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"could not load the model in {model_dir}: {one_line(error)}") from error
    return model.to(device).eval(), processor, model_dir
