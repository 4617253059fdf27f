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
import importlib.util
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

from ..inference.levers import cpu_supports_bf16
from ..inference.runtimes import RUNTIMES, Runtime, build_runtime, runtime_unavailable
from ..utils.device import synchronize
from ..utils.flops import count_flops, paper_gflops
from .timing import (
    StepWorker,
    isolated_environment,
    normalise_and_pad,
    official_process,
    summarise,
    threads_are_passive,
)
from .training_step import time_training

DEFAULT_RUNTIMES = ("eager", "unfolded", "folded+channels_last", "onnxruntime", "bf16+channels_last", "bf16-weights")

# RF-DETR-Seg sizes (class in `rfdetr`); COCO mask AP per its docs: nano 40.3 at 312 px, small 43.1 at 384 px, the
# closest to FastInst-D1's 34.9.
RFDETR_PEERS = {"rfdetr-seg-nano": "RFDETRSegNano", "rfdetr-seg-small": "RFDETRSegSmall"}
# Peer models of `--peers` and the optional package each needs (never a dependency of fastinst_hf).
PEER_PACKAGES = {
    "mask2former": "transformers",
    "yolo11s-seg": "ultralytics",
    "yolo11m-seg": "ultralytics",
    **dict.fromkeys(RFDETR_PEERS, "rfdetr"),
}


def build_runner(runtime: Runtime, model, example: torch.Tensor, workdir: Path) -> Callable:
    """`pixel_values -> outputs` for `runtime` (model already on the example's device): the runtime factory's
    runner, the graph exported under `workdir` (onnxruntime's idle threads sleeping: other processes are timed
    meanwhile), int8 calibrated on `calibration_images(example)`."""
    calibration = calibration_images(example) if runtime.precision == "int8" else ()
    return build_runtime(runtime, model, workdir, calibration, num_threads=torch.get_num_threads(), spinning=False)


def calibration_images(example: torch.Tensor, count: int = 8) -> list[torch.Tensor]:
    """The int8 calibration set of the speed benchmark: `example` `(B, 3, H, W)` and `count - 1` random normal
    tensors of its shape (seeded). Enough to time int8, not to judge its accuracy (the check script does that on
    real images)."""
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(example.shape, generator=generator) for _ in range(count - 1)]
    return [example.cpu(), *noise]


def available(runtime: Runtime, device: torch.device) -> str | None:
    """Why `runtime` is not timed here, or None (the benchmark times the cuda-* rows alone on CUDA)."""
    if runtime.name.startswith("cuda") != (device.type == "cuda"):
        return "CUDA runtimes run on CUDA only, CPU runtimes on CPU only"
    return runtime_unavailable(runtime, device)


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


def time_interleaved(
    runners: dict[str, Callable], case: Case, warmup: int, runs: int, official: StepWorker | None = None
) -> dict[str, dict]:
    """Times network / postprocess / full of every runner (and the official model), one after the other in each
    round, so that load changes hit them all alike."""
    stages = {name: {"network": [], "postprocess": [], "full": []} for name in runners}
    if official is not None:
        stages["official"] = {"network": [], "full": []}
    for round_index in range(warmup + runs):
        for name, run in runners.items():
            times = _time_once(run, case)
            if round_index >= warmup:
                for stage, value in times.items():
                    stages[name][stage].append(value)
        if official is not None:
            times = official.measure()
            if round_index >= warmup:
                for stage, value in times.items():
                    stages["official"][stage].append(value)
    return {name: {stage: summarise(times) for stage, times in result.items()} for name, result in stages.items()}


def _time_once(run: Callable, case: Case) -> dict[str, float]:
    """ms of the network on the prepared tensor, of the post-processing, and of normalise + network + post."""
    synchronize(case.device)
    start = time.perf_counter()
    outputs = run(case.pixel_values)
    synchronize(case.device)
    forwarded = time.perf_counter()
    case.postprocess(outputs)
    synchronize(case.device)
    post = time.perf_counter()
    case.postprocess(run(normalise_and_pad(case.images.to(case.device))))
    synchronize(case.device)
    end = time.perf_counter()
    return {"network": (forwarded - start) * 1e3, "postprocess": (post - forwarded) * 1e3, "full": (end - post) * 1e3}


# Runs in the official environment (cwd: the parity tools): builds the official model exactly as bench_official.py
# does, then times one "network" and one "full" call per line read from stdin, so that its runs interleave with ours.
OFFICIAL_DRIVER = """
import json, os, sys, time
import torch
import bench_official as B, common as C
key, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
cfg = C.make_cfg(os.path.join(C.CONFIG_DIR, B.CONFIGS[key][0]), C.COMMON_OVERRIDES)
img, _ = C.load_image("astronaut_480x640")
chw = C.preprocess(cfg, img)
model = C.build_fresh(cfg, 0)
x = C.images_tensor_of(model, chw)
C.perturb_weights(model, 1234, x)
model.eval()
inputs = [{"image": torch.as_tensor(chw), "height": img.shape[0], "width": img.shape[1]}]
print(json.dumps({"model_input_hw": list(chw.shape[1:])}), flush=True)
with torch.no_grad():
    for _ in sys.stdin:
        start = time.perf_counter()
        model.sem_seg_head(model.backbone(x))
        middle = time.perf_counter()
        model(inputs)
        end = time.perf_counter()
        print(json.dumps({"network": (middle - start) * 1e3, "full": (end - middle) * 1e3}), flush=True)
"""


# The CPU features that decide which kernels oneDNN runs (fp32 AVX2 / AVX-512, bf16 AVX-512 or AMX tiles).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> list[str]:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        return cpuinfo.read().splitlines()
    return []


def cpu_flags() -> list[str]:
    """Which of `CPU_FLAGS` this CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), [])
    return [flag for flag in CPU_FLAGS if flag in flags]


def cpu_description() -> str:
    names = [line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def as_numpy_image(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def make_case(config, image: np.ndarray, batch_size: int, processor, device: torch.device) -> Case:
    """`image` (H, W, 3) uint8 resized to the config's test size (detectron2 rule, PIL bilinear), B copies."""
    from PIL import Image

    from ..image_processing_fastinst import get_fastinst_output_image_size

    height, width = get_fastinst_output_image_size(
        image.shape[0], image.shape[1], config.test_shortest_edge, config.test_longest_edge
    )
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    chw = torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1).copy())
    return Case(chw[None].repeat(batch_size, 1, 1, 1), tuple(image.shape[:2]), processor, device)


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
    return {"full": _time_calls(lambda: model.predict(bgr, imgsz=640, device="cpu", verbose=False), warmup, runs)}


def time_rfdetr(peer: str, image: np.ndarray, warmup: int, runs: int) -> dict:
    """RF-DETR-Seg with random weights (`pretrain_weights=None` downloads nothing; its DINOv2 backbone config ships
    with the package), its own `predict` at its native square resolution: image -> 100 masks at the image size
    (threshold 0, so that every query's mask is made, as for FastInst's top 100)."""
    import rfdetr

    model = getattr(rfdetr, RFDETR_PEERS[peer])(pretrain_weights=None, device="cpu")
    return {"full": _time_calls(lambda: model.predict(image, threshold=0.0), warmup, runs)}


def _time_calls(call: Callable, warmup: int, runs: int) -> dict:
    """`summarise` of the ms of `runs` calls after `warmup` untimed ones, each at this process's torch thread count
    (ultralytics sets its own, cores - 1, on its first CPU `predict`)."""
    threads = torch.get_num_threads()
    times = []
    for index in range(warmup + runs):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        call()
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return summarise(times)


@dataclass
class BenchmarkOptions:
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    runs: int = 5
    warmup: int = 2
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    throughput_runtimes: tuple[str, ...] = ("eager", "folded+channels_last")
    official_root: str | None = None
    official_tools: str | None = None
    official_key: str = "d1"
    peers: tuple[str, ...] = ()
    train_step: bool = False
    train_profile: bool = False
    force_bf16: bool = False


def run_benchmark(model, processor, image: np.ndarray, device: torch.device, options: BenchmarkOptions) -> dict:
    """Every runtime of `options` side by side (interleaved), batch throughput, and the optional extras.

    `image` is `(H, W, 3)` uint8 (the official protocol uses 480x640). Returns a JSON-ready dict.
    """
    model = model.to(device).eval()
    config = model.config
    case = make_case(config, image, 1, processor, device)
    result = {
        "cpu": cpu_description(),
        "cpu_flags": cpu_flags(),
        "passive_threads": threads_are_passive(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_units": cpu_supports_bf16(),
        "image_hw": list(image.shape[:2]),
        "model_input_hw": list(case.images.shape[-2:]),
        "padded_hw": list(case.pixel_values.shape[-2:]),
        "runs": options.runs,
        "warmup": options.warmup,
        "skipped": {},
    }
    names = [name for name in options.runtimes if _skip_reason(name, device, options, result) is None]
    peers = [peer for peer in options.peers if _missing_peer(peer, result) is None]
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        runners, result["setup_ms"] = _build_runners(names, model, case, Path(workdir))
        result["flops"] = count_flops(model, {"pixel_values": case.pixel_values})
        result["matmul_peak_gflops"] = matmul_peak_gflops(device)
        result.update(_time_runtimes(runners, case, options))
        chosen = {name: runners[name] for name in options.throughput_runtimes if name in runners}
        result["throughput"] = {
            str(batch_size): _throughput(chosen, make_case(config, image, batch_size, processor, device), options)
            for batch_size in options.batch_sizes
        }
        if "mask2former" in peers:
            result["mask2former"] = time_mask2former(case, options.warmup, options.runs)
    for peer in peers:
        if peer.startswith("yolo"):
            result[peer] = time_yolo(f"{peer}.yaml", image, options.warmup, options.runs)
        elif peer in RFDETR_PEERS:
            result[peer] = time_rfdetr(peer, image, options.warmup, options.runs)
    if options.train_step:
        torch.set_num_threads(result["threads"])  # as the peers may have changed it
        result["train_step"] = time_training(config, image, options)
    if not options.official_root:
        result["skipped"]["official"] = "no --official-root (an environment of shared/tools/official_parity/)"
    return result


# The paper's GFLOPs (fvcore: a multiply-add = 1) of the variants it reports, Table 1 of He et al. (CVPR 2023).
PAPER_GFLOPS = {"fastinst-d1-r50": 49.6}


def matmul_peak_gflops(device: torch.device, size: int = 2048, runs: int = 5) -> dict[str, float]:
    """The best GFLOP/s of a `size`^2 matrix product in float32 and bfloat16 on `device` (this machine's ceiling for
    dense math; bf16 only where it has bf16 units, since emulated bf16 says nothing about a limit)."""
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda" or cpu_supports_bf16():
        dtypes["bf16"] = torch.bfloat16
    peaks = {}
    for name, dtype in dtypes.items():
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        best = float("inf")
        for _ in range(runs + 1):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2 * size**3 / best / 1e9
    return peaks


def _build_runners(names: list[str], model, case: Case, workdir: Path) -> tuple[dict[str, Callable], dict]:
    """The runner of every runtime, and its setup ms: building it (the onnx export) and its first call (where
    `torch.compile` compiles), so that compile time is reported apart from the steady-state times."""
    runners, setup_ms = {}, {}
    for name in names:
        start = time.perf_counter()
        runners[name] = build_runner(RUNTIMES[name], model, case.pixel_values, workdir)
        runners[name](case.pixel_values)
        synchronize(case.device)
        setup_ms[name] = (time.perf_counter() - start) * 1e3
    return runners, setup_ms


def _time_runtimes(runners: dict[str, Callable], case: Case, options: BenchmarkOptions) -> dict:
    """`{"runtimes": ..., "official": ...}`: our runners, interleaved with the official model when asked for."""
    if not options.official_root:
        return {"runtimes": time_interleaved(runners, case, options.warmup, options.runs)}
    threads = torch.get_num_threads()
    command, environment = official_process(options.official_root, OFFICIAL_DRIVER, options.official_key, str(threads))
    official = StepWorker(command, options.official_tools, environment)
    try:
        timed = time_interleaved(runners, case, options.warmup, options.runs, official)
        # the same worker again, with nothing interleaved (this process waits)
        alone = [official.measure() for _ in range(options.runs)]
    finally:
        official.close()
    return {
        "runtimes": timed,
        "official": timed.pop("official"),
        "official_worker_alone": {stage: summarise([times[stage] for times in alone]) for stage in ("network", "full")},
        "official_script_alone": official_script_alone(options),
        "official_model_input": official.info,
    }


def official_script_alone(options) -> dict:
    """The official timing script (`bench_official.py KEY`) run on its own, after ours: its network and full ms."""
    command, environment = official_process(options.official_root, "", options.official_key)
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "official.json"
        script = [command[0], "-W", "ignore", "bench_official.py", "--json", str(output)]
        script += ["--runs", str(options.runs), "--warmup", str(max(options.warmup, 1))]
        script += ["--threads", str(torch.get_num_threads()), options.official_key]
        subprocess.run(
            script, cwd=options.official_tools, env=isolated_environment(environment), check=True, capture_output=True
        )
        measured = json.loads(output.read_text())["results"][options.official_key]
    return {stage: measured[stage] for stage in ("network", "full")}


def _throughput(runners: dict[str, Callable], batch: Case, options: BenchmarkOptions) -> dict[str, float]:
    """Images per second of normalise + network + post-processing on `batch`, per runner (interleaved rounds)."""
    times = {name: [] for name in runners}
    for round_index in range(min(options.warmup, 1) + max(1, options.runs // 2)):
        for name, run in runners.items():
            start = time.perf_counter()
            batch.postprocess(run(normalise_and_pad(batch.images.to(batch.device))))
            synchronize(batch.device)
            if round_index >= min(options.warmup, 1):
                times[name].append(time.perf_counter() - start)
    return {name: batch.images.shape[0] / statistics.median(values) for name, values in times.items()}


def _skip_reason(name: str, device: torch.device, options: BenchmarkOptions, result: dict) -> str | None:
    reason = available(RUNTIMES[name], device)
    if reason and options.force_bf16 and RUNTIMES[name].precision == "bf16" and device.type == "cpu":
        reason = None
    if reason:
        result["skipped"][name] = reason
    return reason


def _missing_peer(peer: str, result: dict) -> str | None:
    """Why `peer` cannot run (its package is not installed), recorded in `result["skipped"]`, or None."""
    package = PEER_PACKAGES[peer]
    if importlib.util.find_spec(package) is not None:
        return None
    result["skipped"][peer] = f"the optional package {package} is not installed (pip install {package})"
    return result["skipped"][peer]


def _cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median_ms']:.0f} ({stats['min_ms']:.0f}-{stats['max_ms']:.0f})"


def format_table(result: dict) -> str:
    """Markdown table of a `run_benchmark` result: ms median (min-max) per stage, full-time ratios."""
    reference = result["official"]["full"]["median_ms"] if "official" in result else None
    rows = []
    if "official" in result:
        rows.append(
            ("official code (detectron2)", result["official"]["network"], None, result["official"]["full"], True)
        )
    for key, label in (("official_worker_alone", "its worker alone"), ("official_script_alone", "bench_official.py")):
        if key in result:
            rows.append((f"official, {label}", result[key]["network"], None, result[key]["full"], True))
    for name, stages in result.get("runtimes", {}).items():
        rows.append((f"fastinst_hf {name}", stages["network"], stages["postprocess"], stages["full"], True))
    for peer in PEER_PACKAGES:
        if peer in result:
            # another network: FastInst's FLOPs give it no rate
            rows.append((f"peer: {peer}", result[peer].get("network"), None, result[peer]["full"], False))
    lines = [
        f"CPU: {result['cpu']}; CPU flags: {', '.join(result.get('cpu_flags', [])) or 'none of ' + ', '.join(CPU_FLAGS)}; "
        f"idle thread pools passive: {'yes' if result.get('passive_threads') else 'no'}",
        f"{result['threads']} threads, torch {result['torch']}; image {result['image_hw']} -> "
        f"model input {result['model_input_hw']} (padded {result['padded_hw']}); median (min-max) of "
        f"{result['runs']} interleaved runs",
        "",
        "| runtime | network ms | postprocess ms | full ms | full / official | network GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for label, network, post, full, fastinst in rows:
        ratio = f"{full['median_ms'] / reference:.2f}" if reference else "-"
        rate = (
            f"{result['flops'] / network['median_ms'] / 1e6:.0f}" if fastinst and network and "flops" in result else "-"
        )
        lines.append(f"| {label} | {_cell(network)} | {_cell(post)} | {_cell(full)} | {ratio} | {rate} |")
    if "flops" in result:
        paper = PAPER_GFLOPS.get(result.get("variant", ""))
        peaks = ", ".join(f"{name} {value:.0f}" for name, value in result["matmul_peak_gflops"].items())
        lines += [
            "",
            f"Network FLOPs at this input: {result['flops'] / 1e9:.1f} GFLOP (torch's counter, multiply-add = 2), "
            f"{paper_gflops(result['flops']):.1f} GFLOPs in the paper's unit (paper: "
            f"{f'{paper} at its COCO input sizes' if paper else 'not given for this variant'}); "
            f"matmul peak GFLOP/s (2048^2, best of 5): {peaks}",
        ]
    if result.get("throughput"):
        lines += ["", "| images/s (full) | " + " | ".join(f"batch {b}" for b in result["throughput"]) + " |"]
        lines.append("|---|" + "---|" * len(result["throughput"]))
        names = next(iter(result["throughput"].values())).keys()
        for name in names:
            values = " | ".join(f"{result['throughput'][b][name]:.2f}" for b in result["throughput"])
            lines.append(f"| {name} | {values} |")
    if "train_step" in result:
        lines += _training_table(result["train_step"])
    if result.get("setup_ms"):
        setup = ", ".join(f"{name} {ms:.0f}" for name, ms in result["setup_ms"].items())
        lines += [
            "",
            f"Setup ms (build + first call, where torch.compile compiles, the graph runtimes export and int8 quantizes): {setup}",
        ]
    if "official_script_alone" in result:
        alone = result["official_script_alone"]["full"]["median_ms"]
        gap = reference / alone - 1
        verdict = "agree" if abs(gap) <= 0.1 else "DISAGREE (more than 10 %: the machine was not quiet)"
        lines += ["", f"Official full, interleaved vs its script alone: {gap:+.1%} ({verdict})"]
    lines += [f"skipped {name}: {reason}" for name, reason in result.get("skipped", {}).items()]
    return "\n".join(lines)


def _training_table(step: dict) -> list[str]:
    """Rows of the training-step result of `time_training`: wall and process CPU ms median (min-max) with their
    ratios to the official step, and each worker process's peak RSS."""
    reference = step.get("official")
    lines = [
        "",
        f"Training step (batch {step['batch_size']}, {step['size']}x{step['size']}, loss + backward + AdamW step, CPU, "
        f"{step['threads']} threads; one worker process per side, peak RSS = its VmHWM)",
        "",
        "| training step | wall ms | / official | process CPU ms | / official | peak RSS MiB | peak RSS before step 1 MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("official", "official trainer (detectron2)"), ("fastinst_hf", "fastinst_hf")):
        if name in step:
            side = step[name]
            wall = f"{side['median_ms'] / reference['median_ms']:.2f}" if reference else "-"
            cpu = f"{side['cpu']['median_ms'] / reference['cpu']['median_ms']:.2f}" if reference else "-"
            lines.append(
                f"| {label} | {_cell(side)} | {wall} | {_cell(side['cpu'])} | {cpu} | {side['peak_rss_mib']:.0f} | "
                f"{side['peak_rss_before_steps_mib']:.0f} |"
            )
    if "profile" in step:
        lines += _profile_table(step["profile"])
    return lines


def _profile_table(profile: dict[str, dict[str, float]]) -> list[str]:
    """Where one profiled step's time goes on each side: self CPU ms per op category and its share of the step."""
    names = [name for name in ("official", "fastinst_hf") if name in profile]
    lines = [
        "",
        "One more step of each side under torch.profiler (self CPU time per op category, forward and backward)",
        "",
        "| category | " + " | ".join(f"{name} ms (share)" for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for category in profile[names[0]]:
        cells = [f"{profile[n][category]:.0f} ({profile[n][category] / profile[n]['total']:.0%})" for n in names]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines
