"""FastInst real-time instance segmentation as a Hugging Face transformers model.

Importing the package registers FastInst with the transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForInstanceSegmentation`, `AutoModelForImageSegmentation` used by `pipeline("image-segmentation")`,
`AutoModelForUniversalSegmentation` used by the transformers instance-segmentation example scripts, `AutoBackbone` for
the ResNet-vd-DCN backbone and `AutoImageProcessor`). Saved folders also carry `auto_map` and the code files, so they
load with `trust_remote_code=True` where this package is not installed.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageSegmentation,
    AutoModelForInstanceSegmentation,
    AutoModelForUniversalSegmentation,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES

from .configuration_fastinst import VARIANTS, FastInstConfig, FastInstResNetVdConfig
from .image_processing_fastinst import FastInstImageProcessor
from .image_processing_pil_fastinst import FastInstImageProcessorPil
from .modeling_fastinst import FastInstForInstanceSegmentation, FastInstModel, FastInstPreTrainedModel
from .modeling_fastinst_resnet_vd import FastInstResNetVdBackbone

AutoConfig.register(FastInstConfig.model_type, FastInstConfig, exist_ok=True)
AutoConfig.register(FastInstResNetVdConfig.model_type, FastInstResNetVdConfig, exist_ok=True)
AutoModel.register(FastInstConfig, FastInstModel, exist_ok=True)
AutoModelForInstanceSegmentation.register(FastInstConfig, FastInstForInstanceSegmentation, exist_ok=True)
AutoModelForImageSegmentation.register(FastInstConfig, FastInstForInstanceSegmentation, exist_ok=True)
AutoModelForUniversalSegmentation.register(FastInstConfig, FastInstForInstanceSegmentation, exist_ok=True)
AutoBackbone.register(FastInstResNetVdConfig, FastInstResNetVdBackbone, exist_ok=True)
AutoImageProcessor.register(
    FastInstConfig,
    image_processor_classes={"torchvision": FastInstImageProcessor, "pil": FastInstImageProcessorPil},
    exist_ok=True,
)

# The image-segmentation pipeline checks the model's class name against transformers' own name tables (registered
# classes are not looked up), and logs "not supported" otherwise. The tables are only read for model types of
# transformers' own config table, which "fastinst" is not, so the entry changes nothing else.
MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES.setdefault(
    FastInstConfig.model_type, FastInstForInstanceSegmentation.__name__
)

# `save_pretrained` copies the code files and writes `auto_map` for classes registered here (the model adds the other
# Auto classes, the image processor both backends).
FastInstConfig.register_for_auto_class()
FastInstModel.register_for_auto_class("AutoModel")
FastInstForInstanceSegmentation.register_for_auto_class("AutoModelForInstanceSegmentation")

__all__ = [
    "VARIANTS",
    "FastInstConfig",
    "FastInstResNetVdConfig",
    "FastInstForInstanceSegmentation",
    "FastInstImageProcessor",
    "FastInstImageProcessorPil",
    "FastInstModel",
    "FastInstPreTrainedModel",
    "FastInstResNetVdBackbone",
]
