"""FastInst real-time instance segmentation as a Hugging Face transformers model."""

from .configuration_fastinst import VARIANTS, FastInstConfig, FastInstResNetVdConfig
from .modeling_fastinst import FastInstForInstanceSegmentation, FastInstModel, FastInstPreTrainedModel

__all__ = [
    "VARIANTS",
    "FastInstConfig",
    "FastInstResNetVdConfig",
    "FastInstForInstanceSegmentation",
    "FastInstModel",
    "FastInstPreTrainedModel",
]
