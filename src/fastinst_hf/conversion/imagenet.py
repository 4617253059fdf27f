"""ImageNet backbone weights for new FastInst models (upstream trains from ImageNet-pretrained backbones)."""

import re
from pathlib import Path

import torch

from ..configuration_fastinst_resnet_vd import FastInstResNetVdConfig
from .official import apply_rules, check_state_dict, load_official_checkpoint

_TORCHVISION_RESNET_RULES = [
    (r"conv1\.weight", r"embedder.embedder.convolution.weight"),
    (r"bn1\.(\w+)", r"embedder.embedder.normalization.\1"),
    (
        r"layer(\d)\.(\d+)\.conv(\d)\.weight",
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.weight",
    ),
    (
        r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)",
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}",
    ),
    (
        r"layer(\d)\.(\d+)\.downsample\.0\.weight",
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.weight",
    ),
    (
        r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)",
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.{m[3]}",
    ),
]
_TORCHVISION_COMPILED = [(re.compile(pattern), target) for pattern, target in _TORCHVISION_RESNET_RULES]
# Classifier and BN step counters of ImageNet checkpoints have no place in a FastInst backbone.
_IMAGENET_IGNORED = re.compile(r"(fc\.\w+|.*num_batches_tracked)")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_official_checkpoint(path)


def imagenet_backbone_state_dict(source: str | Path, backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights for `backbone` (our module), named as its state dict.

    `source` is `"torchvision"` (torchvision's ImageNet ResNet-50/101 of the backbone's depth, downloaded into the
    torch hub cache; what upstream's R50/R101 models start from), or a file: a torchvision ResNet state dict
    (`conv1`, `bn1`, `layer1.0.conv1`, ...) for the ResNet backbones, or a timm ResNet-D state dict
    (`conv1.0`, ..., e.g. `resnet50d_ra2-464e36ba.pth`, upstream's start for R50-vd-DCN) for the ResNet-vd backbone.
    `.pth`/`.bin` files are read with `weights_only=True`, `.safetensors` with safetensors.
    """
    is_vd = isinstance(backbone.config, FastInstResNetVdConfig)
    if source == "torchvision":
        if is_vd:
            raise ValueError("torchvision has no ResNet-vd: pass the timm resnet50d weights file for this backbone")
        import torchvision

        depth = sum(backbone.config.depths) * 3 + 2
        if depth not in (50, 101):
            raise ValueError(f"torchvision ImageNet weights exist for ResNet-50/101, the backbone is ResNet-{depth}")
        weights = torchvision.models.get_model_weights(f"resnet{depth}").IMAGENET1K_V1
        official = getattr(torchvision.models, f"resnet{depth}")(weights=weights).state_dict()
    else:
        official = _read_weights_file(Path(source))
    converted, unmapped = {}, []
    for key, value in official.items():
        if _IMAGENET_IGNORED.fullmatch(key):
            continue
        # timm's ResNet-D names are ours already.
        new_key = key if is_vd else apply_rules(key, _TORCHVISION_COMPILED)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = value
    expected = backbone.state_dict()
    if is_vd:
        # ImageNet has no deformable offsets: they keep their zero initialisation, as upstream (plain 3x3 sampling).
        for key, value in expected.items():
            if "conv2_offset" in key and key not in converted:
                converted[key] = torch.zeros_like(value)
    return check_state_dict(converted, expected, str(source), unmapped)


def load_imagenet_backbone(model, source: str | Path) -> None:
    """Load ImageNet weights into the backbone of a `FastInstModel` or `FastInstForInstanceSegmentation`."""
    backbone = model.model.backbone if hasattr(model, "model") else model.backbone
    state_dict = imagenet_backbone_state_dict(source, backbone)
    backbone.load_state_dict(state_dict, strict=True)
