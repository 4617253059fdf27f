"""Speed and memory of one optimisation step: ours and, when present, the official trainer's step.

Each side runs in its own worker process (`StepWorker`), so that each process's peak RSS (VmHWM on Linux) belongs
to its training step alone and detectron2 never enters this process. Both build random weights of the same variant,
train on the same batch (saved once to an `.npz` file: 0-255 images and a few synthetic instances per image), and
time one step per line read from stdin, so their rounds interleave (ours, official, ours, ...):
- ours: normalise, `model(pixel_values, mask_labels, class_labels).loss`, backward, AdamW step with the training
  loop's parameter groups (`build_param_groups`), `zero_grad(set_to_none=True)`;
- official: detectron2's `SimpleTrainer.run_step` (`sum(model(batched_inputs).values())`, `zero_grad`, backward,
  step) with FastInst's `Trainer.build_optimizer`, fp32 (its AMP trainer needs CUDA).
With `profile`, each side then runs one more step under `torch.profiler` and reports the self CPU time of every op,
which `profile_categories` sums into where the step's time goes (convolutions, matrix products, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .timing import StepWorker, normalise_and_pad, official_process, summarise

# Runs in the official environment (cwd: the parity tools): the official model in train mode with its criterion,
# weights as bench_official.py perturbs them (the official init leaves `meta_pos_embed` uninitialised).
OFFICIAL_TRAIN_DRIVER = """
import json, os, sys, time
import numpy as np, torch
import bench_official as B, common as C
from detectron2.structures import Instances
from train_net import Trainer
key, batch_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
cfg = C.make_cfg(os.path.join(C.CONFIG_DIR, B.CONFIGS[key][0]), C.COMMON_OVERRIDES)
batch = np.load(batch_path)
model = C.build_fresh(cfg, 0)
C.perturb_weights(model, 1234, C.images_tensor_of(model, batch["images"][0]))
model.train()
optimizer = Trainer.build_optimizer(cfg, model)
inputs = []
for index, image in enumerate(torch.from_numpy(batch["images"])):
    instances = Instances(tuple(image.shape[-2:]))
    instances.gt_classes = torch.from_numpy(batch[f"labels_{index}"])
    instances.gt_masks = torch.from_numpy(batch[f"masks_{index}"])
    inputs.append({"image": image, "instances": instances})
rss = lambda: next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_before_steps_mib": rss()}), flush=True)
def step():
    start, cpu = time.perf_counter(), time.process_time()
    losses = sum(model(inputs).values())
    optimizer.zero_grad()
    losses.backward()
    optimizer.step()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    return {"step": wall * 1e3, "cpu": cpu * 1e3, "peak_rss_mib": rss()}
for line in sys.stdin:
    if line.strip() == "profile":
        with torch.profiler.profile() as profiler:
            result = step()
        result["ops"] = [[e.key, e.self_cpu_time_total / 1e3] for e in profiler.key_averages()]
    else:
        result = step()
    print(json.dumps(result), flush=True)
"""


def make_training_batch(image: np.ndarray, batch_size: int, size: int, num_labels: int) -> dict[str, np.ndarray]:
    """`image` `(H, W, 3)` uint8 -> `images` `(B, 3, size, size)` float32 0-255 (odd indices mirrored), and per
    image `masks_i` `(N, size, size)` bool with `labels_i` `(N,)` int64 < `num_labels`: 3 + i boxes and ellipses."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)).astype(np.float32)
    chw = resized.transpose(2, 0, 1)
    batch = {"images": np.stack([chw[..., ::-1] if index % 2 else chw for index in range(batch_size)])}
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
    for index in range(batch_size):
        masks = []
        for k in range(3 + index):
            cx, cy = 0.2 + 0.6 * ((k * 0.37 + index * 0.11) % 1), 0.2 + 0.6 * ((k * 0.61 + index * 0.23) % 1)
            if k % 2:
                masks.append((abs(u - cx) < 0.15) & (abs(v - cy) < 0.1))
            else:
                masks.append(((u - cx) / 0.12) ** 2 + ((v - cy) / 0.18) ** 2 <= 1)
        batch[f"masks_{index}"] = np.stack(masks)
        batch[f"labels_{index}"] = (np.arange(len(masks), dtype=np.int64) * 7 + index) % num_labels
    return batch


def time_training(config, image: np.ndarray, options, batch_size: int = 2, size: int = 512) -> dict:
    """Median and spread of one training step of ours (and the official one with `options.official_root`), with
    one untimed round (none with `options.warmup` 0) and `options.runs` timed interleaved rounds, at this process's
    torch thread count (training runs on the CPU); with `options.train_profile` also each side's profiled step
    (`profile`: ms per category of `profile_categories`)."""
    threads = str(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as workdir:
        batch_path = Path(workdir) / "batch.npz"
        np.savez(batch_path, **make_training_batch(image, batch_size, size, config.num_labels))
        config_path = Path(workdir) / "config.json"
        config.to_json_file(config_path)
        ours = [sys.executable, "-m", "fastinst_hf.benchmarks.training_step", str(config_path), str(batch_path)]
        workers = {"fastinst_hf": StepWorker([*ours, threads], environment=_this_package_first())}
        if options.official_root:
            process = official_process(options.official_root, OFFICIAL_TRAIN_DRIVER, options.official_key)
            workers["official"] = StepWorker(
                [*process[0], str(batch_path), threads], options.official_tools, process[1]
            )
        try:
            result = _interleave(workers, min(options.warmup, 1), options.runs)
            if options.train_profile:
                result["profile"] = {
                    name: profile_categories(w.measure("profile")["ops"]) for name, w in workers.items()
                }
        finally:
            for worker in workers.values():
                worker.close()
    return {"batch_size": batch_size, "size": size, "threads": int(threads), **result}


def _this_package_first() -> dict[str, str]:
    """This process's environment with this copy of fastinst_hf first on the worker's import path."""
    package_root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}


def _interleave(workers: dict[str, StepWorker], warmup: int, runs: int) -> dict[str, dict]:
    """Per worker: wall-clock ms of its steps, their process CPU ms (`cpu`: steady on a loaded machine at 1
    thread, where the wall clock also counts the time the step waited for a core) and its final peak RSS."""
    steps = {name: [] for name in workers}
    for round_index in range(warmup + runs):
        for name, worker in workers.items():
            measured = worker.measure()
            if round_index >= warmup:
                steps[name].append(measured)
    return {
        name: {
            **summarise([step["step"] for step in steps[name]]),
            "cpu": summarise([step["cpu"] for step in steps[name]]),
            "peak_rss_mib": steps[name][-1]["peak_rss_mib"],
            "peak_rss_before_steps_mib": worker.info["peak_rss_before_steps_mib"],
        }
        for name, worker in workers.items()
    }


# Where a training step's time goes: the first category whose words appear in an op's name (lower case) takes its
# self CPU time (forward and backward alike: `convolution_backward`, `mm` of a linear's gradient, ...).
PROFILE_CATEGORIES = (
    ("convolutions", ("conv",)),
    ("matrix products", ("mm", "linear", "matmul", "einsum", "scaled_dot_product", "attention")),
    ("optimizer step", ("optimizer", "_foreach", "adam")),
    ("normalisation", ("norm",)),
    ("resizing", ("upsample", "interpolate", "grid_sampler")),
)


def profile_categories(ops: list[list]) -> dict[str, float]:
    """`[[op name, self CPU ms], ...]` of a profiled step -> ms per category of `PROFILE_CATEGORIES`, the rest
    under "other ops" (element-wise, copies, indexing, the loss's matching), and their sum under "total"."""
    totals = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + ["other ops"], 0.0)
    for name, milliseconds in ops:
        lowered = name.lower()
        category = next((c for c, words in PROFILE_CATEGORIES if any(word in lowered for word in words)), "other ops")
        totals[category] += milliseconds
    return {**totals, "total": sum(totals.values())}


def worker_main(config_path: str, batch_path: str, threads: str) -> None:
    """Our side of `time_training`: builds the model, then times one step per stdin line (JSON lines out)."""
    from .. import FastInstConfig, FastInstForInstanceSegmentation
    from ..training.optim import build_param_groups

    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(FastInstConfig.from_json_file(config_path)).train()
    optimizer = torch.optim.AdamW(build_param_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1))
    batch = np.load(batch_path)
    images = torch.from_numpy(batch["images"])
    count = images.shape[0]
    masks = [torch.from_numpy(batch[f"masks_{index}"]).float() for index in range(count)]
    labels = [torch.from_numpy(batch[f"labels_{index}"]) for index in range(count)]
    print(json.dumps({"peak_rss_before_steps_mib": _peak_rss_mib()}), flush=True)

    def step() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        model(normalise_and_pad(images), mask_labels=masks, class_labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - start
        return {"step": wall * 1e3, "cpu": cpu * 1e3, "peak_rss_mib": _peak_rss_mib()}

    for line in sys.stdin:
        if line.strip() == "profile":
            with torch.profiler.profile() as profiler:
                result = step()
            result["ops"] = [[event.key, event.self_cpu_time_total / 1e3] for event in profiler.key_averages()]
        else:
            result = step()
        print(json.dumps(result), flush=True)


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far: Linux's VmHWM, which starts afresh at exec, where `ru_maxrss`
    would start from the RSS of the benchmark process that spawned the worker. Elsewhere `ru_maxrss`."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
