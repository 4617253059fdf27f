"""Which precision inference runs in: float32, or bfloat16 weights (`from_pretrained(..., dtype=torch.bfloat16)`)
with the parts of `FP32_SPLITS` kept in float32, where the CPU has bf16 units and the accuracy rule holds.

The accuracy rule (README "Speed"): against float32, mask AP within 0.3 points and >= 95 % of the float32 instances
found again (same class, mask IoU >= 0.9), on the embedded model over held-out shape images and on the nuclei tiles;
`scripts/check_reduced_precision.py --precision bf16-weights --split NAME` measures it for one split.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_fastinst import FastInstPreTrainedModel
from ..utils.errors import InputError

REQUESTS = ("auto", "fp32", "bf16")

# Module-name patterns kept in float32 (searched in parameter / buffer names, as transformers matches
# `_keep_in_fp32_modules_strict` against checkpoint keys); everything else in bfloat16.
FP32_SPLITS = {
    "none": (),
    "heads": ("decoder.prediction_heads",),
    "decoder": ("query_proposal", "decoder.layers", "decoder.prediction_heads", "position_embedding"),
    "all-but-backbone": tuple(FastInstPreTrainedModel._keep_in_fp32_modules_strict),  # the model's own
}
# The split of `FastInstPreTrainedModel._keep_in_fp32_modules_strict`, and whether it passed the accuracy rule on
# both trained models (README "Speed", reduced precision): `choose_precision("auto")` picks bf16 only then.
DEFAULT_SPLIT = "all-but-backbone"
DEFAULT_SPLIT_PASSES = False


def apply_split(model: nn.Module, dtype: torch.dtype, split: str) -> nn.Module:
    """`model` cast in place to `dtype` except the tensors matching `FP32_SPLITS[split]` (kept in float32): what
    `from_pretrained(dtype=...)` gives when `_keep_in_fp32_modules_strict` holds those patterns."""
    if split not in FP32_SPLITS:
        raise InputError(f"split must be one of {', '.join(FP32_SPLITS)}, got {split!r}")
    kept = FP32_SPLITS[split]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(pattern in name for pattern in kept):
            tensor.data = tensor.data.to(dtype)  # the kept ones never pass through `dtype`
    return model


def cpu_has_bf16_units() -> bool:
    """AVX-512 BF16 / AMX on x86 (BF16 on Arm): what oneDNN needs to run bfloat16 faster than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_precision(requested: str, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """The weights dtype for `requested` ("auto", "fp32" or "bf16") on `device`, and a one-line reason to print.

    "auto" is bfloat16 only where it is fast (CUDA with bf16 support, or a CPU with bf16 units) and the default split
    passed the accuracy rule; "bf16" is honoured anywhere (emulated, slowly, on CPUs without bf16 units).
    """
    if requested not in REQUESTS:
        raise InputError(f"--precision must be one of {', '.join(REQUESTS)}, got {requested!r}")
    device = torch.device(device)
    if requested == "fp32":
        return torch.float32, "float32 (asked for)"
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16_units()
    if requested == "bf16":
        note = "" if fast else " (this device has no bf16 units: emulated, slower than float32)"
        return torch.bfloat16, f"bfloat16 weights, {DEFAULT_SPLIT} in float32 (asked for){note}"
    if not fast:
        return torch.float32, f"float32: {device.type} has no bf16 units"
    if not DEFAULT_SPLIT_PASSES:
        return torch.float32, f"float32: bfloat16 (split {DEFAULT_SPLIT}) does not pass the accuracy rule"
    return torch.bfloat16, f"bfloat16 weights, {DEFAULT_SPLIT} in float32 (bf16 units, accuracy rule met)"
