"""The one runtime factory: every way to run the network, by name, shared by `predict` and `benchmark`.

A runtime is called like the model, `runner(pixel_values, pixel_mask=None)`, and returns an object with
`class_queries_logits` and `masks_queries_logits`, which the image processor's post-processing accepts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# torch and the levers are imported where used: `fastinst-hf --help` lists the runtime names without loading torch.


BF16_WEIGHTS = "bf16-weights"


@dataclass(frozen=True)
class Runtime:
    """One way to run the network: torch levers (see `prepare_for_inference`) + precision, or the exported ONNX
    graph run by `graph_runtime` ("onnxruntime" or "openvino"; with precision "int8", quantized by NNCF with
    `int8_scheme` of `INT8_SCHEMES` and calibrated on the given images)."""

    name: str
    model_folds: bool = True  # the model's own eval-mode batch-norm folding (False: op for op, as the official)
    fold_norms: bool = False
    channels_last: bool = False
    compile: bool = False
    precision: str = "fp32"
    graph_runtime: str | None = None
    int8_scheme: str | None = None
    weights_split: str | None = None  # bfloat16 weights, this `precision.FP32_SPLITS` split kept in float32


RUNTIMES = {
    runtime.name: runtime
    for runtime in (
        Runtime("eager"),
        Runtime("unfolded", model_folds=False),
        Runtime("folded", fold_norms=True),
        Runtime("folded+channels_last", fold_norms=True, channels_last=True),
        Runtime("compile", fold_norms=True, compile=True),
        Runtime("onnxruntime", graph_runtime="onnxruntime"),
        Runtime("openvino", graph_runtime="openvino"),
        Runtime("openvino-int8", graph_runtime="openvino", precision="int8", int8_scheme="backbone"),
        Runtime("openvino-int8-all", graph_runtime="openvino", precision="int8", int8_scheme="all"),
        Runtime("bf16+channels_last", fold_norms=True, channels_last=True, precision="bf16"),
        # what `from_pretrained(..., dtype=torch.bfloat16)` loads (`_keep_in_fp32_modules_strict`)
        Runtime(BF16_WEIGHTS, precision="bf16", weights_split="all-but-backbone"),
        Runtime("cuda-fp16", fold_norms=True, precision="fp16"),
        Runtime("cuda-bf16", fold_norms=True, precision="bf16"),
    )
}
# `predict`'s default: the fastest float32 torch setup of `fastinst-hf benchmark` on each device type, or bfloat16
# weights where `precision.choose_precision` picks them.
AUTO = "auto"


def default_runtime(device) -> str:
    """The runtime `auto` stands for: on CPU the model as loaded (which folds its norms into oneDNN convolutions with
    their ReLUs fused, faster than a plain folded copy), folded norms elsewhere."""
    return "eager" if device.type == "cpu" else "folded"


def runtime_unavailable(runtime: Runtime, device) -> str | None:
    """Why `runtime` cannot run on `device` (a `torch.device`) here, or None."""
    from .levers import cpu_supports_bf16, int8_unavailable

    if runtime.name.startswith("cuda") and device.type != "cuda":
        return "CUDA runtimes run on CUDA only"
    if runtime.graph_runtime is not None and device.type != "cpu":
        return f"the {runtime.graph_runtime} runtime is CPU only here"
    if runtime.graph_runtime is not None and importlib.util.find_spec(runtime.graph_runtime) is None:
        return f"the package {runtime.graph_runtime} is not installed"
    if runtime.precision == "int8" and (reason := int8_unavailable()):
        return reason
    if device.type == "cpu" and runtime.precision == "bf16" and not cpu_supports_bf16():
        return "this CPU has no bf16 units (emulated bf16 is slower than fp32); pass --force-bf16 to time it anyway"
    return None


class TorchRuntime:
    """The PyTorch model with `runtime`'s levers, fed channels_last inputs when the runtime says so."""

    def __init__(self, model, runtime: Runtime):
        import copy

        import torch

        from .levers import AutocastModel, prepare_for_inference, to_channels_last
        from .precision import apply_split

        self.op_for_op = not runtime.model_folds
        if runtime.weights_split is not None:
            self.model = apply_split(copy.deepcopy(model), torch.bfloat16, runtime.weights_split)
        else:
            self.model = prepare_for_inference(model, runtime.fold_norms, runtime.channels_last, runtime.compile)
        if runtime.precision != "fp32" and runtime.weights_split is None:
            self.model = AutocastModel(self.model, runtime.precision)
        self.layout = to_channels_last if runtime.channels_last else None

    def __call__(self, pixel_values, pixel_mask=None):
        if self.layout is not None:
            pixel_values = self.layout(pixel_values)
        if not self.op_for_op:
            return self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        self.model.set_batch_norm_folding(False)  # for this call only: the model is shared with other runtimes
        try:
            return self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        finally:
            self.model.set_batch_norm_folding(True)


def build_runtime(
    runtime: Runtime | str,
    model,
    graph_dir: str | Path,
    calibration: Sequence = (),
    num_threads: int | None = None,
    spinning: bool = True,
):
    """The runner of `runtime` (a name of `RUNTIMES` or a `Runtime`) for `model` (on its device).

    Graph runtimes run `model`'s ONNX graph cached under `graph_dir` (exported on first use, see `cached_graph`);
    int8 ones quantize it on `calibration` (`(B, 3, H, W)` normalised tensors). `spinning=False`: onnxruntime's idle
    threads sleep (for timing other processes meanwhile).
    """
    from .levers import OnnxRuntimeModel, OpenVinoModel, cached_graph, quantized_graph

    runtime = RUNTIMES[runtime] if isinstance(runtime, str) else runtime
    if runtime.graph_runtime is None:
        return TorchRuntime(model, runtime)
    path = cached_graph(model, graph_dir)
    if runtime.precision == "int8":
        path = quantized_graph(path, list(calibration), runtime.int8_scheme)
    if runtime.graph_runtime == "onnxruntime":
        return OnnxRuntimeModel(path, num_threads=num_threads, config=model.config, spinning=spinning)
    return OpenVinoModel(path, num_threads=num_threads, config=model.config)
