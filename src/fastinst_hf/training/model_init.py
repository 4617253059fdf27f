"""The model a training starts from: a new config, a variant or a saved folder, with the dataset's labels."""

from __future__ import annotations

from ..configuration_fastinst import FastInstConfig
from ..modeling_fastinst import FastInstForInstanceSegmentation
from ..releases import VARIANTS, variant_config

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
        return FastInstForInstanceSegmentation(init_config(init, overrides, **labels))
    saved_config = init_config(init, overrides)
    if _labels_of(saved_config) == dict(id2label):
        return FastInstForInstanceSegmentation.from_pretrained(init, config=saved_config)
    log(
        f"notice: {init} was trained for {saved_config.num_labels} labels {_labels_of(saved_config)}, the dataset has "
        f"{len(id2label)} {dict(id2label)}: re-initialising the class heads ({', '.join(CLASS_HEAD_KEY_PARTS)})"
    )
    pretrained = FastInstForInstanceSegmentation.from_pretrained(init, config=saved_config)
    state = {k: v for k, v in pretrained.state_dict().items() if not any(p in k for p in CLASS_HEAD_KEY_PARTS)}
    del pretrained
    saved_config.id2label, saved_config.label2id = labels["id2label"], labels["label2id"]
    model = FastInstForInstanceSegmentation(saved_config)
    result = model.load_state_dict(state, strict=False)
    unexpected_missing = [k for k in result.missing_keys if not any(p in k for p in CLASS_HEAD_KEY_PARTS)]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(
            f"{init}: weights do not fit the model beyond the class heads: missing {unexpected_missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model
