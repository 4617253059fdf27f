"""The model a training starts from: a new config, a variant or a saved folder, with the dataset's labels."""

from __future__ import annotations

import difflib
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

from ..configuration_fastinst import FastInstConfig
from ..inference.loading import check_weights_files, load_pretrained
from ..modeling_fastinst import FastInstForInstanceSegmentation
from ..releases import VARIANTS, variant_config
from ..utils.errors import InputError, one_line

# Sizes that must be >= 1 (0 queries trains on NaN losses, a test size of 0 saves an unusable processor); the
# config's own validators leave them open.
POSITIVE_FIELDS = (
    "num_queries",
    "hidden_dim",
    "pixel_decoder_channels",
    "mask_dim",
    "num_attention_heads",
    "dim_feedforward",
    "train_num_points",
    "num_detections",
    "test_shortest_edge",
    "test_longest_edge",
)
# The class-dependent layers, re-initialised when the label set changes.
CLASS_HEAD_KEY_PARTS = ("class_predictor.layers.2.", "query_proposal.classifier.")


def _labels_of(config: FastInstConfig) -> dict[int, str]:
    return {int(k): v for k, v in config.id2label.items()}


def init_config(init: str, overrides: dict, **labels) -> FastInstConfig:
    """The config `--init` starts from: `FastInstConfig(**overrides)`, a variant's, or a saved model's with `overrides`.

    `labels` (id2label / label2id) apply to a new config only; a saved model keeps its own, which `build_model`
    compares with the dataset's.
    """
    if init == "config":
        return FastInstConfig(**overrides, **labels)
    if init in VARIANTS:
        return variant_config(init, **overrides, **labels)
    return FastInstConfig.from_pretrained(init, **overrides)


def check_init(init: str, overrides: dict) -> FastInstConfig:
    """The config of `init_config(init, overrides)`, or an `InputError` naming `--config-json` (an unknown field, a
    value of the wrong type or out of range) or the `--init` folder (unreadable config or weights files)."""
    known = set(FastInstConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"--config-json: {unknown[0]!r} is not a FastInstConfig field{hint}")
    source = "--config-json" if overrides else f"--init {init}"
    if init not in ("config", *VARIANTS):
        source = f"--init {Path(init) / 'config.json'}" + (" with --config-json" if overrides else "")
        check_weights_files(Path(init))
    try:
        config = init_config(init, overrides)
    except (StrictDataclassError, TypeError, ValueError, KeyError, OSError, ArithmeticError) as error:
        raise InputError(f"{source}: {one_line(error)}") from error
    small = [f"{name}={getattr(config, name)}" for name in POSITIVE_FIELDS if getattr(config, name) < 1]
    if small:
        raise InputError(f"{source}: {', '.join(small)} (expected >= 1)")
    return config


def _build(config: FastInstConfig) -> FastInstForInstanceSegmentation:
    """A new model of `config`; a config whose values do not make a model (e.g. 0 attention heads) is refused."""
    try:
        return FastInstForInstanceSegmentation(config)
    except (ValueError, TypeError, ArithmeticError, RuntimeError) as error:
        raise InputError(f"--config-json: the config does not make a model: {one_line(error)}") from error


def accelerator_kwargs_handlers(config: FastInstConfig) -> list:
    """Accelerator `kwargs_handlers` the model needs under DDP.

    Without the auxiliary loss only the last decoder layer's heads feed the loss, so the earlier heads get no
    gradient and DDP's reducer fails ("Expected to have finished reduction in the prior iteration") unless it looks
    for unused parameters. That search costs a graph traversal per step, so it is only enabled when needed.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    if config.use_auxiliary_loss:
        return []
    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


def build_model(init: str, overrides: dict, id2label: dict[int, str], log=print) -> FastInstForInstanceSegmentation:
    """The model to train, with the dataset's labels in its config.

    `init` is "config" or a variant name (random weights; the architecture from `FastInstConfig(**overrides)` /
    `variant_config(init, **overrides)`), or a saved model folder (weights loaded, `overrides` applied
    to the saved config). When the saved labels differ from `id2label`, the class-dependent layers (each prediction
    head's `class_predictor.layers.2` and `query_proposal.classifier`) are re-initialised and a notice is logged.
    """
    labels = {"id2label": dict(id2label), "label2id": {name: label for label, name in id2label.items()}}
    if init == "config" or init in VARIANTS:
        log(f"--init {init}: randomly initialised model (no pretrained weights)")
        return _build(init_config(init, overrides, **labels))
    saved_config = init_config(init, overrides)
    if _labels_of(saved_config) == dict(id2label):
        return load_pretrained(Path(init), config=saved_config)
    log(
        f"notice: {init} was trained for {saved_config.num_labels} labels {_labels_of(saved_config)}, the dataset has "
        f"{len(id2label)} {dict(id2label)}: re-initialising the class heads ({', '.join(CLASS_HEAD_KEY_PARTS)})"
    )
    pretrained = load_pretrained(Path(init), config=saved_config)
    state = {k: v for k, v in pretrained.state_dict().items() if not any(p in k for p in CLASS_HEAD_KEY_PARTS)}
    del pretrained
    saved_config.id2label, saved_config.label2id = labels["id2label"], labels["label2id"]
    model = _build(saved_config)
    result = model.load_state_dict(state, strict=False)
    unexpected_missing = [k for k in result.missing_keys if not any(p in k for p in CLASS_HEAD_KEY_PARTS)]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(
            f"{init}: weights do not fit the model beyond the class heads: missing {unexpected_missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model
