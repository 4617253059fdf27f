"""Inference speed levers for FastInst on CPU (and CUDA), each behind its own switch.

- `fold_batch_norms`: a copy of the model whose (frozen or eval-mode) batch norms are folded into the preceding
  convolutions for good (plain convolutions; the model itself already runs them folded in eval mode, see
  `FastInstFoldingConv2d`, with the same math). The original model and its state dict are untouched.
- `relu_in_place`: the folded copy's ReLUs overwrite their input (a tensor made just before), bit-identical.
- `channels_last`: NHWC memory format for the convolutions (oneDNN's preferred layout on CPU).
- `compile`: `torch.compile` of the forward pass.
- `autocast_context("bf16")`: bfloat16 autocast, useful only on CPUs with bf16 units (`cpu_supports_bf16`);
  on other CPUs it is emulated and slower.
- `OnnxRuntimeModel`: the exported ONNX graph (`onnx_export.export_onnx`) run by onnxruntime.
- `OpenVinoModel`: the same graph run by OpenVINO (optional package `openvino`).
- `quantized_graph`: that graph quantized to int8 by NNCF post-training quantization (optional package `nncf`),
  calibrated on images the caller gives, and run by `OpenVinoModel`.

Which ones pay, and by how much, is measured by `fastinst-hf benchmark`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import importlib.util
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..modeling_fastinst import FastInstFoldingConv2d, folded_conv_weights
from ..utils.errors import InputError
from ..utils.files import swap_in_folder

PRECISIONS = ("fp32", "bf16", "fp16")


def _fold_into_conv(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A new `nn.Conv2d` (with bias) computing `norm(conv(x))` (the model's own folding math)."""
    weight, bias = folded_conv_weights(conv, norm)
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded.requires_grad_(False)


def _is_foldable_norm(module: nn.Module) -> bool:
    return isinstance(module, FrozenBatchNorm2d) or (
        isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats
    )


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """
    A deep copy of `model` in which every plain `nn.Conv2d` directly followed by a frozen (or eval-mode) batch norm
    is replaced by one convolution with the norm folded in, and the norm by `nn.Identity`.

    "Directly followed" means the next child of the same parent module, in registration order, which is also the
    order of the forward pass in transformers' and timm's ResNets and in our ResNet-vd (conv -> norm -> act).
    Deformable convolutions keep their batch norm. Returns the copy in eval mode; `model` is not modified.
    """
    folded = copy.deepcopy(model).eval()
    for parent in folded.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if (
                type(conv) in (nn.Conv2d, FastInstFoldingConv2d)
                and _is_foldable_norm(norm)
                and norm.weight.shape[0] == conv.out_channels
            ):
                if isinstance(conv, FastInstFoldingConv2d):
                    conv.release_relu()
                setattr(parent, conv_name, _fold_into_conv(conv, norm))
                setattr(parent, norm_name, nn.Identity())
    return folded


# Layers whose ReLU module only ever receives a tensor made just before it (a convolution's or norm's output, or a
# residual sum), so that it may overwrite it: transformers' ResNet layers (also as the model's fusing subclasses of
# them) and our conv + norm layer.
_RELU_IN_PLACE_PARENTS = (
    "ResNetConvLayer",
    "ResNetBasicLayer",
    "ResNetBottleNeckLayer",
    "FastInstResNetBasicLayer",
    "FastInstResNetBottleNeckLayer",
    "FastInstConvNormLayer",
)


def relu_in_place(model: nn.Module) -> nn.Module:
    """Switch the ReLU modules of the layers in `_RELU_IN_PLACE_PARENTS` to in place (same values, one activation
    tensor less to allocate per layer); for inference copies only, as it changes `model` itself."""
    for parent in model.modules():
        if type(parent).__name__ in _RELU_IN_PLACE_PARENTS:
            for child in parent.children():
                if type(child) is nn.ReLU:
                    child.inplace = True
    return model


def prepare_for_inference(
    model: nn.Module, fold_norms: bool = True, channels_last: bool = False, compile: bool = False
) -> nn.Module:
    """The model with the chosen levers applied (a folded copy when `fold_norms`, whose ReLUs also run in place;
    otherwise `model` itself in eval mode). With `channels_last`, feed inputs made by `to_channels_last` for the
    full benefit."""
    model = relu_in_place(fold_batch_norms(model)) if fold_norms else model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


def to_channels_last(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values.contiguous(memory_format=torch.channels_last)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bfloat16 units oneDNN can use (AVX-512 BF16 / AMX on x86, BF16 on Arm)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_context(precision: str, device: torch.device | str = "cpu"):
    """Autocast for `precision` ("fp32": none; "bf16"; "fp16": CUDA only) on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class OnnxRuntimeModel:
    """
    An exported FastInst ONNX graph run by onnxruntime, called like the PyTorch model on `pixel_values`
    `(B, 3, H, W)` (float32, H and W multiples of 32); returns an object with `class_queries_logits` and
    `masks_queries_logits` tensors, which the image processor's post-processing accepts.
    """

    def __init__(self, path, num_threads: int | None = None, config=None, spinning: bool = True):
        import onnxruntime

        self.config = config
        self.device = torch.device("cpu")

        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        if not spinning:  # idle pool threads sleep (the benchmark times other processes meanwhile)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, pixel_values: torch.Tensor, **kwargs) -> SimpleNamespace:
        feed = {"pixel_values": pixel_values.detach().cpu().float().contiguous().numpy()}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        return SimpleNamespace(**{name: torch.from_numpy(value) for name, value in outputs.items()})


def cached_graph(model, cache_dir: str | Path) -> Path:
    """The ONNX graph of `model` (dynamic batch and size) under `cache_dir`, exported on the first call for these
    weights, config and library versions (about a minute for D1) and reused afterwards."""
    from .onnx_export import export_onnx

    path = Path(cache_dir) / graph_key(model) / "model.onnx"
    if not path.is_file():
        side = 32 * max(4, math.ceil(math.ceil(math.sqrt(model.config.num_queries)) / 2))
        export_onnx(model, path, side, side)
    return path


def graph_key(model) -> str:
    """A hex digest of what the exported graph depends on: every weight and buffer, the config, torch and
    fastinst_hf versions (another exporter may write another graph)."""
    from .. import __version__

    digest = hashlib.sha256(f"{torch.__version__} {__version__} {model.config.to_json_string()}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return digest.hexdigest()[:32]


# NNCF settings tried for int8 (`quantized_graph`); the check script measures each one's accuracy.
INT8_SCHEMES = {
    # NNCF's defaults: symmetric int8 weights and activations wherever it can (convolutions, matmuls, einsums).
    "all": {},
    # Asymmetric activations (zero points), for the activations that are not centred on zero.
    "mixed": {"preset": "mixed"},
    # The convolutions only (backbone, pixel decoder, mask features); the transformer's matmuls stay float32.
    "convolutions": {"ignored_types": ("MatMul", "Einsum")},
    # NNCF's transformer model type: keeps softmax/layer-norm inputs and attention scores in float.
    "transformer": {"model_type": "transformer"},
    # Only the ResNet backbone (most of the MACs); the pixel decoder, query proposal and decoder stay float32.
    "backbone": {"modules": ("model.model.backbone",)},
    # The backbone and the pixel decoder (the whole convolutional encoder).
    "encoder": {"modules": ("model.model.backbone", "model.model.pixel_decoder")},
}
# The most accurate scheme on the trained models (still short of the accuracy rule; README "Speed").
DEFAULT_INT8_SCHEME = "backbone"


def quantized_graph(graph: str | Path, calibration: Sequence[torch.Tensor], scheme: str = DEFAULT_INT8_SCHEME) -> Path:
    """The OpenVINO IR (`model.xml` + `.bin`) of the ONNX `graph` quantized to int8 with `scheme` (`INT8_SCHEMES`),
    calibrated on `calibration`: normalised `pixel_values` batches `(B, 3, H, W)` (a few dozen images is plenty).

    Cached in a folder next to `graph`, keyed by the calibration data, the scheme and the NNCF and OpenVINO versions;
    the folder is written whole under a temporary name and renamed, so a reader never sees half an IR.
    """
    nncf = _import_nncf()
    import openvino

    if scheme not in INT8_SCHEMES:
        raise InputError(f"int8 scheme must be one of {', '.join(INT8_SCHEMES)}, got {scheme!r}")
    if not calibration:
        raise InputError("int8 quantization needs at least one calibration image")
    graph = Path(graph)
    arrays = [batch.detach().cpu().float().contiguous().numpy() for batch in calibration]
    digest = hashlib.sha256(f"{scheme} {nncf.__version__} {openvino.__version__}".encode())
    for array in arrays:
        digest.update(f"{array.shape}".encode())
        digest.update(array.tobytes())
    folder = graph.parent / f"int8-{scheme}-{digest.hexdigest()[:24]}"
    if not (folder / "model.xml").is_file():
        nncf.set_log_level(logging.WARNING)  # at INFO, NNCF logs every op an ignored scope keeps in float
        quantized = nncf.quantize(
            openvino.Core().read_model(str(graph)),
            nncf.Dataset(arrays),
            subset_size=len(arrays),
            fast_bias_correction=True,
            **_nncf_arguments(nncf, INT8_SCHEMES[scheme], graph),
        )
        with tempfile.TemporaryDirectory(dir=graph.parent) as temporary:
            # compress_to_fp16=False: the weights left in float stay float32, as in the graph.
            openvino.save_model(quantized, f"{temporary}/ir/model.xml", compress_to_fp16=False)
            swap_in_folder(Path(temporary) / "ir", folder)
    return folder / "model.xml"


def int8_unavailable() -> str | None:
    """Why int8 (`quantized_graph`) cannot run here, or None."""
    if importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None:
        return "int8 needs the optional packages nncf and openvino: pip install 'fastinst-hf[openvino]'"
    return None


def _import_nncf():
    reason = int8_unavailable()
    if reason:
        raise InputError(reason)
    import nncf

    return nncf


def _nncf_arguments(nncf, scheme: dict, graph: Path) -> dict:
    """`nncf.quantize` keyword arguments of one `INT8_SCHEMES` entry for the ONNX `graph`."""
    arguments = {}
    if "modules" in scheme:
        arguments["ignored_scope"] = nncf.IgnoredScope(patterns=_ops_outside(graph, scheme["modules"]), validate=False)
    if "preset" in scheme:
        arguments["preset"] = nncf.QuantizationPreset(scheme["preset"])
    if "ignored_types" in scheme:
        arguments["ignored_scope"] = nncf.IgnoredScope(types=list(scheme["ignored_types"]), validate=False)
    if "model_type" in scheme:
        arguments["model_type"] = nncf.ModelType(scheme["model_type"])
    return arguments


def _ops_outside(graph: Path, modules: tuple[str, ...]) -> list[str]:
    """Patterns of the OpenVINO op names of every node of the ONNX `graph` that no module of `modules` (dotted paths
    of the exported wrapper, e.g. "model.model.backbone") computes, read from the exporter's name-scope metadata.
    OpenVINO names an op after its ONNX node, plus "/suffix" for the parts it splits off (a convolution's bias)."""
    import onnx

    patterns = []
    for node in onnx.load(str(graph), load_external_data=False).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
        if not any(scope.startswith(modules) for scope in ast.literal_eval(scopes)):
            patterns.append(re.escape(node.name) + "(/.*)?")
    return patterns


class OpenVinoModel:
    """The exported ONNX graph (or an OpenVINO IR made by `quantized_graph`) compiled by OpenVINO for the CPU,
    called like `OnnxRuntimeModel`. Float ops run in float32; the int8 ops of a quantized IR in int8."""

    def __init__(self, path, num_threads: int | None = None, config=None):
        import openvino

        self.config = config
        self.device = torch.device("cpu")
        # float32 inference: OpenVINO would otherwise pick bf16 on CPUs that have it, which is another precision.
        properties = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        self.compiled = openvino.Core().compile_model(str(path), "CPU", properties)
        self.request = self.compiled.create_infer_request()

    def __call__(self, pixel_values: torch.Tensor, **kwargs) -> SimpleNamespace:
        results = self.request.infer({0: pixel_values.detach().cpu().float().contiguous().numpy()})
        return SimpleNamespace(
            **{output.get_any_name(): torch.from_numpy(results[output].copy()) for output in self.compiled.outputs}
        )


class AutocastModel(nn.Module):
    """`model` run under `autocast_context(precision)`, its two prediction tensors returned in float32 (the
    post-processing thresholds probabilities, which bfloat16's 8-bit mantissa would blur)."""

    def __init__(self, model: nn.Module, precision: str):
        super().__init__()
        self.model = model
        self.precision = precision
        autocast_context(precision, next(model.parameters()).device)  # validates the precision early

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        with autocast_context(self.precision, pixel_values.device):
            outputs = self.model(pixel_values=pixel_values, **kwargs)
        outputs.class_queries_logits = outputs.class_queries_logits.float()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float()
        return outputs
