"""ResNet-vd with deformable 3x3 convolutions: the backbone of the official `R50-vd-DCN` FastInst checkpoints.

A timm-style ResNet-D (deep 3x3 stem, average-pool downsampling shortcuts, stride in the 3x3 convolution) whose
selected stages use DCNv1 (detectron2's `DeformConv`: no modulation mask, one offset group, no bias) for every
bottleneck's 3x3 convolution. Module and parameter names are timm's (`conv1.0`, `bn1`, `layer3.0.conv2_offset`,
...), so the official `backbone.*` keys and timm's `resnet50d` ImageNet weights load by stripping a prefix only.
"""

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import PreTrainedModel

from .configuration_fastinst_resnet_vd import FastInstResNetVdConfig


class FastInstResNetVdDeformConv2d(nn.Module):
    """
    DCNv1 convolution without bias (3x3 in the backbone), a drop-in for detectron2's `DeformConv` (same `weight`, same offset layout).

    `offset` has shape `(batch, 2 * kernel_size**2, out_height, out_width)`; channels `2k` and `2k + 1` are the
    (dy, dx) displacement of kernel tap `k`, taps in row-major order. The convolution runs in float32 as upstream
    (it casts its inputs with `.float()`), and the result is cast back to the input's dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        # nn.Conv2d's default, so the module is usable on its own (inside the backbone `_init_weights` sets it).
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, hidden_state: Tensor, offset: Tensor) -> Tensor:
        output = deform_conv2d(
            hidden_state.float(),
            offset.float(),
            self.weight.float(),
            stride=self.stride,
            padding=self.padding,
        )
        return output.to(hidden_state.dtype)

    def extra_repr(self) -> str:
        out_channels, in_channels, kernel_h, kernel_w = self.weight.shape
        kernel_size = (kernel_h, kernel_w)
        return f"{in_channels}, {out_channels}, {kernel_size=}, stride={self.stride}, padding={self.padding}"


class FastInstResNetVdOffsetConv2d(nn.Conv2d):
    """
    The plain 3x3 convolution (with bias) that predicts a deformable convolution's offsets. Its own class only so
    that `_init_weights` can zero-initialise it: a deformable block then starts as a regular convolution.
    """


class FastInstResNetVdBottleneck(nn.Module):
    """
    timm's ResNet bottleneck (`conv1` 1x1 -> `conv2` 3x3 with the stride -> `conv3` 1x1, BN and ReLU after each, the
    last ReLU after the residual sum), optionally with a deformable `conv2` whose offsets come from `conv2_offset`
    (a 3x3 convolution on the same input, zero-initialised).

    Input `(batch, in_channels, height, width)`, output `(batch, out_channels, height / stride, width / stride)`.
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, deformable: bool = False):
        super().__init__()
        width = out_channels // self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        if deformable:
            # 18 = (dy, dx) for each of the 3x3 taps; the offset map has the output's resolution.
            self.conv2_offset = FastInstResNetVdOffsetConv2d(width, 18, kernel_size=3, stride=stride, padding=1)
            self.conv2 = FastInstResNetVdDeformConv2d(width, width, kernel_size=3, stride=stride, padding=1)
        else:
            self.conv2_offset = None
            self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act3 = nn.ReLU(inplace=True)

        if stride != 1 or in_channels != out_channels:
            # ResNet-D shortcut: average-pool first so that the 1x1 projection sees every input pixel.
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(
                pool,
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = None

    def forward(self, hidden_state: Tensor) -> Tensor:
        shortcut = hidden_state if self.downsample is None else self.downsample(hidden_state)
        hidden_state = self.act1(self.bn1(self.conv1(hidden_state)))
        if self.conv2_offset is not None:
            hidden_state = self.conv2(hidden_state, self.conv2_offset(hidden_state))
        else:
            hidden_state = self.conv2(hidden_state)
        hidden_state = self.act2(self.bn2(hidden_state))
        # FastInst's folding convolution (eval mode on CPU) runs the norm, the sum and the ReLU in one call
        fuses = getattr(self.conv3, "fuses_relu", None)
        if fuses is not None and fuses(hidden_state):
            return self.conv3.fused_add_relu(hidden_state, shortcut)
        hidden_state = self.bn3(self.conv3(hidden_state))
        return self.act3(hidden_state + shortcut)


class FastInstResNetVdPreTrainedModel(PreTrainedModel):
    config: FastInstResNetVdConfig
    config_class = FastInstResNetVdConfig
    base_model_prefix = "resnet_vd"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["FastInstResNetVdBottleneck"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, FastInstResNetVdOffsetConv2d):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, FastInstResNetVdDeformConv2d)):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif "BatchNorm" in type(module).__name__:
            # Also FastInst's frozen batch norm (statistics as buffers, no `num_batches_tracked`).
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)


class FastInstResNetVdBackbone(BackboneMixin, FastInstResNetVdPreTrainedModel):
    """
    ResNet-vd(-DCN) backbone. Stages (`config.stage_names`) and their strides: `stem` (the deep stem and max-pool,
    4), `stage1` (`layer1`, 4), `stage2` (`layer2`, 8), `stage3` (`layer3`, 16), `stage4` (`layer4`, 32). FastInst
    uses `stage2`-`stage4`, the official `res3`-`res5`.
    """

    has_attentions = False

    def __init__(self, config: FastInstResNetVdConfig):
        super().__init__(config)
        stem_width = config.stem_width
        # Deep stem: three 3x3 convolutions (the first with stride 2), `bn1` and ReLU after the last, then max-pool.
        self.conv1 = nn.Sequential(
            nn.Conv2d(config.num_channels, stem_width, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, config.embedding_size, kernel_size=3, stride=1, padding=1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(config.embedding_size)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = config.embedding_size
        for stage_idx, (out_channels, depth, deformable) in enumerate(
            zip(config.hidden_sizes, config.depths, config.deformable_stages)
        ):
            blocks = []
            for block_idx in range(depth):
                # The first stage keeps the stem's resolution; every later one halves it in its first block.
                stride = 2 if stage_idx > 0 and block_idx == 0 else 1
                blocks.append(FastInstResNetVdBottleneck(in_channels, out_channels, stride, deformable))
                in_channels = out_channels
            # timm's attribute names (`layer1`...) so that checkpoint keys match without renaming.
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))

        self.num_features = [config.embedding_size] + list(config.hidden_sizes)
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`):
                Normalised images.
            output_hidden_states (`bool`, *optional*):
                Also return the outputs of every stage (`stem`, `stage1`, ...) as `hidden_states`.
            return_dict (`bool`, *optional*):
                Return a [`~transformers.modeling_outputs.BackboneOutput`] instead of a tuple.

        Returns:
            `BackboneOutput` whose `feature_maps` holds, for each of `config.out_features` in stage order, a tensor
            `(batch, channels, ceil(height / stride), ceil(width / stride))` (channels from `self.channels`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )

        hidden_state = self.maxpool(self.act1(self.bn1(self.conv1(pixel_values))))
        hidden_states = [hidden_state]
        for stage_idx in range(len(self.config.depths)):
            hidden_state = getattr(self, f"layer{stage_idx + 1}")(hidden_state)
            hidden_states.append(hidden_state)

        feature_maps = tuple(
            state for stage, state in zip(self.stage_names, hidden_states) if stage in self.out_features
        )
        hidden_states = tuple(hidden_states) if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if output_hidden_states else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=None)


__all__ = ["FastInstResNetVdBackbone", "FastInstResNetVdPreTrainedModel"]
