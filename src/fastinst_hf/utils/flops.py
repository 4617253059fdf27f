"""The one FLOPs count of a forward pass, for `fastinst-hf info` and the benchmark.

torch's `FlopCounterMode` counts a multiply-add as 2 FLOPs. The FastInst paper's GFLOPs come from detectron2's
fvcore counter, which counts a multiply-add as 1: `paper_gflops` converts. torchvision's `deform_conv2d` has no
formula in torch, so one is registered here (the dense convolution's count: the bilinear sampling is not counted,
as fvcore does not count it either).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula


def _deform_conv2d_flops(input_shape, weight_shape, offset_shape, *args, out_shape=None, **kwargs) -> int:
    """2 × (output elements) × (input channels per group × kernel area) for a `deform_conv2d` call."""
    batch, out_channels, out_h, out_w = out_shape
    _, in_per_group, kernel_h, kernel_w = weight_shape
    return 2 * batch * out_channels * out_h * out_w * in_per_group * kernel_h * kernel_w


def _register_deform_conv2d() -> None:
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    register_flop_formula(torch.ops.torchvision.deform_conv2d, get_raw=False)(_deform_conv2d_flops)


_register_deform_conv2d()


def count_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs (multiply-add = 2) of one `model(**inputs)` call under `torch.no_grad()`; its outputs are discarded."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return counter.get_total_flops()


def paper_gflops(flops: int) -> float:
    """`flops` in the paper's unit: GFLOPs as detectron2's fvcore counts them (a multiply-add = 1)."""
    return flops / 2e9
