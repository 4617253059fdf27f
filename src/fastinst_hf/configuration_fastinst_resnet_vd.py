"""Configuration of the ResNet-vd-DCN backbone of the official R50-vd-DCN FastInst models."""

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig


@strict
class FastInstResNetVdConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of the ResNet-vd backbone with deformable convolutions used by the official
    `R50-vd-DCN` FastInst checkpoints (a timm-style ResNet-D: deep stem, average-pool downsampling
    shortcuts, DCNv1 3x3 convolutions in the selected stages).

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            Number of input image channels.
        stem_width (`int`, *optional*, defaults to 32):
            Width of the first two 3x3 convolutions of the deep stem.
        embedding_size (`int`, *optional*, defaults to 64):
            Output channels of the stem (input channels of the first stage).
        hidden_sizes (`list[int]`, *optional*, defaults to `(256, 512, 1024, 2048)`):
            Output channels of each stage (4x the bottleneck width).
        depths (`list[int]`, *optional*, defaults to `(3, 4, 6, 3)`):
            Number of bottleneck blocks per stage.
        deformable_stages (`list[bool]`, *optional*, defaults to `(False, False, True, True)`):
            Whether every 3x3 convolution of a stage is a deformable convolution (DCNv1, one offset group).
        out_features (`list[str]`, *optional*):
            Stages to return, among `"stem"`, `"stage1"` ... `"stage4"`. FastInst uses stages 2-4 (strides 8-32).
        out_indices (`list[int]`, *optional*):
            Same as `out_features`, by index.
    """

    model_type = "fastinst_resnet_vd"

    num_channels: int = 3
    stem_width: int = 32
    embedding_size: int = 64
    hidden_sizes: list[int] | tuple[int, ...] = (256, 512, 1024, 2048)
    depths: list[int] | tuple[int, ...] = (3, 4, 6, 3)
    deformable_stages: list[bool] | tuple[bool, ...] = (False, False, True, True)
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        self.hidden_sizes = list(self.hidden_sizes)
        self.depths = list(self.depths)
        self.deformable_stages = list(self.deformable_stages)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if not (len(self.depths) == len(self.hidden_sizes) == len(self.deformable_stages)):
            raise ValueError(
                "depths, hidden_sizes and deformable_stages need one entry per stage, got "
                f"{len(self.depths)}, {len(self.hidden_sizes)} and {len(self.deformable_stages)}"
            )


__all__ = ["FastInstResNetVdConfig"]
