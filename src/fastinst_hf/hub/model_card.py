"""The model card (README.md) of a FastInst model repository."""

import string
from importlib import resources

from ..configuration_fastinst import FastInstConfig
from ..configuration_fastinst_resnet_vd import FastInstResNetVdConfig
from ..releases import VARIANTS


def _describe_backbone(config: FastInstConfig) -> str:
    backbone = config.backbone_config
    if isinstance(backbone, FastInstResNetVdConfig):
        stages = [str(i + 2) for i, deformable in enumerate(backbone.deformable_stages) if deformable]
        return f"ResNet-vd (depths {list(backbone.depths)}), deformable convolutions in res{', res'.join(stages)}"
    depths = getattr(backbone, "depths", None)
    return f"{backbone.model_type} (depths {list(depths)})" if depths else backbone.model_type


def render_model_card(
    config: FastInstConfig,
    repo_id: str,
    description: str | None = None,
    variant: str | None = None,
    num_values: int | None = None,
) -> str:
    """The README.md of a FastInst model repository, from the template `assets/model_card_template.md`.

    `variant` names the official release the weights were converted from; `description` replaces the default
    paragraph about where the weights come from (e.g. for a model trained on another dataset).
    """
    if description is None:
        if variant is not None:
            info = VARIANTS[variant]
            description = (
                f"Weights converted from the official release `{info['checkpoint']}` "
                f"(COCO val2017 mask AP {info['coco_val_ap']} as published upstream). The conversion reproduces the "
                "official implementation's outputs to float rounding."
            )
        else:
            description = "FastInst weights saved with `fastinst_hf`."
    template = resources.files("fastinst_hf").joinpath("assets/model_card_template.md").read_text()
    return string.Template(template).substitute(
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        description=description,
        extra_tags=f"- {variant}" if variant else "",
        backbone=_describe_backbone(config),
        decoder_layers=config.decoder_layers,
        num_queries=config.num_queries,
        num_auxiliary_queries=config.num_auxiliary_queries,
        num_labels=config.num_labels,
        test_size=f"{config.test_shortest_edge} / {config.test_longest_edge}",
        num_values=f"{num_values / 1e6:.2f}M" if num_values else "see config.json",
    )
