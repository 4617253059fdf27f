"""FastInst real-time instance segmentation as a Hugging Face transformers model.

Importing the package registers FastInst with the transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForInstanceSegmentation`, `AutoModelForImageSegmentation` used by `pipeline("image-segmentation")`,
`AutoModelForUniversalSegmentation` used by the transformers instance-segmentation example scripts, `AutoBackbone` for
the ResNet-vd-DCN backbone and `AutoImageProcessor`). Saved folders also carry `auto_map` and the code files, so they
load with `trust_remote_code=True` where this package is not installed.

`DEFAULT_MODEL` is the folder of the small demo model bundled with the package (trained on synthetic shapes, see its
README.md; not a model for photographs) and `DEMO_IMAGES` the three bundled images it was made for: both are plain
paths, so `from_pretrained(DEFAULT_MODEL)` works offline from any installation.

The `fastinst-hf` command line starts through `fastinst_hf_cli`, which is imported first: then this package leaves
torch, transformers and the model out until a command needs them (its `--help` answers in a fraction of a second),
and `register_auto_classes` runs on the first use of a model class, e.g. `fastinst_hf.FastInstConfig`.
"""

import sys
from pathlib import Path

__version__ = "0.1.0"
_ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = str(_ASSETS / "default_model")
DEMO_IMAGES = tuple(str(_ASSETS / "demo" / f"shapes_{k}.png") for k in (1, 2, 3))

# The model's names, importable from here; `register_auto_classes` binds them (the same list).
_MODEL_NAMES = (
    "VARIANTS",
    "FastInstConfig",
    "FastInstResNetVdConfig",
    "FastInstForInstanceSegmentation",
    "FastInstImageProcessor",
    "FastInstImageProcessorPil",
    "FastInstModel",
    "FastInstPreTrainedModel",
    "FastInstResNetVdBackbone",
)


def register_auto_classes() -> None:
    """Import the model and register it with the transformers Auto classes (once; later calls do nothing)."""
    if "FastInstConfig" in globals():
        return
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

    from .configuration_fastinst import FastInstConfig
    from .configuration_fastinst_resnet_vd import FastInstResNetVdConfig
    from .image_processing_fastinst import FastInstImageProcessor
    from .image_processing_pil_fastinst import FastInstImageProcessorPil
    from .modeling_fastinst import FastInstForInstanceSegmentation, FastInstModel, FastInstPreTrainedModel
    from .modeling_fastinst_resnet_vd import FastInstResNetVdBackbone
    from .releases import VARIANTS

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
    # The image-segmentation pipeline checks the model's class name against transformers' own name tables
    # (registered classes are not looked up), and logs "not supported" otherwise. The tables are only read for model
    # types of transformers' own config table, which "fastinst" is not, so the entry changes nothing else.
    MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES.setdefault(
        FastInstConfig.model_type, FastInstForInstanceSegmentation.__name__
    )
    # `save_pretrained` copies the code files and writes `auto_map` for classes registered here (the model adds the
    # other Auto classes, the image processor both backends).
    FastInstConfig.register_for_auto_class()
    FastInstModel.register_for_auto_class("AutoModel")
    FastInstForInstanceSegmentation.register_for_auto_class("AutoModelForInstanceSegmentation")
    globals().update(
        VARIANTS=VARIANTS,
        FastInstConfig=FastInstConfig,
        FastInstResNetVdConfig=FastInstResNetVdConfig,
        FastInstForInstanceSegmentation=FastInstForInstanceSegmentation,
        FastInstImageProcessor=FastInstImageProcessor,
        FastInstImageProcessorPil=FastInstImageProcessorPil,
        FastInstModel=FastInstModel,
        FastInstPreTrainedModel=FastInstPreTrainedModel,
        FastInstResNetVdBackbone=FastInstResNetVdBackbone,
    )


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        register_auto_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "fastinst_hf_cli" not in sys.modules:
    register_auto_classes()

__all__ = ["__version__", "DEFAULT_MODEL", "DEMO_IMAGES", "register_auto_classes", *_MODEL_NAMES]
