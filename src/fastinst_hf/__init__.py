"""FastInst real-time instance segmentation as a Hugging Face transformers model."""

from .configuration_fastinst import VARIANTS, FastInstConfig, FastInstResNetVdConfig

__all__ = ["VARIANTS", "FastInstConfig", "FastInstResNetVdConfig"]
