"""PyTorch FastInst model.

The data flow, in the order of this file (He et al., CVPR 2023, "FastInst: A Simple Query-Based Model for Real-Time
Instance Segmentation"):

1. backbone: a transformers backbone (ResNet by default) or the ResNet-vd-DCN backbone, strides 8, 16 and 32;
2. pixel decoder: PPM-FPN, three 256-channel maps E5, E4, E3 (strides 32, 16, 8);
3. query proposal: instance-activation-guided queries picked on E4, plus learnable auxiliary queries;
4. dual-path decoder layers: pixel features and queries updated in turn, with masked query cross-attention;
5. prediction heads: per-layer class and mask predictions (the masks also build the next layer's attention mask).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers import initialization as init
from transformers.backbone_utils import load_backbone
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING
from transformers.models.resnet.modeling_resnet import ResNetBasicLayer, ResNetBottleNeckLayer, ResNetConvLayer
from transformers.utils import ModelOutput, logging

from .configuration_fastinst import FastInstConfig
from .configuration_fastinst_resnet_vd import FastInstResNetVdConfig
from .loss_fastinst import FastInstLoss, build_gt_attention_mask, validate_targets
from .modeling_fastinst_resnet_vd import FastInstResNetVdBackbone, FastInstResNetVdBottleneck

logger = logging.get_logger(__name__)


@dataclass
class FastInstModelOutput(ModelOutput):
    r"""
    Every tensor is batch-first; the last hidden states are always returned, the per-layer fields only when asked for.

    class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_labels + 1)`):
        Class logits of every instance query from the last prediction head; the last class is "no object".
    masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, height / 8, width / 8)`):
        Mask logits of every instance query from the last prediction head, at 1/8 of the padded input size.
    auxiliary_logits (`list[dict[str, torch.FloatTensor]]`, *optional*):
        With `output_auxiliary_logits=True`: the predictions of the heads before the last one (head 0 reads the
        proposed queries, head i the output of layer i - 1), as `{"class_queries_logits", "masks_queries_logits"}`.
    proposal_logits (`torch.FloatTensor` of shape `(batch_size, num_labels + 1, height / 16, width / 16)`):
        Logits of the auxiliary classification head on E4 that guides the query selection.
    proposal_indices (`torch.LongTensor` of shape `(batch_size, num_queries)`):
        Flat indices into the stride-16 grid of the selected instance-activation-guided queries.
    encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_channels, height / 32, width / 32)`):
        The backbone's last feature map (stride 32).
    pixel_decoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_dim, height / 8, width / 8)`):
        The stride-8 pixel features the last prediction head makes the masks from (after the last decoder layer).
    transformer_decoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_queries + num_auxiliary_queries, hidden_dim)`):
        The queries after the last decoder layer (the instance queries first, then the auxiliary ones).
    query_position_embeddings (`torch.FloatTensor` of shape `(batch_size, num_queries + num_auxiliary_queries, hidden_dim)`, *optional*):
        Positional embeddings of the queries, returned with `output_hidden_states=True`.
    pixel_position_embeddings (`torch.FloatTensor` of shape `(batch_size, height / 8 * width / 8, hidden_dim)`, *optional*):
        Positional embeddings of the stride-8 pixel features (the same for every image), with `output_hidden_states=True`.
    query_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        With `output_hidden_states=True`: queries `(batch_size, num_queries + num_auxiliary_queries, hidden_dim)`
        before the first decoder layer and after each layer.
    pixel_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        With `output_hidden_states=True`: pixel features `(batch_size, height / 8 * width / 8, hidden_dim)` before
        the first decoder layer and after each layer.
    encoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Backbone feature maps at strides 8, 16 and 32, returned with `output_hidden_states=True`.
    pixel_decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Pixel decoder maps E5, E4, E3 (strides 32, 16, 8), returned with `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        With `output_attentions=True`: per decoder layer, three attention maps in the order the layer runs them:
        pixel cross-attention `(batch_size, num_heads, h * w, num_queries + num_auxiliary_queries)`, masked query
        cross-attention `(batch_size, num_heads, num_queries + num_auxiliary_queries, h * w)` and query
        self-attention `(batch_size, num_heads, num_queries + num_auxiliary_queries, num_queries + num_auxiliary_queries)`,
        where `h * w` is the number of stride-8 pixels.
    image_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
        (height, width) of each image before padding, read off `pixel_mask` when it is given; post-processing uses
        it to crop the padding.
    """

    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    auxiliary_logits: list[dict[str, torch.FloatTensor]] | None = None
    proposal_logits: torch.FloatTensor | None = None
    proposal_indices: torch.LongTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    pixel_decoder_last_hidden_state: torch.FloatTensor | None = None
    transformer_decoder_last_hidden_state: torch.FloatTensor | None = None
    query_position_embeddings: torch.FloatTensor | None = None
    pixel_position_embeddings: torch.FloatTensor | None = None
    query_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pixel_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_sizes: torch.LongTensor | None = None


@dataclass
class FastInstForInstanceSegmentationOutput(ModelOutput):
    r"""
    Every tensor is batch-first; the last hidden states are always returned, the per-layer fields only when asked for
    (see [`FastInstModelOutput`]).
    `loss_dict` comes last, and the configuration's `keys_to_ignore_at_inference` lists it, so that the Trainer's
    prediction tuple starts with the class and mask logits.

    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Sum of the weighted losses, returned when `mask_labels` and `class_labels` are given.
    class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_labels + 1)`):
        Class logits of the last prediction head; the last class is "no object".
    masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, height / 8, width / 8)`):
        Mask logits of the last prediction head at 1/8 of the padded input size.
    auxiliary_logits (`list[dict[str, torch.FloatTensor]]`, *optional*):
        The predictions the deep supervision reads, returned with labels (and `use_auxiliary_loss`) or with
        `output_auxiliary_logits=True`: in training order the GT-mask-guided predictions first (with labels), then
        those of the earlier heads (see [`FastInstModelOutput`]).
    proposal_logits (`torch.FloatTensor` of shape `(batch_size, num_labels + 1, height / 16, width / 16)`):
        Logits of the instance-activation (proposal) classification head.
    proposal_indices (`torch.LongTensor` of shape `(batch_size, num_queries)`):
        Flat stride-16 indices of the selected queries.
    encoder_last_hidden_state, pixel_decoder_last_hidden_state, transformer_decoder_last_hidden_state:
        As in [`FastInstModelOutput`] (Mask2Former's names).
    encoder_hidden_states, pixel_decoder_hidden_states, query_hidden_states, pixel_hidden_states, attentions, image_sizes:
        As in [`FastInstModelOutput`].
    loss_dict (`dict[str, torch.FloatTensor]`, *optional*):
        Every weighted loss term, keyed as upstream (`loss_ce`, `loss_mask`, `loss_dice`, `loss_ce_0`, ...,
        `loss_proposal`).
    """

    loss: torch.FloatTensor | None = None
    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    auxiliary_logits: list[dict[str, torch.FloatTensor]] | None = None
    proposal_logits: torch.FloatTensor | None = None
    proposal_indices: torch.LongTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    pixel_decoder_last_hidden_state: torch.FloatTensor | None = None
    transformer_decoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    query_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pixel_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_sizes: torch.LongTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# 1. Backbone
# ---------------------------------------------------------------------------------------------------------------------
def onednn_applies(hidden_state: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN's fused inference ops (`torch.ops.mkldnn._convolution_pointwise`, `_linear_pointwise`) may run
    `hidden_state` with `weight`: no gradient wanted, on CPU, float32 (bfloat16 with bf16 units), same dtypes, and not
    under autocast, `torch.compile`, export, tracing or a dispatch mode (which see aten ops only)."""
    if hidden_state.device.type != "cpu" or hidden_state.dtype != weight.dtype:
        return False
    if torch.is_grad_enabled() and (hidden_state.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if torch.jit.is_tracing() or _get_current_dispatch_mode() is not None or not torch.backends.mkldnn.is_available():
        return False  # a dispatch mode (the FLOP counter, ...) expects aten ops
    dtype = hidden_state.dtype
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(hidden_states: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """`F.linear` [..., in] -> [..., out], then ReLU with `relu`. At inference on CPU it is oneDNN's linear with the
    bias (and ReLU) fused: about 1.5x faster on the decoder's pixel features than `addmm`, which first copies the
    bias into every output row."""
    if onednn_applies(hidden_states, weight):
        return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, "relu" if relu else "none", [], "")
    hidden_states = F.linear(hidden_states, weight, bias)
    return F.relu(hidden_states) if relu else hidden_states


class FastInstLinear(nn.Linear):
    """`nn.Linear` (same parameters) computed by [`linear`], optionally with a ReLU after it."""

    def forward(self, hidden_states: Tensor, relu: bool = False) -> Tensor:
        return linear(hidden_states, self.weight, self.bias, relu)


def folded_conv_weights(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one convolution computing `norm(conv(x))` for a batch norm using its running
    statistics; computed in float64 (no rounding of our own) and returned in the convolution's dtype."""
    scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
    bias = norm.bias.double() - norm.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double() * scale
    weight = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


class FastInstFoldingConv2d(nn.Conv2d):
    """`nn.Conv2d` whose output goes straight into a batch norm, `self.folded_norm` (a plain reference, not a
    submodule: the norm stays where the checkpoint keys put it).

    In eval mode, when no gradient is wanted for the weights, it runs one convolution with the norm folded in and
    the norm passes its input through (same outputs up to float rounding, one op less); on CPU the folded weight is
    channels_last, so the convolutions from there on run in oneDNN's faster NHWC layout. The folded weights are
    cached and recomputed whenever a tensor they come from changes: another tensor (`load_state_dict` of other
    tensors, `.to()`), another dtype or device, or an in-place edit (the tensors' version counters). `train()`
    turns folding off. Under `torch.compile` and `torch.export` the layers run unfolded (the compilers fuse them).
    Where the ReLU after the norm is known (`link_fused_relus`), a folded convolution on CPU also applies it, and in a
    residual block the shortcut sum before it, in the same oneDNN call (`fuses_relu`).
    """

    folded_norm = None
    fused_relu = None  # the `FastInstFoldedReLU` taking the norm's output (`link_fused_relus`)
    relu_after_sum = False  # whether a shortcut is added before that ReLU (then only `fused_add_relu` applies it)
    fold_enabled = True  # `FastInstPreTrainedModel.set_batch_norm_folding`
    _fold_cache = None

    def folds(self) -> bool:
        norm = self.folded_norm
        if norm is None or not self.fold_enabled or self.training or norm.training:
            return False
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        tensors = (self.weight, self.bias, norm.weight, norm.bias)
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))

    def _fold_key(self) -> tuple | None:
        norm = self.folded_norm
        tensors = (self.weight, self.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        if any(t is not None and t.is_inference() for t in tensors):
            return None  # inference tensors have no version counter: fold on every call
        described = [(t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors if t is not None]
        return (*described, norm.eps)

    def folded_weights(self) -> tuple[Tensor, Tensor]:
        key = self._fold_key()
        if key is None or self._fold_cache is None or self._fold_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                weight, bias = folded_conv_weights(self, self.folded_norm)
                if weight.device.type == "cpu":
                    # oneDNN's preferred layout: the output, and so every later convolution, runs NHWC
                    weight = weight.contiguous(memory_format=torch.channels_last)
                weights = weight, bias
            if key is None:
                return weights
            self._fold_cache = (key, *weights)
        return self._fold_cache[1], self._fold_cache[2]

    def train(self, mode: bool = True):
        self._fold_cache = None
        return super().train(mode)

    def runs_onednn(self, hidden_state: Tensor) -> bool:
        """Whether the folded convolution runs as oneDNN's fused convolution on `hidden_state` ([`onednn_applies`]).
        Always oneDNN there, as torch's own dispatch picks its slower im2col kernel for some 1x1 convolutions, and
        with the ReLU after the norm (`self.fused_relu`) applied in the same call: bit for bit `relu(conv(x))`."""
        if not self.folds() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        return onednn_applies(hidden_state, self.weight)

    def fuses_relu(self, hidden_state: Tensor) -> bool:
        if self.fused_relu is None or not self.runs_onednn(hidden_state):
            return False
        # oneDNN's sum + ReLU falls back to an aten kernel that has no bfloat16
        return not self.relu_after_sum or hidden_state.dtype == torch.float32

    def forward(self, hidden_state: Tensor) -> Tensor:
        if not self.folds():
            return super().forward(hidden_state)
        weight, bias = self.folded_weights()
        if self.runs_onednn(hidden_state):
            return torch.ops.mkldnn._convolution_pointwise(
                hidden_state, weight, bias, self.padding, self.stride, self.dilation, self.groups,
                "relu" if self.fused_relu is not None and not self.relu_after_sum else "none", [], "",
            )  # fmt: skip
        return self._conv_forward(hidden_state, weight, bias)

    def release_relu(self) -> None:
        """Make the ReLU this convolution fuses a plain `nn.ReLU` again, for a copy of the model in which this
        convolution is replaced (`fold_batch_norms`)."""
        if self.fused_relu is not None:
            self.fused_relu.__class__ = nn.ReLU
            del self.fused_relu.folding_conv
            self.fused_relu, self.relu_after_sum = None, False

    def fused_add_relu(self, hidden_state: Tensor, residual: Tensor) -> Tensor:
        """`relu(norm(conv(hidden_state)) + residual)` in one oneDNN call, for a bottleneck's last convolution where
        `fuses_relu(hidden_state)` holds; `residual` has the output's shape."""
        weight, bias = self.folded_weights()
        return torch.ops.mkldnn._convolution_pointwise.binary(
            hidden_state, residual, weight, bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, "relu", [], "",
        )  # fmt: skip


class FastInstFoldedReLU(nn.ReLU):
    """`nn.ReLU` after a folded norm: the identity when its convolution (`self.folding_conv`) applies it itself."""

    folding_conv = None

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.folding_conv is not None and self.folding_conv.fuses_relu(hidden_state):
            return hidden_state
        return super().forward(hidden_state)


class FastInstResidualReLUMixin:
    """For transformers' ResNet blocks: where the block's last convolution fuses (eval mode on CPU), the shortcut sum
    and the final ReLU run inside that convolution."""

    def forward(self, hidden_state: Tensor) -> Tensor:
        last = self.layer[-1]  # its convolution may be a plain one again (`fold_batch_norms`, for export)
        if not (isinstance(last.convolution, FastInstFoldingConv2d) and last.convolution.fuses_relu(hidden_state)):
            return super().forward(hidden_state)
        residual = self.shortcut(hidden_state)
        for layer in self.layer[:-1]:
            hidden_state = layer(hidden_state)
        return last.convolution.fused_add_relu(hidden_state, residual)


class FastInstResNetBasicLayer(FastInstResidualReLUMixin, ResNetBasicLayer):
    pass


class FastInstResNetBottleNeckLayer(FastInstResidualReLUMixin, ResNetBottleNeckLayer):
    pass


class FastInstFoldedNormMixin:
    """A batch norm that its preceding `FastInstFoldingConv2d` (`self.folding_conv`) may fold: it is then the
    identity."""

    folding_conv = None

    def is_folded(self) -> bool:
        return self.folding_conv is not None and self.folding_conv.folds()


class FastInstBatchNorm2d(FastInstFoldedNormMixin, nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same parameters and buffers) that its convolution may fold in eval mode."""

    def forward(self, hidden_state: Tensor) -> Tensor:
        return hidden_state if self.is_folded() else super().forward(hidden_state)


class FastInstFrozenBatchNorm2d(FastInstFoldedNormMixin, FrozenBatchNorm2d):
    """Batch norm with fixed statistics and affine parameters (buffers, never trained).

    Computed as detectron2's FrozenBN, so converted checkpoints reproduce the official features to the last bits:
    `F.batch_norm` in inference mode when no gradient flows, and `x * scale + shift` when one does (the backward of
    `F.batch_norm` would also compute gradients for the frozen affine parameters). In eval mode its convolution
    folds it (see `FastInstFoldingConv2d`).
    """

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.is_folded():
            return hidden_state
        if hidden_state.requires_grad:
            return super().forward(hidden_state)
        return F.batch_norm(
            hidden_state, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def inputs_in_own_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: floating-point tensors (also inside tuples and lists) cast to the dtype of `module`'s first
    parameter, so that parts kept in float32 (`_keep_in_fp32_modules_strict`) and parts in bfloat16 / float16 meet."""
    dtype = next(module.parameters()).dtype

    def cast(value):
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(cast(item) for item in value)
        return value

    return cast(args), {key: cast(value) for key, value in kwargs.items()}


def link_conv_norm_pairs(module: nn.Module) -> nn.Module:
    """Make every `nn.Conv2d` below `module` that is directly followed by a batch norm with running statistics
    (the next child of the same parent, which is also the forward order in transformers' ResNet and our
    ResNet-vd) a `FastInstFoldingConv2d` folding that norm in eval mode. Parameters, buffers and keys are kept
    (the classes are swapped in place); deformable convolutions keep their norm. Then `link_fused_relus`."""
    for parent in module.modules():
        children = list(parent.children())
        for conv, norm in zip(children, children[1:]):
            if type(conv) is not nn.Conv2d or not isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                continue
            if norm.weight is None or norm.running_mean is None or norm.weight.shape[0] != conv.out_channels:
                continue
            conv.__class__ = FastInstFoldingConv2d
            if type(norm) is nn.BatchNorm2d:
                norm.__class__ = FastInstBatchNorm2d
            # plain attributes (object.__setattr__): neither module becomes a submodule of the other
            object.__setattr__(conv, "folded_norm", norm)
            object.__setattr__(norm, "folding_conv", conv)
    link_fused_relus(module)
    return module


# Where a ReLU follows a batch norm in the forward order (besides `nn.Sequential`, where it is the next child):
# parent class -> {norm name: ReLU name}.
RELU_AFTER_NORM = {
    ResNetConvLayer: {"normalization": "activation"},
    FastInstResNetVdBottleneck: {"bn1": "act1", "bn2": "act2"},
}
# Residual blocks computing `relu(norm(conv(x)) + shortcut)` last: class -> (that conv of a block, name of the ReLU,
# the class taking over its forward to fuse it, or None where the block's own forward does).
RESIDUAL_RELU = {
    ResNetBasicLayer: (lambda block: block.layer[-1].convolution, "activation", FastInstResNetBasicLayer),
    ResNetBottleNeckLayer: (lambda block: block.layer[-1].convolution, "activation", FastInstResNetBottleNeckLayer),
    FastInstResNetVdBottleneck: (lambda block: block.conv3, "act3", None),
}


def _relu_pairs(parent: nn.Module):
    """(folding conv, ReLU, after a shortcut sum) of `parent` whose ReLU takes that convolution's (folded) output,
    or in a residual block its sum with the shortcut."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        after = dict(zip(names, names[1:]))
    else:
        after = RELU_AFTER_NORM.get(type(parent), {})
    for norm_name, relu_name in after.items():
        norm, relu = children.get(norm_name), children.get(relu_name)
        if type(relu) is nn.ReLU and isinstance(getattr(norm, "folding_conv", None), FastInstFoldingConv2d):
            yield norm.folding_conv, relu, False
    if type(parent) in RESIDUAL_RELU:
        last_conv, relu_name, fused_class = RESIDUAL_RELU[type(parent)]
        conv, relu = last_conv(parent), children.get(relu_name)
        if isinstance(conv, FastInstFoldingConv2d) and type(relu) is nn.ReLU:
            if fused_class is not None:
                parent.__class__ = fused_class
            yield conv, relu, True


def link_fused_relus(module: nn.Module) -> None:
    """Let each folding convolution below `module` apply the ReLU that takes its output (and, in a bottleneck, the
    shortcut sum before it): the ReLU becomes a `FastInstFoldedReLU`, the identity when its convolution fuses."""
    for parent in list(module.modules()):
        for conv, relu, after_sum in list(_relu_pairs(parent)):
            relu.__class__ = FastInstFoldedReLU
            object.__setattr__(relu, "folding_conv", conv)
            object.__setattr__(conv, "fused_relu", relu)
            conv.relu_after_sum = after_sum


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` below `module` by a `FastInstFrozenBatchNorm2d` carrying the same statistics.

    The official models use detectron2's FrozenBN everywhere in the backbone: neither the statistics nor the affine
    parameters are trained, which also makes small per-GPU batches safe.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FastInstFrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.weight.device.type != "meta":
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


# The class flag that says whether a model runs an attention implementation (by name prefix); eager always runs.
ATTENTION_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash": "_supports_flash_attn", "flex": "_supports_flex_attn"}


def backbone_supports_attention(backbone_config, implementation: str | None) -> bool:
    """Whether the backbone built from `backbone_config` accepts the attention `implementation` (True when unknown)."""
    if isinstance(backbone_config, FastInstResNetVdConfig):
        backbone_class = FastInstResNetVdBackbone
    else:
        backbone_class = MODEL_FOR_BACKBONE_MAPPING.get(type(backbone_config), None)
    flag = next((f for prefix, f in ATTENTION_SUPPORT_FLAGS.items() if (implementation or "").startswith(prefix)), None)
    return backbone_class is None or flag is None or getattr(backbone_class, flag, False)


def build_backbone(config: FastInstConfig) -> nn.Module:
    """The backbone named by `config.backbone_config`; its `feature_maps` are the strides 8, 16, 32 maps.

    An attention implementation requested for the whole model (`attn_implementation="sdpa"`) that the backbone cannot
    run (a ResNet has no attention) leaves the backbone at its own default instead of failing.
    """
    if not backbone_supports_attention(config.backbone_config, config.backbone_config._attn_implementation):
        config.backbone_config._attn_implementation_internal = None
    if isinstance(config.backbone_config, FastInstResNetVdConfig):
        backbone = FastInstResNetVdBackbone(config.backbone_config)
    else:
        backbone = load_backbone(config)
    if config.freeze_backbone_batch_norm:
        freeze_batch_norm(backbone)
    return link_conv_norm_pairs(backbone)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Pixel decoder (PPM-FPN)
# ---------------------------------------------------------------------------------------------------------------------
class FastInstConvNormLayer(nn.Module):
    """Conv2d (no bias) + GroupNorm, optionally followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, config: FastInstConfig, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(config.group_norm_groups, out_channels, eps=config.layer_norm_eps)
        self.activation = nn.ReLU() if relu else nn.Identity()

    def forward(self, hidden_state: Tensor) -> Tensor:
        return self.activation(self.norm(self.conv(hidden_state)))


class FastInstPyramidPoolingModule(nn.Module):
    """Pyramid pooling (PSPNet) on the projected stride-32 map: pooled context at several grid sizes, upsampled,
    concatenated with the input and fused by a 1x1 convolution. No normalisation, as upstream."""

    def __init__(self, channels: int, pool_sizes: list[int]):
        super().__init__()
        branch_channels = channels // 4
        self.stages = nn.ModuleList(FastInstPyramidPoolingStage(channels, branch_channels, s) for s in pool_sizes)
        self.bottleneck = nn.Conv2d(channels + len(pool_sizes) * branch_channels, channels, kernel_size=1)

    def forward(self, hidden_state: Tensor) -> Tensor:
        """`hidden_state` [B, C, h, w] -> [B, C, h, w]."""
        size = hidden_state.shape[-2:]
        priors = [
            F.interpolate(F.relu(stage(hidden_state)), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return F.relu(self.bottleneck(torch.cat([*priors, hidden_state], dim=1)))


def adaptive_average_pooling_matrix(size: int, pool_size: int, like: Tensor) -> Tensor:
    """[pool_size, size] matrix whose product with a length-`size` axis equals `adaptive_avg_pool` on it.

    Bin i averages [floor(i * size / pool_size), ceil((i + 1) * size / pool_size)), as torch's adaptive pooling. Built
    from `arange` so that it follows the input size when exported to ONNX (the exported `AdaptiveAvgPool2d` is fixed
    to the example input's size).
    """
    positions = torch.arange(size, device=like.device)
    bins = torch.arange(pool_size, device=like.device).unsqueeze(1)
    starts = torch.div(bins * size, pool_size, rounding_mode="floor")
    ends = torch.div((bins + 1) * size + pool_size - 1, pool_size, rounding_mode="floor")
    inside = (positions >= starts) & (positions < ends)
    return inside.to(like.dtype) / (ends - starts).to(like.dtype)


class FastInstPyramidPoolingStage(nn.Module):
    """Adaptive average pooling to a `pool_size` x `pool_size` grid, then a 1x1 convolution."""

    def __init__(self, in_channels: int, out_channels: int, pool_size: int):
        super().__init__()
        self.pool_size = pool_size
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, hidden_state: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, C', pool_size, pool_size]."""
        height, width = hidden_state.shape[-2:]
        rows = adaptive_average_pooling_matrix(height, self.pool_size, hidden_state)
        columns = adaptive_average_pooling_matrix(width, self.pool_size, hidden_state)
        pooled = torch.einsum("ph,bchw,qw->bcpq", rows, hidden_state, columns)
        return self.conv(pooled)


class FastInstPixelDecoder(nn.Module):
    """PPM-FPN: 1x1 lateral projections (the "input projection" of the paper) and a top-down FPN whose top level
    goes through a pyramid pooling module.

    Lists are indexed by level, 0 = stride 8 (res3), 2 = stride 32 (res5).
    """

    def __init__(self, config: FastInstConfig, in_channels: list[int]):
        super().__init__()
        channels = config.pixel_decoder_channels
        self.lateral_convs = nn.ModuleList(
            FastInstConvNormLayer(c, channels, 1, config, relu=False) for c in in_channels
        )
        self.output_convs = nn.ModuleList(
            FastInstConvNormLayer(channels, channels, 3, config, relu=True) for _ in in_channels
        )
        self.ppm = FastInstPyramidPoolingModule(channels, config.ppm_pool_sizes)

    def forward(self, features: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """`features`: backbone maps at strides 8, 16, 32. Returns (E5, E4, E3), each [B, C, h_s, w_s]."""
        hidden_state = self.output_convs[-1](self.ppm(self.lateral_convs[-1](features[-1])))
        outputs = [hidden_state]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[level](features[level])
            top_down = F.interpolate(hidden_state, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            hidden_state = self.output_convs[level](lateral + top_down)
            outputs.append(hidden_state)
        return tuple(outputs)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Instance-activation-guided query proposal
# ---------------------------------------------------------------------------------------------------------------------
class FastInstQueryProposal(nn.Module):
    """Picks the initial queries: an auxiliary classifier scores every E4 pixel, and the `num_queries` pixels with the
    highest foreground class probability, local maxima first, become the instance-activation-guided (IA) queries.
    The learnable auxiliary queries are appended after them."""

    def __init__(self, config: FastInstConfig):
        super().__init__()
        hidden_dim = config.hidden_dim
        self.num_queries = config.num_queries
        self.conv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1)
        self.classifier = nn.Conv2d(hidden_dim, config.num_labels + 1, kernel_size=1)
        self.auxiliary_query_features = nn.Embedding(config.num_auxiliary_queries, hidden_dim)
        self.auxiliary_query_position_embeddings = nn.Embedding(config.num_auxiliary_queries, hidden_dim)

    @staticmethod
    def score_map(proposal_logits: Tensor, epsilon: float = 1e-6) -> Tensor:
        """Selection score per pixel, [B, K+1, h, w] logits -> [B, h*w].

        The probability of the pixel's best foreground class, plus 1 where that probability is a local maximum of
        its class channel (>= its 8 neighbours, zero outside the map, and >= `epsilon`), so local maxima rank first.
        """
        probs = proposal_logits.softmax(dim=1)
        best_class = probs[:, :-1].argmax(dim=1, keepdim=True)
        # Comparison with a class range instead of F.one_hot keeps this exportable to ONNX.
        class_range = torch.arange(probs.shape[1], device=probs.device).view(1, -1, 1, 1)
        probs = probs * (class_range == best_class).to(probs.dtype)
        # max_pool pads with -inf rather than 0, which only matters for values < epsilon.
        local_maximum = (probs >= F.max_pool2d(probs, kernel_size=3, stride=1, padding=1)) & (probs >= epsilon)
        scores = probs + local_maximum.to(probs.dtype)
        return scores[:, :-1].flatten(2).max(dim=1).values

    def forward(self, proposal_features: Tensor, position_embeddings: Tensor):
        """
        Args:
            proposal_features: E4, [B, C, h, w].
            position_embeddings: positional embedding grid resized to E4, [1, C, h, w].
        Returns:
            queries [B, Q+A, C], query position embeddings [B, Q+A, C], proposal logits [B, K+1, h, w] and the
            selected flat indices [B, Q].
        """
        batch_size, _, height, width = proposal_features.shape
        if height * width < self.num_queries:
            raise ValueError(
                f"the stride-16 feature map has {height}x{width} cells, fewer than num_queries={self.num_queries}: "
                f"the input ({16 * height}x{16 * width} after padding) is too small for this model"
            )
        proposal_logits = self.classifier(F.relu(self.conv(proposal_features)))
        with torch.no_grad():
            indices = self.score_map(proposal_logits).topk(self.num_queries, dim=1).indices

        def gather(flat: Tensor) -> Tensor:
            # [B, C, h*w] -> [B, Q, C]
            return flat.gather(2, indices.unsqueeze(1).expand(-1, flat.shape[1], -1)).transpose(1, 2)

        queries = gather(proposal_features.flatten(2))
        query_position_embeddings = gather(position_embeddings.flatten(2).expand(batch_size, -1, -1))
        auxiliary_queries = self.auxiliary_query_features.weight.unsqueeze(0).expand(batch_size, -1, -1)
        auxiliary_position = self.auxiliary_query_position_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        queries = torch.cat([queries, auxiliary_queries], dim=1)
        query_position_embeddings = torch.cat([query_position_embeddings, auxiliary_position], dim=1)
        return queries, query_position_embeddings, proposal_logits, indices


def proposal_locations(indices: Tensor, height: int, width: int) -> Tensor:
    """Normalised (x, y) location [B, Q, 2] of flat indices [B, Q] into an `height` x `width` grid.

    linspace puts the corners at exactly 0 and 1, as upstream; the matcher's location cost samples the ground-truth
    masks there (training only, so it stays out of the inference graph).
    """
    x_grid = torch.linspace(0, 1, width, device=indices.device)
    y_grid = torch.linspace(0, 1, height, device=indices.device)
    rows = torch.div(indices, width, rounding_mode="floor")
    return torch.stack([x_grid[indices % width], y_grid[rows]], dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Dual-path decoder layers
# ---------------------------------------------------------------------------------------------------------------------
def eager_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Attention written out: `query` [B, heads, L, D], `key`/`value` [B, heads, S, D], `attention_mask` additive
    [B, heads, L, S] or None. Returns the output [B, L, heads, D] and the weights [B, heads, L, S], which stay in the
    autograd graph (a gradient reaches an attention map a caller retains)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


# Implementations that take a dense [L, S] attention mask; the masked query cross-attention falls back to `sdpa`
# under any other (the flash kernels only take padding masks).
DENSE_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


class FastInstAttention(nn.Module):
    """Multi-head attention through transformers' attention interface (`config._attn_implementation`).

    Its parameters are those of `nn.MultiheadAttention` (packed `in_proj_weight` / `in_proj_bias` for query, key and
    value, then `out_proj`), so official and saved checkpoints load unchanged. With `output_attentions` it runs the
    eager path, whose weights are part of the graph; `sdpa` and the flash kernels return none.
    """

    def __init__(self, config: FastInstConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_dim // config.num_attention_heads
        if self.head_dim * self.num_heads != config.hidden_dim:
            raise ValueError(
                f"hidden_dim={config.hidden_dim} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        self.scaling = self.head_dim**-0.5
        self.dropout = config.dropout
        self.is_causal = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * config.hidden_dim, config.hidden_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * config.hidden_dim))
        self.out_proj = FastInstLinear(config.hidden_dim, config.hidden_dim)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`query` [B, L, C], `key` and `value` [B, S, C]; `attention_mask` bool [B, 1, L, S] (the same for every
        head), True = blocked (no row may be fully blocked). Returns the output [B, L, C] and the weights
        [B, heads, L, S] or None."""
        batch_size, length = query.shape[:2]
        weights, biases = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        query, key, value = (
            linear(states, weight, bias).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            for states, weight, bias in zip((query, key, value), weights, biases)
        )
        implementation = "eager" if output_attentions else self.config._attn_implementation
        if attention_mask is not None:
            # additive, broadcast over the heads: one [B, 1, L, S] tensor instead of one per head
            blocked = attention_mask
            attention_mask = torch.zeros_like(blocked, dtype=query.dtype).masked_fill_(
                blocked, torch.finfo(query.dtype).min
            )
            if implementation not in DENSE_MASK_IMPLEMENTATIONS:
                implementation = "sdpa"
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.out_proj(attn_output.reshape(batch_size, length, -1)), attn_weights


class FastInstAttentionLayer(nn.Module):
    """Post-norm attention sub-layer: `LN(x + MHA(q=x+pos_x, k=memory+pos_memory, v=memory, mask))`."""

    def __init__(self, config: FastInstConfig):
        super().__init__()
        self.attention = FastInstAttention(config)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: Tensor,
        memory: Tensor,
        position_embeddings: Tensor,
        memory_position_embeddings: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`hidden_states` [B, L, C] attends to `memory` [B, S, C]; `attention_mask` [B, 1, L, S], True = blocked.
        Returns the updated `hidden_states` and, with `output_attentions`, the weights [B, heads, L, S]."""
        attended, weights = self.attention(
            hidden_states + position_embeddings,
            memory + memory_position_embeddings,
            memory,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
        )
        return self.norm(hidden_states + self.dropout(attended)), weights


class FastInstFeedForwardLayer(nn.Module):
    """Post-norm FFN sub-layer: `LN(x + fc2(relu(fc1(x))))`."""

    def __init__(self, config: FastInstConfig):
        super().__init__()
        self.fc1 = FastInstLinear(config.hidden_dim, config.dim_feedforward)
        self.fc2 = FastInstLinear(config.dim_feedforward, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.norm(hidden_states + self.dropout(self.fc2(self.dropout(self.fc1(hidden_states, relu=True)))))


class FastInstDualPathDecoderLayer(GradientCheckpointingLayer):
    """One dual-path update: the pixel features attend to the queries (no mask) and go through an FFN, then the
    queries attend to the updated pixel features under the mask predicted by the previous head, attend to each
    other, and go through an FFN. Under gradient checkpointing its activations are recomputed in the backward pass
    (the tensors are passed positionally for that)."""

    def __init__(self, config: FastInstConfig):
        super().__init__()
        self.pixel_cross_attention = FastInstAttentionLayer(config)
        self.pixel_feed_forward = FastInstFeedForwardLayer(config)
        self.query_cross_attention = FastInstAttentionLayer(config)
        self.query_self_attention = FastInstAttentionLayer(config)
        self.query_feed_forward = FastInstFeedForwardLayer(config)

    def forward(
        self,
        query_states: Tensor,
        pixel_states: Tensor,
        query_position_embeddings: Tensor,
        pixel_position_embeddings: Tensor,
        attention_mask: Tensor,
        output_attentions: bool = False,
    ) -> tuple[Tensor, ...]:
        """Queries [B, Q+A, C] and pixels [B, HW, C] in, updated queries and pixels out, followed with
        `output_attentions` by the weights of the pixel cross-, query cross- and query self-attention.
        `attention_mask` [B, 1, Q+A, HW] restricts the query cross-attention (True = blocked)."""
        pixel_states, pixel_cross_weights = self.pixel_cross_attention(
            pixel_states, query_states, pixel_position_embeddings, query_position_embeddings, None, output_attentions
        )
        pixel_states = self.pixel_feed_forward(pixel_states)
        query_states, query_cross_weights = self.query_cross_attention(
            query_states,
            pixel_states,
            query_position_embeddings,
            pixel_position_embeddings,
            attention_mask,
            output_attentions,
        )
        query_states, query_self_weights = self.query_self_attention(
            query_states, query_states, query_position_embeddings, query_position_embeddings, None, output_attentions
        )
        query_states = self.query_feed_forward(query_states)
        if output_attentions:
            return query_states, pixel_states, pixel_cross_weights, query_cross_weights, query_self_weights
        return query_states, pixel_states


# ---------------------------------------------------------------------------------------------------------------------
# 5. Prediction heads
# ---------------------------------------------------------------------------------------------------------------------
class FastInstMLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(FastInstLinear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))

    def forward(self, hidden_states: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, relu=index < len(self.layers) - 1)
        return hidden_states


class FastInstPredictionHead(nn.Module):
    """Class and mask prediction from the instance queries (the first `num_queries`; the auxiliary queries predict
    nothing). Masks are the dot product of a query embedding with a projection of the *current* pixel features."""

    def __init__(self, config: FastInstConfig):
        super().__init__()
        self.num_queries = config.num_queries
        self.query_norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.class_predictor = FastInstMLP(config.hidden_dim, config.hidden_dim, config.num_labels + 1, 3)
        self.mask_embedder = FastInstMLP(config.hidden_dim, config.hidden_dim, config.mask_dim, 3)
        self.pixel_projection = FastInstLinear(config.hidden_dim, config.mask_dim)

    def forward(
        self, query_states: Tensor, pixel_states: Tensor, size: tuple[int, int], predict_class: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """Queries [B, Q+A, C] and pixels [B, h*w, C] -> class logits [B, Q, K+1] (or None), mask logits [B, Q, h, w]."""
        queries = self.query_norm(query_states[:, : self.num_queries])
        class_logits = self.class_predictor(queries) if predict_class else None
        mask_logits = torch.einsum("bqc,blc->bql", self.mask_embedder(queries), self.pixel_projection(pixel_states))
        return class_logits, mask_logits.unflatten(2, size)


def attention_mask_from_masks(mask_logits: Tensor, num_auxiliary_queries: int) -> Tensor:
    """Masked-attention mask from predicted mask logits [B, Q, h, w] -> bool [B, 1, Q+A, h*w] (True = blocked; the
    official model repeats it per head, ours broadcasts it).

    A query attends only where its predicted mask is positive; auxiliary queries and queries with an empty mask
    attend everywhere.
    """
    blocked = mask_logits.flatten(2) < 0
    blocked = F.pad(blocked, (0, 0, 0, num_auxiliary_queries), value=False)
    # Element-wise "an all-blocked row attends everywhere": the in-place indexed form exports badly to ONNX.
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    return blocked[:, None].detach()


class FastInstDecoder(nn.Module):
    """The dual-path Transformer decoder with one prediction head before the first layer and one after each."""

    def __init__(self, config: FastInstConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_auxiliary_queries = config.num_auxiliary_queries
        self.layers = nn.ModuleList(FastInstDualPathDecoderLayer(config) for _ in range(config.decoder_layers))
        self.prediction_heads = nn.ModuleList(FastInstPredictionHead(config) for _ in range(config.decoder_layers + 1))

    def attention_mask(self, mask_logits: Tensor) -> Tensor:
        return attention_mask_from_masks(mask_logits, self.num_auxiliary_queries)

    def forward(
        self,
        query_states: Tensor,
        pixel_states: Tensor,
        query_position_embeddings: Tensor,
        pixel_position_embeddings: Tensor,
        size: tuple[int, int],
        predict_all_classes: bool,
        output_attentions: bool = False,
    ):
        """Runs every layer. Returns per head (initial + one per layer) the class logits (None for the earlier heads
        unless `predict_all_classes`) and mask logits, the queries and pixels before and after each layer, and with
        `output_attentions` the three attention maps of each layer (else an empty tuple)."""
        last_head = len(self.prediction_heads) - 1
        predictions = [
            self.prediction_heads[0](query_states, pixel_states, size, predict_all_classes or last_head == 0)
        ]
        all_query_states, all_pixel_states, attentions = [query_states], [pixel_states], ()
        for index, layer in enumerate(self.layers):
            query_states, pixel_states, *layer_attentions = layer(
                query_states,
                pixel_states,
                query_position_embeddings,
                pixel_position_embeddings,
                self.attention_mask(predictions[-1][1]),
                output_attentions=output_attentions,
            )
            head = self.prediction_heads[index + 1]
            predictions.append(head(query_states, pixel_states, size, predict_all_classes or index + 1 == last_head))
            all_query_states.append(query_states)
            all_pixel_states.append(pixel_states)
            attentions += tuple(layer_attentions)
        return predictions, tuple(all_query_states), tuple(all_pixel_states), attentions


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
class FastInstPreTrainedModel(PreTrainedModel):
    config: FastInstConfig
    config_class = FastInstConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["FastInstDualPathDecoderLayer"]
    # `from_pretrained(dtype=torch.bfloat16 / float16)` keeps these in float32: only the backbone runs in reduced
    # precision (the mask path thresholds logits at 0 for the attention masks; README "Speed" has the splits tried).
    _keep_in_fp32_modules_strict = [
        "pixel_decoder",
        "query_proposal",
        "decoder.layers",
        "decoder.prediction_heads",
        "position_embedding",
    ]
    # Attention goes through `config._attn_implementation` ([`FastInstAttention`]): the pixel cross- and query
    # self-attention run any implementation, the masked query cross-attention (a dense mask) eager or sdpa only.
    _supports_sdpa = True
    _supports_flash_attn = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus a warning naming the tensors with NaN/Inf values: a corrupt or
        diverged checkpoint would otherwise run and find no instance, silently. (Missing and mis-shaped keys are
        reported by transformers' load report, or raise.)"""
        loaded = super().from_pretrained(*args, **kwargs)
        names = non_finite_tensors(loaded[0] if isinstance(loaded, tuple) else loaded)
        if names:
            logger.warning(f"{len(names)} weight tensor(s) hold NaN or Inf values: {', '.join(names[:5])}")
        return loaded

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs):
        """`PreTrainedModel.set_attn_implementation`; a backbone that cannot run the requested implementation keeps
        its own (as when the model is built, see `build_backbone`)."""
        backbone_config = self.config.backbone_config
        if isinstance(attn_implementation, str) and not backbone_supports_attention(
            backbone_config, attn_implementation
        ):
            attn_implementation = {"": attn_implementation, "backbone_config": backbone_config._attn_implementation}
        return super().set_attn_implementation(attn_implementation, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `pipeline("image-segmentation")` loads remote code through AutoModelForImageSegmentation and the example
        # scripts through AutoModelForUniversalSegmentation, while `register_for_auto_class` records a single Auto
        # class per model class: name every entry point here.
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_fastinst.FastInstConfig",
            "AutoModel": "modeling_fastinst.FastInstModel",
            **{
                auto_class: "modeling_fastinst.FastInstForInstanceSegmentation"
                for auto_class in SEGMENTATION_AUTO_CLASSES
            },
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def set_batch_norm_folding(self, enabled: bool = True):
        """Whether eval mode runs the backbone's conv + batch-norm pairs as one folded convolution (the default, see
        `FastInstFoldingConv2d`; as accurate against a float64 reference) or op for op as the official model does,
        which reproduces its float32 rounding (the official-parity tests). Returns the model."""
        for module in self.modules():
            if isinstance(module, FastInstFoldingConv2d):
                module.fold_enabled = enabled
        return self

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False):
        # For code outside transformers, the parent skips every module whose own parameters are all loaded, which
        # includes the containers below that own none (so their upstream init never ran). Every init here goes through
        # `transformers.initialization`, which leaves loaded tensors alone, so no module needs skipping.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module):
        """Upstream's initialisation; containers run after their children, so their special cases win."""
        if isinstance(module, FastInstModel):
            init.trunc_normal_(module.position_embedding, std=self.config.init_std)
        elif isinstance(module, FastInstConvNormLayer):
            # detectron2's c2_xavier_fill (the convolutions have no bias)
            init.kaiming_uniform_(module.conv.weight, a=1)
        elif isinstance(module, FastInstAttention):
            # upstream: xavier for every weight matrix, zero biases (as torch's nn.MultiheadAttention)
            init.xavier_uniform_(module.in_proj_weight)
            init.xavier_uniform_(module.out_proj.weight)
            init.zeros_(module.in_proj_bias)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, FastInstFeedForwardLayer):
            # upstream: xavier for the weight matrices; the biases keep torch's default (set as nn.Linear below)
            init.xavier_uniform_(module.fc1.weight)
            init.xavier_uniform_(module.fc2.weight)
        elif isinstance(module, FastInstFrozenBatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            # torch's default initialisation, which the official heads and proposal classifier keep
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                bound = module.weight[0].numel() ** -0.5
                init.uniform_(module.bias, -bound, bound)


# The Auto classes a saved folder maps to FastInstForInstanceSegmentation (the pipeline and example scripts use the
# last two).
SEGMENTATION_AUTO_CLASSES = (
    "AutoModelForInstanceSegmentation",
    "AutoModelForImageSegmentation",
    "AutoModelForUniversalSegmentation",
)


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `model` that hold a NaN or Inf value."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def pad_for_queries(pixel_values: Tensor, num_queries: int) -> Tensor:
    """Zero-pad `(B, 3, H, W)` at the bottom/right so that the stride-16 map has at least `num_queries` cells.

    Very wide or tall inputs (a 3x10000 strip resizes to about 1x256) or tiny ones have fewer cells than queries to
    pick. The short side grows first (both when that is not enough), in steps of 32 pixels; the padding is part of
    the padded input that post-processing crops away with `image_sizes`, as the processor's own padding.
    """
    height, width = pixel_values.shape[-2:]
    cells_h, cells_w = -(-height // 16), -(-width // 16)
    if cells_h * cells_w >= num_queries:
        return pixel_values
    short, long = sorted((cells_h, cells_w))
    grown = -(-num_queries // long)
    if grown > long:
        grown = long = math.ceil(math.sqrt(num_queries))
    grown_h, grown_w = (grown, long) if cells_h <= cells_w else (long, grown)
    new_height = max(height, -(-grown_h // 2) * 32)
    new_width = max(width, -(-grown_w // 2) * 32)
    return F.pad(pixel_values, (0, new_width - width, 0, new_height - height))


def image_sizes_from_mask(pixel_mask: Tensor) -> Tensor:
    """(height, width) [B, 2] of the real (unpadded) pixels of a bottom/right-padded `pixel_mask` [B, H, W]."""
    return torch.stack([pixel_mask.any(dim=2).sum(dim=1), pixel_mask.any(dim=1).sum(dim=1)], dim=-1)


class FastInstModel(FastInstPreTrainedModel):
    """Backbone, PPM-FPN pixel decoder, IA-guided query proposal and dual-path decoder with its prediction heads.

    `forward` takes `pixel_values` normalised and zero-padded at the bottom/right to a multiple of 32 (what
    [`FastInstImageProcessor`] returns).
    """

    def __init__(self, config: FastInstConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        self.pixel_decoder = FastInstPixelDecoder(config, list(self.backbone.channels))
        size = config.position_embedding_size
        self.position_embedding = nn.Parameter(torch.empty(1, config.hidden_dim, size, size))
        self.query_proposal = FastInstQueryProposal(config)
        self.decoder = FastInstDecoder(config)
        # Reduced precision: each part takes its inputs in its own dtype (see `_keep_in_fp32_modules_strict`).
        parts = (self.backbone, self.pixel_decoder, self.query_proposal, *self.decoder.layers)
        for part in (*parts, *self.decoder.prediction_heads):
            part.register_forward_pre_hook(inputs_in_own_dtype, with_kwargs=True)
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        pixel_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        return_dict: bool | None = None,
    ) -> FastInstModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Normalised images, zero-padded to a multiple of 32. An input whose stride-16 map has fewer cells than
            `num_queries` is zero-padded further (`pad_for_queries`): the mask logits then cover that larger input.
        pixel_mask (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            1 on real pixels, 0 on padding. Like the official model, FastInst does not mask the padding in attention
            (the padded zeros are part of the input it was trained on); the mask only gives `image_sizes`.
        output_auxiliary_logits (`bool`, *optional*):
            Return the predictions of the earlier heads, class logits included (`auxiliary_logits`).
        """
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        if output_auxiliary_logits is None:
            output_auxiliary_logits = config.output_auxiliary_logits
        features = tuple(self.backbone(pad_for_queries(pixel_values, config.num_queries)).feature_maps[-3:])
        multi_scale = self.pixel_decoder(features)
        proposal_map, pixel_map = multi_scale[1], multi_scale[2]

        proposal_position = F.interpolate(
            self.position_embedding, size=proposal_map.shape[-2:], mode="bilinear", align_corners=False
        )
        pixel_position = F.interpolate(
            self.position_embedding, size=pixel_map.shape[-2:], mode="bilinear", align_corners=False
        )
        queries, query_position, proposal_logits, proposal_indices = self.query_proposal(
            proposal_map, proposal_position
        )
        pixel_states = pixel_map.flatten(2).transpose(1, 2)
        pixel_position = pixel_position.flatten(2).transpose(1, 2)
        predictions, query_hidden_states, pixel_hidden_states, attentions = self.decoder(
            queries,
            pixel_states,
            query_position,
            pixel_position,
            tuple(pixel_map.shape[-2:]),
            predict_all_classes=output_auxiliary_logits,
            output_attentions=output_attentions,
        )
        auxiliary_logits = [
            {"class_queries_logits": class_logits, "masks_queries_logits": mask_logits}
            for class_logits, mask_logits in predictions[:-1]
        ]
        hidden = output_hidden_states  # shorthand for the optional fields below
        output = FastInstModelOutput(
            class_queries_logits=predictions[-1][0],
            masks_queries_logits=predictions[-1][1],
            auxiliary_logits=auxiliary_logits if output_auxiliary_logits else None,
            proposal_logits=proposal_logits,
            proposal_indices=proposal_indices,
            encoder_last_hidden_state=features[-1],
            pixel_decoder_last_hidden_state=pixel_hidden_states[-1].transpose(1, 2).unflatten(2, pixel_map.shape[-2:]),
            transformer_decoder_last_hidden_state=query_hidden_states[-1],
            query_position_embeddings=query_position if hidden else None,
            pixel_position_embeddings=pixel_position.expand(pixel_values.shape[0], -1, -1) if hidden else None,
            query_hidden_states=query_hidden_states if hidden else None,
            pixel_hidden_states=pixel_hidden_states if hidden else None,
            encoder_hidden_states=features if hidden else None,
            pixel_decoder_hidden_states=multi_scale if hidden else None,
            attentions=attentions if output_attentions else None,
            image_sizes=image_sizes_from_mask(pixel_mask) if pixel_mask is not None else None,
        )
        return output if (return_dict if return_dict is not None else config.return_dict) else output.to_tuple()


class FastInstForInstanceSegmentation(FastInstPreTrainedModel):
    """FastInst with its training losses. Give `mask_labels` and `class_labels` to get `loss`; at inference use
    [`FastInstImageProcessor.post_process_instance_segmentation`] on the output."""

    def __init__(self, config: FastInstConfig):
        super().__init__(config)
        self.model = FastInstModel(config)
        self.criterion = FastInstLoss(config)
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        mask_labels: list[Tensor] | None = None,
        class_labels: list[Tensor] | None = None,
        pixel_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        return_dict: bool | None = None,
    ) -> FastInstForInstanceSegmentationOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Normalised images, zero-padded to a multiple of 32.
        mask_labels (`list[torch.Tensor]`, *optional*):
            Per image, the ground-truth instance masks `(num_instances, height, width)` at the padded input size.
        class_labels (`list[torch.LongTensor]`, *optional*):
            Per image, the contiguous class id `(num_instances,)` of each mask.
        pixel_mask (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            1 on real pixels, 0 on padding; only used for `image_sizes`, see [`FastInstModel.forward`].
        output_auxiliary_logits (`bool`, *optional*):
            Return the predictions of the earlier heads (`auxiliary_logits`) also without labels.
        """
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("mask_labels and class_labels must be given together")
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        if output_auxiliary_logits is None:
            output_auxiliary_logits = config.output_auxiliary_logits
        deep_supervision = mask_labels is not None and config.use_auxiliary_loss
        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            # the GT-mask-guided branch re-runs the layers on their recorded inputs
            output_hidden_states=output_hidden_states or deep_supervision,
            output_attentions=output_attentions,
            output_auxiliary_logits=output_auxiliary_logits or deep_supervision,
            return_dict=True,
        )
        auxiliary_logits = outputs.auxiliary_logits
        loss = loss_dict = None
        if mask_labels is not None:
            loss_dict, auxiliary_logits = self.compute_loss(outputs, pixel_values, mask_labels, class_labels)
            loss = sum(loss_dict.values())
        hidden = output_hidden_states  # shorthand for the optional fields below
        output = FastInstForInstanceSegmentationOutput(
            loss=loss,
            class_queries_logits=outputs.class_queries_logits,
            masks_queries_logits=outputs.masks_queries_logits,
            auxiliary_logits=auxiliary_logits if (output_auxiliary_logits or deep_supervision) else None,
            proposal_logits=outputs.proposal_logits,
            proposal_indices=outputs.proposal_indices,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=outputs.pixel_decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=outputs.transformer_decoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states if hidden else None,
            pixel_decoder_hidden_states=outputs.pixel_decoder_hidden_states if hidden else None,
            query_hidden_states=outputs.query_hidden_states if hidden else None,
            pixel_hidden_states=outputs.pixel_hidden_states if hidden else None,
            attentions=outputs.attentions,
            image_sizes=outputs.image_sizes,
            loss_dict=loss_dict,
        )
        return output if (return_dict if return_dict is not None else config.return_dict) else output.to_tuple()

    def compute_loss(
        self,
        outputs: FastInstModelOutput,
        pixel_values: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]] | None]:
        """The weighted loss terms, and the auxiliary predictions they supervise (GT-mask-guided ones first, as
        upstream orders its deep-supervision outputs) without the per-target matching indices."""
        validate_targets(
            mask_labels,
            class_labels,
            pixel_values.shape[0],
            outputs.masks_queries_logits.shape[-2:],
            self.config.num_labels,
        )
        locations = proposal_locations(outputs.proposal_indices, *outputs.proposal_logits.shape[-2:])
        auxiliary_logits = outputs.auxiliary_logits or []
        if self.config.use_auxiliary_loss:
            guided = self.gt_mask_guided_predictions(outputs, locations, mask_labels, class_labels)
            auxiliary_logits = guided + auxiliary_logits
        final = {
            "class_queries_logits": outputs.class_queries_logits,
            "masks_queries_logits": outputs.masks_queries_logits,
        }
        loss_dict = self.criterion(
            auxiliary_logits + [final], outputs.proposal_logits, locations, mask_labels, class_labels
        )
        # The matching indices vary in size with the number of targets: they stay out of the returned outputs.
        returned = [
            {key: value for key, value in entry.items() if key != "matching_indices"} for entry in auxiliary_logits
        ]
        return loss_dict, returned

    def gt_mask_guided_predictions(
        self,
        outputs: FastInstModelOutput,
        query_locations: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
    ) -> list[dict]:
        """GT-mask-guided learning (training only): each layer i is run again on its own output, with an attention
        mask that lets every matched query see only its ground-truth mask, then prediction head i+1 is applied.

        As upstream, the queries are matched once, on the last head's predictions, and those matches are reused by
        the losses of these predictions.
        """
        decoder = self.model.decoder
        mask_size = tuple(outputs.masks_queries_logits.shape[-2:])
        matching_indices = self.criterion.matcher(
            outputs.class_queries_logits,
            outputs.masks_queries_logits,
            query_locations,
            mask_labels,
            class_labels,
        )
        gt_attention_mask = build_gt_attention_mask(
            matching_indices,
            mask_labels,
            mask_size,
            outputs.query_hidden_states[0].shape[1],
            device=outputs.masks_queries_logits.device,
        )
        guided = []
        for index, layer in enumerate(decoder.layers):
            query_states, pixel_states = layer(
                outputs.query_hidden_states[index + 1],
                outputs.pixel_hidden_states[index + 1],
                outputs.query_position_embeddings,
                outputs.pixel_position_embeddings,
                gt_attention_mask,
            )
            class_logits, mask_logits = decoder.prediction_heads[index + 1](query_states, pixel_states, mask_size)
            guided.append(
                {
                    "class_queries_logits": class_logits,
                    "masks_queries_logits": mask_logits,
                    "matching_indices": matching_indices,
                }
            )
        return guided


__all__ = ["FastInstPreTrainedModel", "FastInstModel", "FastInstForInstanceSegmentation"]
