#!/usr/bin/env python
"""One prepared device check of FastInst: correctness, precision, speed, training and a large image, in one go.

    python scripts/gpu_check.py [--device cuda|cpu] [--quick] [--json OUT] [--sections S ...] [--skip CASE ...]

Sections (each one reports its own failure and the run goes on; every case has a `status`: pass, fail, error or
skipped, and a section passes when none of its cases fails or errs):
  correctness  the shipped official fixtures on the device in float32 (TF32 off) against the recorded official
               tensors, eval and train losses (`check_official_parity.py`'s comparison and tolerances); R50-vd-DCN
               forward and backward (deform_conv2d) on the device against CPU; post-processing on the device equal
               to CPU (same instances, scores rel <= 1e-5, < 0.01 % of mask pixels flipped).
  precision    fp16 / bf16, by autocast and by `from_pretrained(dtype=...)`, against float32 on a held-out synthetic
               shapes set (`check_reduced_precision.compare`: COCO mask AP, share of instances matched), and the
               non-finite values in the outputs; the embedded model must pass the AP rule (<= 0.3 AP, >= 95 %
               matched), random-weight D1 / D3 (tiny with --quick) must give finite outputs.
  speed        D1 R50 and D3 R50-vd-DCN (random weights) at their test sizes, batch 1 and 8: eager fp32 / fp16 /
               bf16, torch.compile (and mode="reduce-overhead" on CUDA), ONNX Runtime CUDA / TensorRT providers and
               torch-tensorrt where installed: ms of the network and of image -> instances, images/s, peak memory.
               CUDA events on CUDA, a synchronised perf_counter on CPU; warm-up, then medians of >= 20 runs.
  training     `accelerate launch --mixed_precision fp16` and `bf16` runs against float32 on synthetic shapes:
               finite losses, mean loss of the last 10 steps within TRAIN_LOSS_BAND of float32's, step time, peak
               memory; a float32 run killed (SIGKILL) after its first checkpoint and resumed, whose remaining losses
               must equal the uninterrupted run's (rel RESUME_REL[device]).
  large_image  a 4000x4000 image end to end (processor -> model -> bit-packed masks of every top-k instance):
               stage times and peak memory.
The result goes to --json (written atomically after every section, `finished` true after the last) and, as
Markdown tables, to stdout and next to it (OUT.md).

--quick shrinks everything (toy configs, 64-px inputs, 2-4 training steps, a 512x512 "large" image, 3 timed runs):
on CPU it runs the code of every section in well under a minute (tests/test_gpu_check.py). CPU specifics: fp16
autocast is CUDA-only (skipped), torch.compile uses the "eager" backend in quick mode (Dynamo without Inductor's
minutes of C++ compilation), the graph runtimes run ONNX Runtime's CPU provider, and in quick mode the training runs
that are not killed run in this process (the killed one always goes through `accelerate launch`; with
--launch-training all of them do, as in a full run).
Exit status 0 when every section passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from fastinst_hf.inference.levers import OnnxRuntimeModel

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SECTIONS = ("correctness", "precision", "speed", "training", "large_image")
# Seconds each section may start new cases in a full run (<= 8 min in all on one H100); the rest are skipped.
BUDGET_S = {"correctness": 40, "precision": 70, "speed": 170, "training": 150, "large_image": 30}
REL_DEVICE = 1e-4  # forward on the device vs CPU (float32, TF32 off), max|a-b| / max|ref|
REL_GRAD = 1e-3  # gradients (summed in another order, atomics in the CUDA deform_conv2d backward)
REL_SCORES = 1e-5
MAX_PIXEL_FLIP_FRACTION = 1e-4
TRAIN_LOSS_BAND = 0.10  # |mean loss (last 10 steps) - float32's| / float32's
RESUME_REL = {"cpu": 1e-5, "cuda": 0.05}  # CUDA: non-deterministic kernels make two runs drift apart
TRAIN_LABELS = {0: "ellipse", 1: "rectangle", 2: "triangle"}
TRAIN_TIMEOUT_S = 240  # one training run, start-up included


def script_module(name: str):
    """A sibling script imported as a module (its comparison code is reused, not copied)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Device abstractions: one code path on CPU and CUDA, only these classes differ.


class Clock:
    """ms of `fn()`: CUDA events recorded around it on CUDA, a perf_counter between two synchronisations on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def time(self, fn: Callable):
        from fastinst_hf.utils.device import synchronize

        synchronize(self.device)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end)
        start = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - start) * 1e3

    def repeat(self, fn: Callable, warmup: int, runs: int) -> dict:
        """`summarise` of `runs` timed calls after `warmup` untimed ones."""
        from fastinst_hf.benchmarks.timing import summarise

        for _ in range(warmup):
            self.time(fn)
        return summarise([self.time(fn)[1] for _ in range(runs)])


class PeakMemory:
    """Peak memory since `reset()`: `torch.cuda.max_memory_allocated` on CUDA, the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # not Linux: the peak is then the process's since its start
                Path("/proc/self/clear_refs").write_text("5")

    def mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions on or off (the flags exist, and do nothing, without CUDA)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------------
# The run: sections of cases, each recorded with its status, never stopping the others.


SKIPPED_BY_OPTION, SKIPPED_FOR_TIME = "--skip", "the section's time budget is spent"


class Unavailable(Exception):
    """A case that cannot run here (missing package, CPU-only limitation): recorded as skipped, in one line."""


class Check:
    def __init__(self, device: torch.device, quick: bool, workdir: Path, skip: tuple[str, ...], launch: bool = False):
        self.device, self.quick, self.workdir, self.skip = device, quick, workdir, skip
        self.in_process_training = quick and not launch
        self.clock, self.peak = Clock(device), PeakMemory(device)
        self.sections: dict[str, dict] = {}
        self.section = None
        self.deadline = math.inf

    def run_section(self, name: str, body: Callable) -> None:
        self.section = self.sections[name] = {"status": "pass", "cases": {}}
        self.deadline = math.inf if self.quick else time.monotonic() + BUDGET_S[name]
        start = time.perf_counter()
        try:
            body(self)
        except Exception as error:  # the section's own set-up failed: recorded, the next section runs
            self.section["error"] = one_line(error)
            self.section["traceback"] = traceback.format_exc(limit=-6)
        self.section["seconds"] = round(time.perf_counter() - start, 1)
        statuses = {case["status"] for case in self.section["cases"].values()}
        if "error" in self.section or statuses & {"fail", "error"}:
            self.section["status"] = "fail"
        print(f"[{name}] {self.section['status']} in {self.section['seconds']} s", flush=True)

    def case(self, name: str, body: Callable[..., dict], *args) -> dict:
        """Run one case, `body(*args)`, which returns its numbers with `ok` (pass/fail). An exception makes it an
        error, `Unavailable` a skip."""
        cases = self.section["cases"]
        if any(pattern in name for pattern in self.skip):
            cases[name] = {"status": "skipped", "reason": SKIPPED_BY_OPTION}
        elif time.monotonic() > self.deadline:
            cases[name] = {"status": "skipped", "reason": SKIPPED_FOR_TIME}
        else:
            try:
                result = body(*args)
                cases[name] = {"status": "pass" if result.pop("ok") else "fail", **result}
            except Unavailable as reason:
                cases[name] = {"status": "skipped", "reason": str(reason)}
            except Exception as error:
                cases[name] = {"status": "error", "error": one_line(error), "traceback": traceback.format_exc(-4)}
        line = cases[name].get("reason") or cases[name].get("error") or ""
        print(f"  {name}: {cases[name]['status']} {line}".rstrip(), flush=True)
        return cases[name]


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().cpu().double(), ref.detach().cpu().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item() if ref.numel() else 0.0


def nonfinite(*tensors: torch.Tensor) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


# ---------------------------------------------------------------------------------------------------------------
# Models: the released variants (random weights), toy-sized with --quick.


def toy_or_full_config(name: str, quick: bool):
    """`releases.variant_config(name)`; with `quick` the same structure (backbone kind, decoder layers) at toy
    widths and a 64x96 test size."""
    from transformers import ResNetConfig

    from fastinst_hf import FastInstResNetVdConfig
    from fastinst_hf.releases import variant_config

    if not quick:
        return variant_config(name)
    stages = dict(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"])
    if "vd-dcn" in name:
        backbone = FastInstResNetVdConfig(
            stem_width=8, embedding_size=16, deformable_stages=[False] + [True] * 3, **stages
        )
    else:
        backbone = ResNetConfig(embedding_size=16, layer_type="bottleneck", **stages)
    toy = dict(hidden_dim=32, pixel_decoder_channels=32, mask_dim=32, group_norm_groups=8, num_queries=10)
    toy.update(num_attention_heads=4, dim_feedforward=64, test_shortest_edge=64, test_longest_edge=96)
    return variant_config(name, backbone_config=backbone, id2label=dict(TRAIN_LABELS), **toy)


def random_model(name: str, quick: bool, seed: int = 0, id2label: dict | None = None):
    """A variant with random weights whose deformable offsets are non-zero too (else DCN is a plain conv)."""
    from fastinst_hf import FastInstForInstanceSegmentation

    torch.manual_seed(seed)
    config = toy_or_full_config(name, quick)
    if id2label is not None:
        config.id2label = dict(id2label)
    model = FastInstForInstanceSegmentation(config).eval()
    randomise_offsets(model)
    return model


def randomise_offsets(model) -> None:
    """Non-zero deformable offsets (they are initialised to zero, which makes DCN a plain convolution)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "conv2_offset" in name:
                parameter.normal_(0, 0.05)


def demo_image(height: int, width: int) -> np.ndarray:
    """The first bundled demo image resized to (height, width), `(H, W, 3)` uint8."""
    from fastinst_hf import DEMO_IMAGES
    from fastinst_hf.utils.images import load_image

    return np.asarray(load_image(Path(DEMO_IMAGES[0])).resize((width, height)))


# ---------------------------------------------------------------------------------------------------------------
# 1. Correctness


def correctness(check: Check) -> None:
    parity = script_module("check_official_parity")
    variants = ("d1_r50slim_small",) if check.quick else ("d1_r50slim_small", "d3_r50slim_small")
    for variant in variants:
        check.case(f"official fixture {variant}", fixture_on_device, check, parity, variant)
    check.case("R50-vd-DCN forward+backward vs CPU", dcn_forward_backward, check)
    check.case("post-processing vs CPU", postprocess_vs_cpu, check, parity)


def fixture_model(parity, variant: str, device: torch.device):
    from fastinst_hf.conversion.official import convert_checkpoint

    folder = FIXTURES / variant
    model = convert_checkpoint(folder / "model_state_dict.pt", config_file=folder / "config.yaml").to(device).eval()
    model.set_batch_norm_folding(False)  # op for op, as the official model rounds (the parity tests do the same)
    ref = {
        key: value.to(device) if torch.is_tensor(value) else value for key, value in parity.load_eval(folder).items()
    }
    return folder, model, ref


def fixture_on_device(check: Check, parity, variant: str) -> dict:
    """`check_official_parity`'s eval and train comparisons with the model and the recorded tensors on the device."""
    folder, model, ref = fixture_model(parity, variant, check.device)
    meta = json.loads((folder / "meta.json").read_text())
    table = parity.Table()
    with tf32(False):
        parity.compare_eval(model, ref, meta, table)
        parity.compare_losses(model, folder, ref["images_tensor"], table)
    worst = max((row for row in table.rows if row["kind"] == "float"), key=lambda row: row["rel_value"] / row["tol"])
    return {
        "ok": not table.failed,
        "compared": len(table.rows),
        "failed": table.failed,
        "closest_to_tolerance": f"{worst['name']} rel {worst['rel_value']:.2g} (tol {worst['tol']:.0e})",
    }


def dcn_forward_backward(check: Check) -> dict:
    """The R50-vd-DCN backbone of D1 (toy with --quick): outputs and gradients (input, deformable weights and
    offset convolutions) on the device against CPU, float32, TF32 off. On CPU both runs are CPU runs."""
    from fastinst_hf.modeling_fastinst_resnet_vd import FastInstResNetVdBackbone

    torch.manual_seed(0)
    model = FastInstResNetVdBackbone(toy_or_full_config("fastinst-d1-r50-vd-dcn", check.quick).backbone_config).eval()
    randomise_offsets(model)
    side = 64 if check.quick else 512
    image = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    maps_ref, input_ref, grads_ref = backbone_forward_backward(model, image, torch.device("cpu"))
    maps, input_grad, grads = backbone_forward_backward(model, image, check.device)
    forward = max(rel_diff(a, b) for a, b in zip(maps, maps_ref))
    backward = max([rel_diff(input_grad, input_ref)] + [rel_diff(grads[k], grads_ref[k]) for k in grads_ref])
    return {
        "ok": forward <= REL_DEVICE and backward <= REL_GRAD,
        "forward_rel": forward,
        "backward_rel": backward,
        "tol": f"forward {REL_DEVICE:.0e}, gradients {REL_GRAD:.0e}",
        "conv2_gradients_compared": len(grads_ref),
    }


def backbone_forward_backward(model, image: torch.Tensor, device: torch.device):
    """Feature maps, input gradient and the gradients of every `conv2` weight (deformable and offset convolutions
    included) of `sum(mean(map ** 2))`, all on CPU."""
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    pixel_values = image.to(device).requires_grad_(True)
    with tf32(False):
        maps = model(pixel_values).feature_maps
        sum(feature.square().mean() for feature in maps).backward()
    gradients = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if "conv2" in name}
    return [feature.detach().cpu() for feature in maps], pixel_values.grad.detach().cpu(), gradients


def postprocess_vs_cpu(check: Check, parity) -> dict:
    """The D1 fixture model's outputs post-processed on the device and, moved to CPU, on CPU: the same top-100
    (query, label) pairs, scores and masks; and the same `post_process_instance_segmentation` segments."""
    from fastinst_hf.image_processing_fastinst import FastInstImageProcessor

    folder, model, ref = fixture_model(parity, "d1_r50slim_small", check.device)
    meta = json.loads((folder / "meta.json").read_text())
    with torch.inference_mode(), tf32(False):
        outputs = model(ref["images_tensor"])
    cpu_outputs = SimpleNamespace(
        class_queries_logits=outputs.class_queries_logits.cpu(), masks_queries_logits=outputs.masks_queries_logits.cpu()
    )
    processor = FastInstImageProcessor()
    target = [tuple(int(s) for s in ref["instances.image_size"].tolist())]
    image_sizes = [tuple(meta["image"]["model_input_hw"])]
    device_result, cpu_result = (
        processor.instance_inference(out, target_sizes=target, image_sizes=image_sizes)[0]
        for out in (outputs, cpu_outputs)
    )
    same_pairs = all(torch.equal(device_result[k].cpu(), cpu_result[k]) for k in ("query_indices", "labels"))
    flipped = int((device_result["masks"].cpu() != cpu_result["masks"]).sum()) if same_pairs else -1
    segments = [
        processor.post_process_instance_segmentation(out, threshold=0.0, target_sizes=target, image_sizes=image_sizes)[
            0
        ]
        for out in (outputs, cpu_outputs)
    ]
    same_segments = [s["label_id"] for s in segments[0]["segments_info"]] == [
        s["label_id"] for s in segments[1]["segments_info"]
    ]
    segment_flips = int((segments[0]["segmentation"].cpu() != segments[1]["segmentation"]).sum())
    score_rel = rel_diff(device_result["scores"], cpu_result["scores"]) if same_pairs else math.inf
    return {
        "ok": same_pairs
        and score_rel <= REL_SCORES
        and 0 <= flipped <= MAX_PIXEL_FLIP_FRACTION * cpu_result["masks"].numel()
        and same_segments
        and segment_flips <= MAX_PIXEL_FLIP_FRACTION * segments[1]["segmentation"].numel(),
        "instances": len(cpu_result["labels"]),
        "same_query_label_pairs": same_pairs,
        "scores_rel": score_rel,
        "mask_pixels_flipped": flipped,
        "segments": len(segments[1]["segments_info"]),
        "segment_map_pixels_differing": segment_flips,
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. Precision


class DeviceRunner:
    """Calls `model` on `pixel_values` moved to the device (in `dtype`), returns float32 CPU outputs and counts
    their non-finite values: what `check_reduced_precision.compare` needs to run a device model."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model, self.device, self.dtype, self.nonfinite = model, device, dtype, 0

    def __call__(self, pixel_values: torch.Tensor):
        outputs = self.model(pixel_values.to(self.device, self.dtype))
        logits = outputs.class_queries_logits, outputs.masks_queries_logits
        self.nonfinite += nonfinite(*logits)
        return SimpleNamespace(
            class_queries_logits=logits[0].float().cpu(), masks_queries_logits=logits[1].float().cpu()
        )


def precision(check: Check) -> None:
    from fastinst_hf import DEFAULT_MODEL
    from fastinst_hf.data.synthetic import make_shapes_dataset
    from fastinst_hf.image_processing_fastinst import image_processor_for_config
    from fastinst_hf.inference.loading import load_model_and_processor

    count, size = (1, (96, 96)) if check.quick else (24, (320, 320))
    folder = check.workdir / "precision_shapes"
    # A seed the embedded model was not trained on (as check_reduced_precision.py --shapes).
    coco_json = make_shapes_dataset(folder, count, image_size=size, seed=12345)
    models = {"embedded": Path(DEFAULT_MODEL)}
    for variant in ("fastinst-d1-r50", "fastinst-d3-r50-vd-dcn"):
        directory = check.workdir / variant
        random_model(variant, check.quick, id2label=TRAIN_LABELS).save_pretrained(directory)
        models[f"{variant} random"] = directory
    reduced = script_module("check_reduced_precision")
    for label, directory in models.items():
        model, processor, _ = load_model_and_processor(directory, check.device)
        if label != "embedded":
            processor = image_processor_for_config(model.config)
        evaluation = (processor, coco_json, folder / "images")
        for precision_name in ("fp16", "bf16"):
            for mode in ("autocast", "dtype"):
                arguments = (check, reduced, model, directory, evaluation, precision_name, mode, label)
                check.case(f"{label} {precision_name} {mode}", precision_case, *arguments)


def precision_case(check: Check, reduced, model, directory: Path, evaluation, name: str, mode: str, label: str):
    from fastinst_hf import FastInstForInstanceSegmentation
    from fastinst_hf.inference.levers import AutocastModel

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
    loaded = {}
    if mode == "autocast":
        try:
            candidate = DeviceRunner(AutocastModel(model, name), check.device)
        except ValueError as error:  # levers.autocast_context: fp16 autocast is CUDA-only
            raise Unavailable(one_line(error)) from error
    else:
        half = FastInstForInstanceSegmentation.from_pretrained(directory, dtype=dtype).to(check.device).eval()
        dtypes = [str(p.dtype).removeprefix("torch.") for p in half.parameters()]
        loaded = {"parameter_dtypes": {d: dtypes.count(d) for d in sorted(set(dtypes))}}
        candidate = DeviceRunner(half, check.device, dtype)
    reference = DeviceRunner(model, check.device)
    # The trained model's confident instances; a random model has none above 0.5, so all of its top-k count.
    threshold = 0.5 if label == "embedded" else 0.0
    with tf32(False):
        result = reduced.compare(reference, candidate, *evaluation, name, threshold, 0.9)
    result.pop("bf16_units")
    finite = candidate.nonfinite == 0 and reference.nonfinite == 0
    return {
        # One image (--quick) is too few for the AP rule: it is reported, not applied.
        "ok": finite and (result["passes"] or label != "embedded" or check.quick),
        **result,
        "nonfinite_outputs": candidate.nonfinite,
        **loaded,
    }


# ---------------------------------------------------------------------------------------------------------------
# 3. Speed


def speed(check: Check) -> None:
    from fastinst_hf.benchmarks.runtimes import make_case
    from fastinst_hf.image_processing_fastinst import image_processor_for_config

    image = demo_image(48, 64) if check.quick else demo_image(480, 640)
    batches = (1, 2) if check.quick else (1, 8)
    warmup, runs = (1, 3) if check.quick else (5, 20)
    check.section["protocol"] = (
        f"random weights, a {image.shape[0]}x{image.shape[1]} image resized to the test size, {warmup} warm-up + "
        f"median of {runs} runs; network = forward on the prepared tensor, full = normalise + forward + top-100 "
        "instances at the image size"
    )
    unavailable = set()
    for variant in ("fastinst-d1-r50", "fastinst-d3-r50-vd-dcn"):
        model = random_model(variant, check.quick).to(check.device)
        processor = image_processor_for_config(model.config)
        cases = {batch: make_case(model.config, image, batch, processor, check.device) for batch in batches}
        for runtime, build in runtime_builders(check, model, cases[batches[0]]).items():
            if runtime in unavailable:  # said once, in one line
                continue
            runner = {}
            for batch, case in cases.items():
                name = f"{variant} {runtime} batch {batch}"
                result = check.case(name, time_runtime, check, build, runner, case)
                if result["status"] == "skipped" and result["reason"] not in (SKIPPED_BY_OPTION, SKIPPED_FOR_TIME):
                    unavailable.add(runtime)
                    check.section["cases"][f"{runtime}"] = check.section["cases"].pop(name)
                    break
            runner.clear()
        del model, cases
        if check.device.type == "cuda":
            torch.cuda.empty_cache()


def time_runtime(check: Check, build: Callable, runner: dict, case) -> dict:
    """Build the runner once per model (its time and first call reported as setup), then time it on `case`."""
    from fastinst_hf.benchmarks.timing import normalise_and_pad

    setup_ms = None
    if "run" not in runner:
        start = time.perf_counter()
        runner["run"] = build()
        setup_ms = (time.perf_counter() - start) * 1e3
    run = runner["run"]
    warmup, runs = (1, 3) if check.quick else (5, 20)
    batch = case.images.shape[0]
    with torch.inference_mode():
        first_ms = check.clock.time(lambda: run(case.pixel_values))[1]  # compiles / records graphs for this shape
        check.peak.reset()
        network = check.clock.repeat(lambda: run(case.pixel_values), warmup, runs)
        full = check.clock.repeat(
            lambda: case.postprocess(run(normalise_and_pad(case.images.to(case.device)))), warmup, runs
        )
        peak = check.peak.mib()
        outputs = run(case.pixel_values)
    values = outputs.class_queries_logits, outputs.masks_queries_logits
    return {
        "ok": nonfinite(*values) == 0,
        "network_ms": round(network["median_ms"], 3),
        "full_ms": round(full["median_ms"], 3),
        "network_img_s": round(batch * 1e3 / network["median_ms"], 2),
        "full_img_s": round(batch * 1e3 / full["median_ms"], 2),
        "spread_ms": [round(network["min_ms"], 3), round(network["max_ms"], 3)],
        "peak_mib": round(peak, 1),
        "first_call_ms": round(first_ms, 1),
        **({"setup_ms": round(setup_ms, 1)} if setup_ms is not None else {}),
        "input": list(case.pixel_values.shape),
    }


def runtime_builders(check: Check, model, case) -> dict[str, Callable]:
    """Every runtime of the speed section: name -> a function that builds its `pixel_values -> outputs` runner
    (raising `Unavailable` with one line when it cannot run here)."""
    from fastinst_hf.benchmarks.runtimes import Runtime, build_runner

    cuda = check.device.type == "cuda"
    workdir = check.workdir / f"onnx-{model.config.decoder_layers}-{type(model.model.backbone).__name__}"
    workdir.mkdir(exist_ok=True)

    def eager(precision: str):
        def build():
            if precision == "fp16" and not cuda:
                raise Unavailable("fp16 autocast needs CUDA (inference.levers.autocast_context)")
            return build_runner(Runtime(precision, precision=precision), model, case.pixel_values, workdir)

        return build

    def compiled(mode: str | None):
        def build():
            if mode == "reduce-overhead" and not cuda:
                raise Unavailable("mode='reduce-overhead' (CUDA graphs) needs CUDA")
            # Inductor compiles C++ for minutes on a small CPU: the quick CPU run traces with Dynamo only.
            backend = "eager" if check.quick and not cuda else "inductor"
            torch._dynamo.reset()  # a fresh cache: the other mode's compiled graphs must not be reused
            return torch.compile(model, mode=mode, backend=backend)

        return build

    builders = {"eager fp32": eager("fp32"), "eager fp16": eager("fp16"), "eager bf16": eager("bf16")}
    builders.update({"compile": compiled(None), "compile reduce-overhead": compiled("reduce-overhead")})
    providers = ("CUDAExecutionProvider", "TensorrtExecutionProvider") if cuda else ("CPUExecutionProvider",)
    for provider in providers:
        builders[f"onnxruntime {provider.removesuffix('ExecutionProvider')}"] = lambda p=provider: ort_runner(
            model, case, workdir, p
        )
    builders["torch-tensorrt fp16"] = lambda: torch_tensorrt_runner(model, case, cuda)
    return builders


class OrtProviderModel(OnnxRuntimeModel):
    """`OnnxRuntimeModel` (numpy in and out: the host copies are part of the time) with a session of `provider`,
    ONNX Runtime's CPU provider as the fallback for the ops it lacks."""

    def __init__(self, path: Path, provider: str, cache_dir: Path):
        import onnxruntime

        self.config, self.device = None, torch.device("cpu")
        options = {}
        if provider == "TensorrtExecutionProvider":
            options = {
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
            }
        self.session = onnxruntime.InferenceSession(str(path), providers=[(provider, options), "CPUExecutionProvider"])
        if provider not in self.session.get_providers():
            raise Unavailable(f"onnxruntime did not start {provider} (providers: {self.session.get_providers()})")
        self.output_names = [output.name for output in self.session.get_outputs()]


def ort_runner(model, case, workdir: Path, provider: str):
    from fastinst_hf.inference.onnx_export import export_onnx

    if importlib.util.find_spec("onnxruntime") is None:
        raise Unavailable("onnxruntime is not installed (pip install onnxruntime-gpu)")
    import onnxruntime

    if provider not in onnxruntime.get_available_providers():
        package = "tensorrt and onnxruntime-gpu" if provider.startswith("Tensorrt") else "onnxruntime-gpu"
        raise Unavailable(f"{provider} is not available (pip install {package})")
    path = workdir / "model.onnx"
    if not path.is_file():
        export_onnx(model.cpu(), path, *case.pixel_values.shape[-2:], dynamic=True)
        model.to(case.device)
    return OrtProviderModel(path, provider, workdir)


def torch_tensorrt_runner(model, case, cuda: bool):
    if importlib.util.find_spec("torch_tensorrt") is None:
        raise Unavailable("torch_tensorrt is not installed (pip install torch-tensorrt)")
    if not cuda:
        raise Unavailable("torch-tensorrt needs CUDA")
    import torch_tensorrt

    from fastinst_hf.inference.onnx_export import FastInstOnnxWrapper

    engine = torch_tensorrt.compile(
        FastInstOnnxWrapper(model).eval(),
        ir="dynamo",
        inputs=[case.pixel_values],
        enabled_precisions={torch.float16},
    )

    def run(pixel_values):
        class_logits, mask_logits = engine(pixel_values)
        return SimpleNamespace(class_queries_logits=class_logits.float(), masks_queries_logits=mask_logits.float())

    return run


# ---------------------------------------------------------------------------------------------------------------
# 4. Training


def training(check: Check) -> None:
    from fastinst_hf.data.synthetic import make_shapes_dataset

    root = check.workdir / "train_shapes"
    steps, save_every = (4, 2) if check.quick else (50, 25)
    count, side = (4, 96) if check.quick else (64, 384)
    coco_json = make_shapes_dataset(root, count, image_size=(side, side), seed=3)
    init = ["--config-json", json.dumps(TINY_TRAIN_CONFIG)] if check.quick else ["--init", "fastinst-d1-r50-vd-dcn"]
    arguments = [
        "--train-json", str(coco_json), "--train-images", str(root / "images"), *init,
        "--train-short-edges", str(side), "--train-max-size", str(side), "--crop-prob", "0",
        "--batch-size", "2" if check.quick else "8", "--max-steps", str(steps), "--log-every", "1",
        "--eval-every", "0", "--num-workers", "0" if check.quick else "4", "--seed", "7",
    ]  # fmt: skip
    precisions = ("bf16",) if check.quick and check.device.type == "cpu" else ("fp16", "bf16")
    runs = {}
    check.case("fp32", train_case, check, runs, "fp32", arguments, None)
    for name in precisions:
        check.case(name, train_case, check, runs, name, arguments, runs.get("fp32"))
    check.case("resume after SIGKILL (fp32)", resume_case, check, runs.get("fp32"), arguments, save_every)


TINY_TRAIN_CONFIG = {
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
        "layer_type": "bottleneck",
        "out_features": ["stage2", "stage3", "stage4"],
    },
    **dict(hidden_dim=32, pixel_decoder_channels=32, mask_dim=32, group_norm_groups=8, num_attention_heads=4),
    **dict(dim_feedforward=64, decoder_layers=1, num_queries=10, num_auxiliary_queries=2, train_num_points=256),
    "test_shortest_edge": 96,
    "test_longest_edge": 96,
}


def launch_command(mixed_precision: str, worker_json: Path, arguments: list[str]) -> list[str]:
    """`accelerate launch` of this script's training worker, one process (on CPU: `ACCELERATE_USE_CPU=1`)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(Path(__file__).resolve()),
        "--train-worker", str(worker_json), *arguments,
        # The training CLI's own option too: its default ("no") would override the launcher's.
        "--mixed-precision", mixed_precision,
    ]  # fmt: skip


def launch_environment(device: torch.device) -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if device.type == "cpu":
        environment["ACCELERATE_USE_CPU"] = "1"
    return environment


def train_worker(worker_json: str, arguments: list[str]) -> int:
    """Inside `accelerate launch`: one training, then its wall time and peak memory to `worker_json`."""
    from fastinst_hf.cli import main as cli_main
    from fastinst_hf.utils.files import atomic_write_text

    device = torch.device("cuda" if torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ else "cpu")
    peak = PeakMemory(device)
    peak.reset()
    start = time.perf_counter()
    status = cli_main(["train", *arguments])
    info = {"status": status, "wall_s": time.perf_counter() - start, "peak_mib": peak.mib()}
    atomic_write_text(worker_json, json.dumps(info))
    return status


def train_launched(check: Check, mixed_precision: str, name: str, arguments: list[str]) -> dict:
    """One training under `accelerate launch`; the worker's status, wall time and peak memory."""
    worker_json = check.workdir / f"worker_{name}.json"
    command = launch_command(mixed_precision, worker_json, arguments)
    done = subprocess.run(
        command, env=launch_environment(check.device), capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S
    )
    if done.returncode != 0 or not worker_json.is_file():
        raise RuntimeError(f"accelerate launch exited with {done.returncode}: {done.stderr.strip()[-800:]}")
    return json.loads(worker_json.read_text())


def train_in_process(check: Check, mixed_precision: str, arguments: list[str]) -> dict:
    """The same training in this process (quick runs: no second interpreter start); accelerate's singletons reset."""
    from accelerate.state import AcceleratorState, GradientState

    from fastinst_hf.cli import main as cli_main

    check.peak.reset()
    start = time.perf_counter()
    try:
        status = cli_main(["train", *arguments, "--mixed-precision", mixed_precision])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return {"status": status, "wall_s": time.perf_counter() - start, "peak_mib": check.peak.mib()}


def train_case(check: Check, runs: dict, name: str, arguments: list[str], reference: dict | None) -> dict:
    output_dir = check.workdir / f"train_{name}"
    mixed_precision = "no" if name == "fp32" else name
    args = [*arguments, "--output-dir", str(output_dir)]
    if check.in_process_training:
        info = train_in_process(check, mixed_precision, args)
    else:
        info = train_launched(check, mixed_precision, name, args)
    if info["status"] != 0:
        raise RuntimeError(f"training exited with status {info['status']}")
    records = [row for row in read_metrics(output_dir) if "loss" in row]
    run_info = json.loads((output_dir / "run_info.json").read_text())
    losses = [row["loss"] for row in records]
    last = float(np.mean(losses[-10:]))
    runs[name] = {"records": records, "last_loss": last}
    result = {
        "steps": len(records),
        "mixed_precision_used": run_info.get("mixed_precision"),
        "finite_losses": all(math.isfinite(loss) for loss in losses),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "mean_loss_last_10": round(last, 4),
        "step_ms": round(1e3 / records[-1]["steps_per_s"], 1),
        "wall_s": round(info["wall_s"], 1),
        "peak_mib": round(info["peak_mib"], 1),
    }
    ok = result["finite_losses"] and result["mixed_precision_used"] == mixed_precision
    if reference is not None:
        result["rel_to_fp32"] = round(abs(last - reference["last_loss"]) / reference["last_loss"], 4)
        result["band"] = TRAIN_LOSS_BAND
        ok = ok and result["rel_to_fp32"] <= TRAIN_LOSS_BAND
    return {"ok": ok, **result}


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def resume_case(check: Check, reference: dict | None, arguments: list[str], save_every: int) -> dict:
    """A float32 run under `accelerate launch`, SIGKILLed (its whole process group) as soon as its first checkpoint
    is complete, then resumed: the resumed steps' losses must be the uninterrupted run's."""
    from fastinst_hf.training.checkpoints import latest_checkpoint

    if reference is None:
        raise RuntimeError("no uninterrupted float32 run to compare with (the fp32 case failed)")
    output_dir = check.workdir / "train_killed"
    args = [*arguments, "--output-dir", str(output_dir), "--save-every", str(save_every)]
    command = launch_command("no", check.workdir / "worker_killed.json", args)
    log = check.workdir / "train_killed.log"
    with open(log, "wb") as output:  # a file, not a pipe: a full pipe would stall the run before its checkpoint
        process = subprocess.Popen(
            command, env=launch_environment(check.device), stdout=output, stderr=output, start_new_session=True
        )
    give_up = time.monotonic() + TRAIN_TIMEOUT_S
    while process.poll() is None and latest_checkpoint(output_dir) is None and time.monotonic() < give_up:
        time.sleep(0.02)
    killed_at = latest_checkpoint(output_dir)
    if process.poll() is not None or killed_at is None:
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError(
            f"the run ended (status {process.poll()}) or timed out before it could be killed after a checkpoint: "
            f"{log.read_text(errors='replace')[-500:]}"
        )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed_args = [*args, "--resume"]
    if check.in_process_training:
        info = train_in_process(check, "no", resumed_args)
    else:
        info = train_launched(check, "no", "resumed", resumed_args)
    if info["status"] != 0:
        raise RuntimeError(f"the resumed training exited with status {info['status']}")
    resumed = [row for row in read_metrics(output_dir) if "loss" in row]
    killed_step = int(killed_at.name.split("_")[-1])
    expected = {row["step"]: row["loss"] for row in reference["records"]}
    worst = max(abs(row["loss"] - expected[row["step"]]) / abs(expected[row["step"]]) for row in resumed[killed_step:])
    steps = [row["step"] for row in resumed]
    tol = RESUME_REL[check.device.type]
    return {
        "ok": steps == sorted(expected) and worst <= tol and (output_dir / "final").is_dir(),
        "killed_after_checkpoint": killed_at.name,
        "steps_logged": len(steps),
        "max_rel_loss_difference_after_resume": worst,
        "tol": tol,
    }


# ---------------------------------------------------------------------------------------------------------------
# 5. Large image


def large_image(check: Check) -> None:
    side = 512 if check.quick else 4000
    check.case(f"{side}x{side} end to end", large_image_case, check, side)


def large_image_case(check: Check, side: int) -> dict:
    """The embedded model on a shapes image (4000x4000; 512x512 with --quick) through `predict`'s `Predictor`: resize,
    forward, and the bit-packed masks of every top-k instance at the full size (threshold 0: the worst case)."""
    from PIL import Image

    from fastinst_hf.data.synthetic import make_shapes_dataset
    from fastinst_hf.inference.predictor import Predictor

    make_shapes_dataset(check.workdir / "large", 1, image_size=(side, side), seed=5, max_shapes=12)
    image = Image.open(next((check.workdir / "large" / "images").iterdir())).convert("RGB")
    predictor = Predictor(None, device=check.device, threshold=0.0, precision="fp32")
    predictor.predict_image(image)  # warm-up
    check.peak.reset()
    start = time.perf_counter()
    result = predictor.predict_image(image)
    total = (time.perf_counter() - start) * 1e3
    instances, timings = len(result.labels), result.timings
    return {
        "ok": instances > 0 and tuple(result.masks.shape[-2:]) == (side, side),
        "image": [side, side],
        "instances": instances,
        "total_ms": round(total, 1),
        **{f"{stage}_ms": round(ms, 1) for stage, ms in timings.items()},
        "peak_mib": round(check.peak.mib(), 1),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report


def device_description(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": sys.version.split()[0]}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        from fastinst_hf.benchmarks.runtimes import cpu_description

        info["name"] = cpu_description()
    info["threads"] = torch.get_num_threads()
    return info


def format_tables(result: dict) -> str:
    """Markdown: one row per case of every section, then the speed section as its own table."""
    lines = [
        f"Device: {result['device']['name']} ({result['device']['device']}), torch {result['device']['torch']}"
        f"{', quick' if result['quick'] else ''}; total {result['seconds']} s",
        "",
        "| section | case | status | result |",
        "|---|---|---|---|",
    ]
    for section in SECTIONS:
        data = result.get(section)
        if data is None:
            continue
        if "error" in data:
            lines.append(f"| {section} | (set-up) | error | {data['error']} |")
        for name, case in data["cases"].items():
            if section == "speed" and case["status"] == "pass":
                continue
            lines.append(f"| {section} | {name} | {case['status']} | {summary(case)} |")
    speed_rows = [(n, c) for n, c in result.get("speed", {}).get("cases", {}).items() if c["status"] == "pass"]
    if speed_rows:
        lines += ["", result["speed"].get("protocol", ""), ""]
        lines += ["| model, runtime, batch | network ms | full ms | network img/s | full img/s | peak MiB |"]
        lines += ["|---|---|---|---|---|---|"]
        for name, case in speed_rows:
            lines.append(
                f"| {name} | {case['network_ms']:.2f} | {case['full_ms']:.2f} | {case['network_img_s']:.1f} | "
                f"{case['full_img_s']:.1f} | {case['peak_mib']:.0f} |"
            )
    return "\n".join(lines)


def summary(case: dict) -> str:
    if case["status"] in ("skipped", "error"):
        return case.get("reason") or case.get("error", "")
    hidden = {"status", "traceback", "runs_ms"}
    parts = []
    for key, value in case.items():
        if key not in hidden:
            value = f"{value:.3g}" if isinstance(value, float) else value
            parts.append(f"{key} {value}")
    return "; ".join(str(part) for part in parts).replace("|", "/")


def run_check(
    device: torch.device,
    quick: bool,
    sections: tuple[str, ...],
    skip: tuple[str, ...],
    launch: bool = False,
    save: Callable[[dict], None] = lambda result: None,
) -> dict:
    """Every section in turn; `save(result so far)` after each one, so that a run cut short keeps what it did."""
    bodies = {
        "correctness": correctness,
        "precision": precision,
        "speed": speed,
        "training": training,
        "large_image": large_image,
    }
    start = time.perf_counter()
    result = {"device": device_description(device), "quick": quick}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        check = Check(device, quick, Path(workdir), skip, launch)
        for name in sections:
            check.run_section(name, bodies[name])
            result.update(check.sections)
            result["seconds"] = round(time.perf_counter() - start, 1)
            result["status"] = "pass" if all(check.sections[s]["status"] == "pass" for s in check.sections) else "fail"
            result["finished"] = name == sections[-1]
            save(result)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-worker"]:
        return train_worker(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy models and inputs: every code path in seconds")
    parser.add_argument("--json", type=Path, help="write the result here (atomically) and the tables to OUT.md")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--skip", nargs="+", default=[], metavar="CASE", help="skip the cases whose name contains")
    parser.add_argument(
        "--launch-training", action="store_true", help="--quick: every training through accelerate launch too"
    )
    args = parser.parse_args(argv)
    from fastinst_hf.utils.device import select_device
    from fastinst_hf.utils.files import atomic_write_text, check_output_file

    if args.json:
        check_output_file(args.json, "--json")
    try:
        device = select_device(args.device)
    except Exception as error:
        parser.error(str(error))

    def save(result: dict) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.json, json.dumps(result, indent=1, default=str) + "\n")
            atomic_write_text(args.json.with_suffix(".md"), format_tables(result) + "\n")

    result = run_check(device, args.quick, tuple(args.sections), tuple(args.skip), args.launch_training, save)
    print(format_tables(result))
    return 0 if result["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
