"""FastInst model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, ResNetConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .configuration_fastinst_resnet_vd import FastInstResNetVdConfig

# The official models detect the 80 COCO "thing" classes (the release table in `fastinst_hf.releases` names them).
DEFAULT_NUM_LABELS = 80


def default_resnet_config(depth: int = 50) -> ResNetConfig:
    """The torchvision-style ResNet-50/101 of the official R50/R101 variants, returning strides 8, 16, 32."""
    if depth not in (50, 101):
        raise ValueError(f"depth must be 50 or 101, got {depth}")
    return ResNetConfig(
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 23 if depth == 101 else 6, 3],
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
        out_features=["stage2", "stage3", "stage4"],
    )


def _backbone_config_from_dict(backbone_config: dict) -> PreTrainedConfig:
    backbone_config = dict(backbone_config)
    model_type = backbone_config.pop("model_type", "resnet")
    if model_type == FastInstResNetVdConfig.model_type:
        return FastInstResNetVdConfig(**backbone_config)
    return AutoConfig.for_model(model_type, **backbone_config)


@strict
class FastInstConfig(PreTrainedConfig):
    r"""
    Configuration of a FastInst model (He et al., CVPR 2023, "FastInst: A Simple Query-Based Model for Real-Time
    Instance Segmentation"). The defaults build FastInst-D3 with a ResNet-50 backbone, the official
    `fastinst_R50_ppm-fpn_x3_640` model with 80 classes (named `LABEL_0` ...); `fastinst_hf.releases.variant_config`
    gives the five released variants with the COCO class names.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            Configuration of the backbone, loaded with `load_backbone`/`AutoBackbone`. It must return three
            feature maps at strides 8, 16 and 32. Defaults to the torchvision-style ResNet-50 of the official
            R50 models. A [`FastInstResNetVdConfig`] builds the R50-vd-DCN backbone.
        freeze_backbone_batch_norm (`bool`, *optional*, defaults to `True`):
            Replace every `BatchNorm2d` of the backbone by a frozen batch norm (statistics and affine are buffers,
            never trained), as detectron2's `FrozenBN` in the official models.
        pixel_decoder_channels (`int`, *optional*, defaults to 256):
            Channels of the PPM-FPN pixel decoder's lateral and output convolutions (`CONVS_DIM`). Must equal
            `hidden_dim`: the instance-activation-guided queries are gathered from the pixel decoder's stride-16
            map without a projection.
        ppm_pool_sizes (`list[int]`, *optional*, defaults to `(1, 2, 3, 6)`):
            Output sizes of the adaptive average pools of the pyramid pooling module on the stride-32 map.
        group_norm_groups (`int`, *optional*, defaults to 32):
            Number of groups of the pixel decoder's GroupNorm layers.
        hidden_dim (`int`, *optional*, defaults to 256):
            Width of the queries and pixel features in the Transformer decoder.
        mask_dim (`int`, *optional*, defaults to 256):
            Width of the mask embeddings and mask features whose dot product gives the mask logits.
        num_queries (`int`, *optional*, defaults to 100):
            Number of instance-activation-guided (IA) queries selected from the stride-16 map. Each one predicts
            one instance.
        num_auxiliary_queries (`int`, *optional*, defaults to 8):
            Number of learnable auxiliary queries appended to the IA queries. They take part in attention but
            make no prediction.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads of every attention layer in the decoder.
        dim_feedforward (`int`, *optional*, defaults to 1024):
            Hidden width of the decoder's feed-forward networks.
        decoder_layers (`int`, *optional*, defaults to 3):
            Number of dual-path decoder layers (1 for FastInst-D1, 3 for FastInst-D3).
        position_embedding_size (`int`, *optional*, defaults to 10):
            Side of the learned square positional-embedding grid, resized bilinearly to the stride-16 and stride-8
            maps. Upstream ties it to `round(sqrt(num_queries))`; here it is independent (upstream issue #57).
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout in the decoder's attention and feed-forward layers (0 in every official model).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the decoder's LayerNorms and the pixel decoder's GroupNorms.
        init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated-normal initialisation of the positional-embedding grid.
        class_weight (`float`, *optional*, defaults to 2.0):
            Weight of the classification loss and of the class cost in the Hungarian matcher.
        mask_weight (`float`, *optional*, defaults to 5.0):
            Weight of the point-sampled binary cross-entropy mask loss and matching cost.
        dice_weight (`float`, *optional*, defaults to 5.0):
            Weight of the point-sampled dice loss and matching cost.
        location_weight (`float`, *optional*, defaults to 1000.0):
            Weight of the location cost: a query may only be matched to an instance that covers its location.
        proposal_weight (`float`, *optional*, defaults to 20.0):
            Weight of the instance-activation (proposal) classification loss on the stride-16 map.
        no_object_weight (`float`, *optional*, defaults to 0.1):
            Weight of the no-object class in the classification loss.
        train_num_points (`int`, *optional*, defaults to 12544):
            Number of points sampled per mask for the mask losses and matching costs.
        oversample_ratio (`float`, *optional*, defaults to 3.0):
            Over-sampling ratio of the uncertainty-based point sampling.
        importance_sample_ratio (`float`, *optional*, defaults to 0.75):
            Fraction of the points taken from the most uncertain candidates; the rest are uniform.
        use_auxiliary_loss (`bool`, *optional*, defaults to `True`):
            Deep supervision: apply the losses to every prediction head and to the GT-mask-guided predictions.
        test_shortest_edge (`int`, *optional*, defaults to 640):
            Test-time short side of the resized image (576 for the D1 models).
        test_longest_edge (`int`, *optional*, defaults to 853):
            Test-time cap on the long side (777 for the D1 models).
        num_detections (`int`, *optional*, defaults to 100):
            Number of (query, class) pairs kept by instance post-processing (detectron2's `DETECTIONS_PER_IMAGE`).
        output_auxiliary_logits (`bool`, *optional*, defaults to `False`):
            Return the predictions of every prediction head (`auxiliary_logits`).
    """

    model_type = "fastinst"
    attribute_map = {"hidden_size": "hidden_dim", "num_hidden_layers": "decoder_layers"}
    # Declares the backbone as a sub-configuration, so that settings such as `attn_implementation` reach it. A dict
    # is converted in `__post_init__` (a `fastinst_resnet_vd` backbone is unknown to AutoConfig under remote code).
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet", init_kwargs={}),
    }
    # The Trainer's prediction tuple then starts with the class and mask logits, as the example scripts read it.
    keys_to_ignore_at_inference = ["loss_dict", "auxiliary_logits"]

    backbone_config: dict | PreTrainedConfig | None = None
    freeze_backbone_batch_norm: bool = True
    pixel_decoder_channels: int = 256
    ppm_pool_sizes: list[int] | tuple[int, ...] = (1, 2, 3, 6)
    group_norm_groups: int = 32
    hidden_dim: int = 256
    mask_dim: int = 256
    num_queries: int = 100
    num_auxiliary_queries: int = 8
    num_attention_heads: int = 8
    dim_feedforward: int = 1024
    decoder_layers: int = 3
    position_embedding_size: int = 10
    dropout: float | int = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    location_weight: float = 1000.0
    proposal_weight: float = 20.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    use_auxiliary_loss: bool = True
    test_shortest_edge: int = 640
    test_longest_edge: int = 853
    num_detections: int = 100
    output_auxiliary_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.backbone_config is None:
            self.backbone_config = default_resnet_config(50)
        elif isinstance(self.backbone_config, dict):
            self.backbone_config = _backbone_config_from_dict(self.backbone_config)
        if kwargs.get("id2label") is None and kwargs.get("num_labels") is None and self.id2label is None:
            self.num_labels = DEFAULT_NUM_LABELS
        self.ppm_pool_sizes = list(self.ppm_pool_sizes)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.pixel_decoder_channels != self.hidden_dim:
            raise ValueError(
                f"pixel_decoder_channels ({self.pixel_decoder_channels}) must equal hidden_dim ({self.hidden_dim}): "
                "the IA-guided queries are gathered from the pixel decoder without a projection"
            )
        if self.hidden_dim % self.num_attention_heads:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.pixel_decoder_channels % self.group_norm_groups:
            raise ValueError(
                f"pixel_decoder_channels ({self.pixel_decoder_channels}) must be divisible by group_norm_groups "
                f"({self.group_norm_groups})"
            )
        if len(self.backbone_config.out_features) != 3:
            raise ValueError(
                "the backbone must return exactly three feature maps (strides 8, 16, 32), got out_features="
                f"{self.backbone_config.out_features}"
            )


__all__ = ["FastInstConfig"]
