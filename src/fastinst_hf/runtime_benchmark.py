"""Side-by-side speed of FastInst runtimes and precisions, with the official protocol (`bench_official.py`).

Protocol (as the official-parity tool times the official model): random weights of a released variant, a 480x640
RGB image resized to the variant's test size outside the timed region (detectron2 rule, PIL bilinear), then
- "network": the forward pass on the normalised, zero-padded tensor (prepared outside);
- "postprocess": top-100 instances at 480x640 (threshold 0, as upstream) from the network outputs;
- "full": normalise + pad + network + postprocess (the official `model([{"image", "height", "width"}])`).
Every runtime is timed once per round, rounds repeated (A, B, A, B, ...), so machine load drifts hit all of them
alike; medians and min-max spreads are reported, with ratios to the first runtime.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .inference_levers import (
    OnnxRuntimeModel,
    autocast_context,
    cpu_supports_bf16,
    prepare_for_inference,
    to_channels_last,
)

# ImageNet mean / std on 0-255 values, as the official model normalises its input.
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


@dataclass
class Runtime:
    """One way to run the network: torch levers (see `prepare_for_inference`) + precision, or onnxruntime."""

    name: str
    fold_norms: bool = False
    channels_last: bool = False
    compile: bool = False
    precision: str = "fp32"
    onnxruntime: bool = False


RUNTIMES = {
    runtime.name: runtime
    for runtime in (
        Runtime("eager"),
        Runtime("folded", fold_norms=True),
        Runtime("folded+channels_last", fold_norms=True, channels_last=True),
        Runtime("compile", fold_norms=True, compile=True),
        Runtime("onnxruntime", onnxruntime=True),
        Runtime("bf16+channels_last", fold_norms=True, channels_last=True, precision="bf16"),
        Runtime("cuda-fp16", fold_norms=True, precision="fp16"),
        Runtime("cuda-bf16", fold_norms=True, precision="bf16"),
    )
}
DEFAULT_RUNTIMES = ("eager", "folded", "folded+channels_last", "onnxruntime", "bf16+channels_last")


def normalise_and_pad(images: torch.Tensor, size_divisibility: int = 32) -> torch.Tensor:
    """`(B, 3, H, W)` 0-255 float -> normalised, zero-padded at the bottom/right to a multiple of 32."""
    images = (images - PIXEL_MEAN.to(images.device)) / PIXEL_STD.to(images.device)
    height, width = images.shape[-2:]
    pad_h = -(-height // size_divisibility) * size_divisibility - height
    pad_w = -(-width // size_divisibility) * size_divisibility - width
    return F.pad(images, (0, pad_w, 0, pad_h))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_runner(runtime: Runtime, model, example: torch.Tensor, workdir: Path) -> Callable:
    """`pixel_values -> outputs` for `runtime` (model already on the example's device)."""
    if runtime.onnxruntime:
        from .onnx_export import export_onnx

        path = export_onnx(model, workdir / "model.onnx", *example.shape[-2:], dynamic=True)
        return OnnxRuntimeModel(path, num_threads=torch.get_num_threads())
    prepared = prepare_for_inference(model, runtime.fold_norms, runtime.channels_last, runtime.compile)
    autocast = autocast_context(runtime.precision, example.device)

    def run(pixel_values):
        if runtime.channels_last:
            pixel_values = to_channels_last(pixel_values)
        with autocast:
            outputs = prepared(pixel_values)
        # Post-processing in float32, whatever the network ran in.
        outputs.class_queries_logits = outputs.class_queries_logits.float()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float()
        return outputs

    return run


def available(runtime: Runtime, device: torch.device) -> str | None:
    """Why `runtime` cannot run here, or None."""
    if runtime.name.startswith("cuda") != (device.type == "cuda"):
        return "CUDA runtimes run on CUDA only, CPU runtimes on CPU only"
    if runtime.onnxruntime and device.type != "cpu":
        return "the onnxruntime runtime is CPU only here"
    if device.type == "cpu" and runtime.precision == "bf16" and not cpu_supports_bf16():
        return "this CPU has no bf16 units (emulated bf16 is slower than fp32); pass --force-bf16 to time it anyway"
    return None


def summarise(times_ms: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "runs_ms": [round(t, 3) for t in times_ms],
    }


@dataclass
class Case:
    """What every runtime is timed on: one image (B copies) resized, and the post-processing target size."""

    images: torch.Tensor  # (B, 3, h, w) 0-255 float at the model input size
    target_size: tuple[int, int]
    processor: object
    device: torch.device
    pixel_values: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.pixel_values = normalise_and_pad(self.images).to(self.device)

    def postprocess(self, outputs):
        batch = self.images.shape[0]
        return self.processor.instance_inference(
            outputs,
            threshold=0.0,
            target_sizes=[self.target_size] * batch,
            image_sizes=[tuple(self.images.shape[-2:])] * batch,
        )


def time_interleaved(runners: dict[str, Callable], case: Case, warmup: int, runs: int) -> dict[str, dict]:
    """Times network / postprocess / full of every runner, one after the other in each round."""
    stages = {name: {"network": [], "postprocess": [], "full": []} for name in runners}
    for round_index in range(warmup + runs):
        for name, run in runners.items():
            synchronize(case.device)
            start = time.perf_counter()
            outputs = run(case.pixel_values)
            synchronize(case.device)
            forwarded = time.perf_counter()
            case.postprocess(outputs)
            synchronize(case.device)
            post = time.perf_counter()
            outputs = run(normalise_and_pad(case.images.to(case.device)))
            case.postprocess(outputs)
            synchronize(case.device)
            end = time.perf_counter()
            if round_index >= warmup:
                stages[name]["network"].append((forwarded - start) * 1000)
                stages[name]["postprocess"].append((post - forwarded) * 1000)
                stages[name]["full"].append((end - post) * 1000)
    return {name: {stage: summarise(times) for stage, times in result.items()} for name, result in stages.items()}


def run_official(python: str, tools_dir: str, variant_key: str, runs: int, warmup: int, threads: int) -> dict:
    """The official model timed by the parity tool's `bench_official.py`, in its own environment (subprocess)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "official.json"
        command = [python, "-W", "ignore", "bench_official.py", "--json", str(out), "--runs", str(runs)]
        command += ["--warmup", str(warmup), "--threads", str(threads), variant_key]
        subprocess.run(command, cwd=tools_dir, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())["results"][variant_key]


def cpu_description() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
        model = f"{names[0] if names else model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"
    return model


def as_numpy_image(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def make_case(config, image: np.ndarray, batch_size: int, processor, device: torch.device) -> Case:
    """`image` (H, W, 3) uint8 resized to the config's test size (detectron2 rule, PIL bilinear), B copies."""
    from PIL import Image

    from .image_processing_fastinst import get_fastinst_output_image_size

    height, width = get_fastinst_output_image_size(
        image.shape[0], image.shape[1], config.test_shortest_edge, config.test_longest_edge
    )
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    chw = torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1).copy())
    return Case(chw[None].repeat(batch_size, 1, 1, 1), tuple(image.shape[:2]), processor, device)


def time_training_step(config, batch_size: int, size: int, steps: int, warmup: int) -> dict:
    """One optimisation step (forward with the loss, backward, AdamW step) on random images and square masks."""
    import resource

    from . import FastInstForInstanceSegmentation

    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixel_values = torch.randn(batch_size, 3, size, size)
    mask_labels, class_labels = [], []
    for index in range(batch_size):
        masks = torch.zeros(3, size, size)
        for k in range(3):
            start = 32 * (k + index + 1)
            masks[k, start : start + size // 4, start : start + size // 3] = 1
        mask_labels.append(masks)
        class_labels.append(torch.tensor([0, 1, 2]))
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**summarise(times), "batch_size": batch_size, "size": size, "process_peak_rss_mib": peak_kib / 1024}


def time_mask2former(case: Case, warmup: int, runs: int) -> dict:
    """transformers' Mask2Former with a ResNet-50 backbone, random weights, same input: network and full."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        ResNetConfig,
    )

    backbone = ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone)).eval()
    processor = Mask2FormerImageProcessor()
    times = {"network": [], "full": []}
    for round_index in range(warmup + runs):
        start = time.perf_counter()
        outputs = model(pixel_values=case.pixel_values)
        forwarded = time.perf_counter()
        processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=[case.target_size])
        end = time.perf_counter()
        if round_index >= warmup:
            times["network"].append((forwarded - start) * 1000)
            times["full"].append((end - start) * 1000)
    return {stage: summarise(values) for stage, values in times.items()}


def time_yolo(model_yaml: str, image: np.ndarray, warmup: int, runs: int) -> dict:
    """ultralytics YOLO segmentation built from its yaml (random weights), `predict` at 640 on the same image."""
    from ultralytics import YOLO

    model = YOLO(model_yaml)
    bgr = np.ascontiguousarray(image[..., ::-1])
    times = []
    for round_index in range(warmup + runs):
        start = time.perf_counter()
        model.predict(bgr, imgsz=640, device="cpu", verbose=False)
        if round_index >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return {"full": summarise(times)}
