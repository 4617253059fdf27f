"""Train FastInst with accelerate: the upstream optimiser and schedule, resumable atomic checkpoints, COCO mask AP.

Runs the same under `python scripts/train.py ...` (one process) and `accelerate launch scripts/train.py ...`
(data-parallel; `--batch-size` is per process). On a CPU-only machine the working 2-process command is

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no scripts/train.py ...

Recipe (upstream `Base-COCO-InstanceSegmentation` + detectron2 defaults, see docs/fastinst_reference.md §3.4):
AdamW, lr 1e-4 for a total batch of 16, weight decay 0.05, backbone lr x0.1, no weight decay on normalisation
layers and `nn.Embedding` weights (biases and the bare positional-embedding parameter are decayed), step decay x0.1
at 88.9 % and 96.3 % of the steps, no warm-up, no gradient clipping, AMP. Linear scaling rule (`--scale-lr`):
lr = `--lr` x total_batch / 16, total_batch = batch_size x processes x grad_accum.

Run folder (`--output-dir`):
    run_info.json            processes, device, batch sizes, learning rates, parameter groups, command line
    metrics.jsonl / .csv     one row per logged step and per evaluation
    metrics.png              loss curve (+ mask AP), refreshed at every checkpoint and at the end
    checkpoints/step_N/      `accelerator.save_state` + trainer_state.json (step, epoch, position in epoch)
    checkpoints/latest       name of the newest complete checkpoint
    final/                   `save_pretrained` model (safetensors) and image processor

Resuming (`--resume`) restores weights, optimiser, scheduler and RNG states and continues with the same data order:
the sampler shuffles with a generator seeded by seed + epoch, the dataset's augmentation depends only on
(seed, epoch, index), and the batches already consumed in the interrupted epoch are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .configuration_fastinst import VARIANTS, FastInstConfig
from .convert_fastinst import load_imagenet_backbone
from .data import (
    CROP_RESIZE_SHORT_EDGES,
    CROP_SIZE_RANGE,
    TRAIN_MAX_SIZE,
    TRAIN_SHORT_EDGES,
    CocoInstanceDataset,
    FastInstCollator,
    FastInstTrainTransform,
)
from .evaluate_model import build_eval_dataloader, build_eval_dataset, evaluate, format_metrics, processor_for_config
from .evaluation import METRIC_NAMES, CocoMaskEvaluator
from .hub import push_model_to_hub, render_model_card
from .io_utils import atomic_write_text
from .modeling_fastinst import FastInstForInstanceSegmentation

# Upstream schedule: 368,750 iterations at batch 16 (~50 COCO epochs), lr x0.1 at 327,778 and 355,092.
UPSTREAM_MAX_STEPS = 368_750
UPSTREAM_LR_STEPS = (round(327_778 / 368_750, 3), round(355_092 / 368_750, 3))  # (0.889, 0.963)
REFERENCE_TOTAL_BATCH = 16
# detectron2's norm_module_types: their parameters get WEIGHT_DECAY_NORM = 0.
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
# The class-dependent layers, re-initialised when the label set changes.
CLASS_HEAD_KEY_PARTS = ("class_predictor.layers.2.", "query_proposal.classifier.")
MAIN_LOSS_TERMS = ("loss_ce", "loss_mask", "loss_dice", "loss_proposal")
CSV_COLUMNS = (
    ("step", "epoch", "loss")
    + MAIN_LOSS_TERMS
    + ("loss_aux", "lr", "lr_backbone", "steps_per_s", "elapsed_s")
    + METRIC_NAMES
    + ("ms_per_image",)
)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
# Settings that fix the data order / position semantics of a checkpoint; a resumed run must keep them.
RESUME_INVARIANTS = ("seed", "batch_size", "num_processes", "grad_accum", "max_steps")


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train FastInst on a COCO-format instance segmentation dataset (accelerate-aware).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train-json", required=True, help="COCO instances JSON of the training set")
    data.add_argument("--train-images", required=True, help="image folder of the training set")
    data.add_argument("--val-json", help="COCO instances JSON of the validation set (enables mask AP)")
    data.add_argument("--val-images", help="image folder of the validation set")
    data.add_argument("--train-short-edges", type=int, nargs="+", default=list(TRAIN_SHORT_EDGES))
    data.add_argument("--train-max-size", type=int, default=TRAIN_MAX_SIZE)
    data.add_argument("--crop-prob", type=float, default=0.5, help="probability of the resize-crop pipeline")
    data.add_argument("--crop-resize-short-edges", type=int, nargs="+", default=list(CROP_RESIZE_SHORT_EDGES))
    data.add_argument("--crop-size-range", type=int, nargs=2, default=list(CROP_SIZE_RANGE), metavar=("MIN", "MAX"))
    data.add_argument("--num-workers", type=int, default=4)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--init",
        default="config",
        help="'config' (FastInstConfig defaults + --config-json, random weights), a variant name "
        f"({', '.join(sorted(VARIANTS))}; random weights), or a folder written by save_pretrained / the converter",
    )
    model.add_argument(
        "--config-json", help="FastInstConfig overrides: a JSON file or an inline JSON object (e.g. a tiny test model)"
    )
    model.add_argument(
        "--backbone-weights",
        help="ImageNet backbone weights when --init is 'config' or a variant, as upstream trains: 'torchvision' "
        "(ResNet-50/101, downloaded once) or a file (torchvision ResNet or timm resnet50d state dict)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--output-dir", required=True)
    optim.add_argument("--batch-size", type=int, default=4, help="images per process per micro-batch")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    optim.add_argument("--lr", type=float, default=1e-4, help="base lr (upstream: 1e-4 at a total batch of 16)")
    optim.add_argument("--scale-lr", action="store_true", help="linear scaling rule: lr = --lr x total_batch / 16")
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--backbone-lr-mult", type=float, default=0.1)
    optim.add_argument("--max-steps", type=int, default=UPSTREAM_MAX_STEPS, help="optimiser steps")
    optim.add_argument(
        "--stop-at-step", type=int, help="end this job after that many steps (the schedule still spans --max-steps)"
    )
    optim.add_argument("--schedule", choices=("step", "poly"), default="step")
    optim.add_argument(
        "--lr-steps", type=float, nargs="+", default=list(UPSTREAM_LR_STEPS), help="step schedule: fractions of steps"
    )
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule: lr factor at each step")
    optim.add_argument("--poly-power", type=float, default=0.9, help="poly schedule: exponent (detectron2: 0.9)")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up from 0 (upstream: none)")
    optim.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    optim.add_argument("--clip-grad", type=float, help="max global gradient norm (upstream: off)")
    optim.add_argument("--seed", type=int, default=42)

    run = parser.add_argument_group("logging, evaluation, checkpoints")
    run.add_argument("--log-every", type=int, default=20, help="steps between metrics rows")
    run.add_argument("--eval-every", type=int, default=5000, help="steps between evaluations (0: only at the end)")
    run.add_argument("--eval-batch-size", type=int, default=1, help="per process; ms/image is timed at this size")
    run.add_argument("--eval-threshold", type=float, default=0.0, help="minimum instance score for AP (upstream 0)")
    run.add_argument("--save-every", type=int, default=5000, help="steps between checkpoints (0: only at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=0, help="keep the newest N checkpoints (0: all)")
    run.add_argument(
        "--resume",
        nargs="?",
        const=LATEST,
        help="continue from the newest checkpoint of --output-dir (no value; starts fresh if there is none) "
        "or from the given checkpoint folder",
    )
    run.add_argument("--push-to-hub", metavar="REPO_ID", help="push final model + processor to this Hub repo")
    run.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; invalid paths or values exit with status 2 and a message naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.train_json).is_file():
        parser.error(f"--train-json: file not found: {args.train_json}")
    if not Path(args.train_images).is_dir():
        parser.error(f"--train-images: folder not found: {args.train_images}")
    if (args.val_json is None) != (args.val_images is None):
        parser.error("--val-json and --val-images must be given together")
    if args.val_json is not None:
        if not Path(args.val_json).is_file():
            parser.error(f"--val-json: file not found: {args.val_json}")
        if not Path(args.val_images).is_dir():
            parser.error(f"--val-images: folder not found: {args.val_images}")
    for name in ("batch_size", "grad_accum", "max_steps", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "save_every", "keep_checkpoints", "warmup_steps", "num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= args.max_steps:
        parser.error(f"--stop-at-step must be in [1, --max-steps={args.max_steps}], got {args.stop_at_step}")
    if args.schedule == "step" and not all(0 < f < 1 for f in args.lr_steps):
        parser.error(f"--lr-steps are fractions of --max-steps in (0, 1), got {args.lr_steps}")
    if args.warmup_steps >= args.max_steps:
        parser.error(f"--warmup-steps ({args.warmup_steps}) must be smaller than --max-steps ({args.max_steps})")
    if args.init not in ("config", *VARIANTS) and not (Path(args.init) / "config.json").is_file():
        parser.error(
            f"--init: {args.init!r} is neither 'config', a variant ({', '.join(sorted(VARIANTS))}) "
            "nor a folder with a config.json"
        )
    if args.resume not in (None, LATEST) and not (Path(args.resume) / TRAINER_STATE).is_file():
        parser.error(f"--resume: {args.resume} is not a checkpoint folder (no {TRAINER_STATE})")
    if args.resume is None and (Path(args.output_dir) / CHECKPOINTS / LATEST).is_file():
        parser.error(
            f"--output-dir {args.output_dir} already holds a run with checkpoints: pass --resume to continue it, "
            "or choose another folder"
        )
    if args.backbone_weights is not None and args.init not in ("config", *VARIANTS):
        parser.error("--backbone-weights only applies to a new model (--init config or a variant name)")
    if args.backbone_weights not in (None, "torchvision") and not Path(args.backbone_weights).is_file():
        parser.error(f"--backbone-weights: file not found: {args.backbone_weights}")
    args.config_overrides = _read_config_overrides(parser, args.config_json)
    if "backbone_config" in args.config_overrides and args.init not in ("config", *VARIANTS):
        parser.error("--config-json: backbone_config can not be overridden when --init is a saved model")
    return args


def _read_config_overrides(parser: argparse.ArgumentParser, value: str | None) -> dict:
    if value is None:
        return {}
    text = value if value.lstrip().startswith("{") else None
    if text is None:
        if not Path(value).is_file():
            parser.error(f"--config-json: file not found: {value} (give a JSON file or an inline JSON object)")
        text = Path(value).read_text(encoding="utf-8")
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        parser.error(f"--config-json: not valid JSON ({err})")
    if not isinstance(overrides, dict):
        parser.error(f"--config-json: expected a JSON object of FastInstConfig fields, got {type(overrides).__name__}")
    for key in ("id2label", "label2id", "num_labels"):
        if key in overrides:
            parser.error(f"--config-json: {key} is taken from the training set's categories; remove it")
    return overrides


# --------------------------------------------------------------------------------------------------
# Model, optimiser, schedule
# --------------------------------------------------------------------------------------------------


def _labels_of(config: FastInstConfig) -> dict[int, str]:
    return {int(k): v for k, v in config.id2label.items()}


def init_config(init: str, overrides: dict, **labels) -> FastInstConfig:
    """The config `--init` starts from: `FastInstConfig(**overrides)`, a variant's, or a saved model's with `overrides`.

    `labels` (id2label / label2id) apply to a new config only; a saved model keeps its own, which `build_model`
    compares with the dataset's.
    """
    if init == "config":
        return FastInstConfig(**overrides, **labels)
    if init in VARIANTS:
        return FastInstConfig.from_variant(init, **overrides, **labels)
    return FastInstConfig.from_pretrained(init, **overrides)


def accelerator_kwargs_handlers(config: FastInstConfig) -> list:
    """Accelerator `kwargs_handlers` the model needs under DDP.

    Without the auxiliary loss only the last decoder layer's heads feed the loss, so the earlier heads get no
    gradient and DDP's reducer fails ("Expected to have finished reduction in the prior iteration") unless it looks
    for unused parameters. That search costs a graph traversal per step, so it is only enabled when needed.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    if config.use_auxiliary_loss:
        return []
    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


def build_model(init: str, overrides: dict, id2label: dict[int, str], log=print) -> FastInstForInstanceSegmentation:
    """The model to train, with the dataset's labels in its config.

    `init` is "config" or a variant name (random weights; the architecture from `FastInstConfig(**overrides)` /
    `FastInstConfig.from_variant(init, **overrides)`), or a saved model folder (weights loaded, `overrides` applied
    to the saved config). When the saved labels differ from `id2label`, the class-dependent layers (each prediction
    head's `class_predictor.layers.2` and `query_proposal.classifier`) are re-initialised and a notice is logged.
    """
    labels = {"id2label": dict(id2label), "label2id": {name: label for label, name in id2label.items()}}
    if init == "config" or init in VARIANTS:
        log(f"--init {init}: randomly initialised model (no pretrained weights)")
        return FastInstForInstanceSegmentation(init_config(init, overrides, **labels))
    saved_config = init_config(init, overrides)
    if _labels_of(saved_config) == dict(id2label):
        return FastInstForInstanceSegmentation.from_pretrained(init, config=saved_config)
    log(
        f"notice: {init} was trained for {saved_config.num_labels} labels {_labels_of(saved_config)}, the dataset has "
        f"{len(id2label)} {dict(id2label)}: re-initialising the class heads ({', '.join(CLASS_HEAD_KEY_PARTS)})"
    )
    pretrained = FastInstForInstanceSegmentation.from_pretrained(init, config=saved_config)
    state = {k: v for k, v in pretrained.state_dict().items() if not any(p in k for p in CLASS_HEAD_KEY_PARTS)}
    del pretrained
    saved_config.id2label, saved_config.label2id = labels["id2label"], labels["label2id"]
    model = FastInstForInstanceSegmentation(saved_config)
    result = model.load_state_dict(state, strict=False)
    unexpected_missing = [k for k in result.missing_keys if not any(p in k for p in CLASS_HEAD_KEY_PARTS)]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(
            f"{init}: weights do not fit the model beyond the class heads: missing {unexpected_missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model


def build_param_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups as detectron2's `get_default_optimizer_params` + FastInst's `build_optimizer`.

    A parameter of a module whose qualified name contains "backbone" gets `lr * backbone_lr_mult`; parameters owned
    by a normalisation layer (`NORM_TYPES`) or an `nn.Embedding` get no weight decay; everything else (biases, the
    bare `position_embedding` Parameter) gets `weight_decay`. Frozen parameters are left out. Returns up to four
    groups named "{backbone|head}/{decay|no_decay}" (empty ones dropped), each with its initial `lr`.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            no_decay = isinstance(module, (*NORM_TYPES, nn.Embedding))
            groups.setdefault(("backbone" in module_name, no_decay), []).append(parameter)
    return [
        {
            "name": f"{'backbone' if in_backbone else 'head'}/{'no_decay' if no_decay else 'decay'}",
            "params": params,
            "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        for (in_backbone, no_decay), params in sorted(groups.items())
    ]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    max_steps: int,
    warmup_steps: int = 0,
    lr_steps: Sequence[float] = UPSTREAM_LR_STEPS,
    gamma: float = 0.1,
    poly_power: float = 0.9,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-optimiser-step schedule with linear warm-up from 0 over `warmup_steps`.

    "poly": transformers' `get_scheduler("polynomial")` down to 0 with `poly_power`. "step": lr x `gamma` at each
    `round(fraction * max_steps)` of `lr_steps` (detectron2's WarmupMultiStepLR); transformers has no multi-step
    schedule, so this one is a LambdaLR.
    """
    from transformers import get_scheduler

    if schedule == "poly":
        return get_scheduler(
            "polynomial",
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=max_steps,
            scheduler_specific_kwargs={"power": poly_power, "lr_end": 0.0},
        )
    if schedule != "step":
        raise ValueError(f"schedule must be 'step' or 'poly', got {schedule!r}")
    milestones = sorted(round(fraction * max_steps) for fraction in lr_steps)

    def factor(step: int) -> float:
        warmup = min(1.0, step / warmup_steps) if warmup_steps else 1.0
        return warmup * gamma ** sum(step >= milestone for milestone in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of the dataset per epoch, from a generator seeded with `seed + epoch`.

    The order depends only on (seed, epoch), not on the global RNG, so a resumed run replays it exactly.
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, metrics, plots, checkpoints
# --------------------------------------------------------------------------------------------------


class MetricsLog:
    """`metrics.jsonl` (every value) and `metrics.csv` (`CSV_COLUMNS`) in the run folder, plus `metrics.png`.

    On resume, rows after the resumed step (written by the interrupted job after its last checkpoint) are dropped
    so that both files describe one consistent run.
    """

    def __init__(self, output_dir: Path, resume_step: int | None):
        self.jsonl = output_dir / "metrics.jsonl"
        self.csv = output_dir / "metrics.csv"
        self.png = output_dir / "metrics.png"
        self.records: list[dict] = []
        if resume_step is not None and self.jsonl.is_file():
            lines = self.jsonl.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= resume_step]
        atomic_write_text(self.jsonl, "".join(self._json_line(r) for r in self.records), sync=True)
        rows = [self._csv_row(r) for r in self.records]
        atomic_write_text(self.csv, ",".join(CSV_COLUMNS) + "\n" + "".join(rows))

    @staticmethod
    def _json_line(record: dict) -> str:
        # json.dumps writes NaN/Infinity bare, which is not JSON (e.g. COCO's APl is NaN without large objects).
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        return json.dumps(finite, allow_nan=False) + "\n"

    @staticmethod
    def _csv_row(record: dict) -> str:
        values = []
        for column in CSV_COLUMNS:
            value = record.get(column)
            if isinstance(value, float):
                values.append(f"{value:.6g}" if math.isfinite(value) else "")
            else:
                values.append("" if value is None else str(value))
        return ",".join(values) + "\n"

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(self._json_line(record))
        with open(self.csv, "a", encoding="utf-8") as f:
            f.write(self._csv_row(record))

    def plot(self) -> None:
        """Loss curves (total and main terms, log scale) and, when evaluated, mask AP against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.records if "loss" in r]
        evals = [r for r in self.records if "AP" in r]
        if not train and not evals:
            return
        fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
        ax = axes[0][0]
        for key in ("loss",) + MAIN_LOSS_TERMS:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=key, linewidth=2 if key == "loss" else 1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("training loss (weighted terms)")
        ax.legend(fontsize=8)
        if evals:
            ax = axes[0][1]
            for key in ("AP", "AP50", "AP75"):
                ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
            ax.set_xlabel("step")
            ax.set_title("validation mask AP (%)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = self.png.with_name(f".{self.png.stem}.tmp-{os.getpid()}.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)


def _swap_in(new: Path, target: Path) -> None:
    """Rename the folder `new` to `target`, replacing an existing `target`.

    The old `target` is moved aside and deleted only after the rename, so a crash at any point leaves a complete
    folder at `target` or at `.old_<name>` next to it; deleting `target` first could leave none.
    """
    old = target.with_name(f".old_{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)  # left over by an earlier interrupted swap; `target` is complete
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)  # also one left over when a crash came right after moving it aside


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint named by `output_dir/checkpoints/latest`, or None when there is none."""
    pointer = output_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    checkpoint = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not (checkpoint / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {checkpoint}, which is not a complete checkpoint")
    return checkpoint


def save_checkpoint(accelerator, output_dir: Path, trainer_state: dict, keep: int = 0) -> Path:
    """`accelerator.save_state` into `checkpoints/step_N` atomically; call on every process.

    Everything (model, optimiser, scheduler, per-process RNG states, `trainer_state.json`) is written into
    `checkpoints/.tmp_step_N` first; the main process then renames it to `step_N` and rewrites the `latest` pointer
    with an atomic replace. An interruption at any point leaves the previous checkpoint and `latest` valid.
    """
    root = output_dir / CHECKPOINTS
    name = f"step_{trainer_state['step']}"
    final, tmp = root / name, root / f".tmp_{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that crashed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2), sync=True)
        _swap_in(tmp, final)  # the same step may be saved again (e.g. a resumed run re-saving its end)
        atomic_write_text(root / LATEST, name + "\n", sync=True)
        if keep:
            done = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
            for old in done[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _mean_losses(loss_sums: dict[str, torch.Tensor], count: int, accelerator) -> dict[str, float]:
    """Average the summed per-micro-batch losses over micro-batches and processes; adds `loss` and `loss_aux`."""
    names = sorted(loss_sums)
    values = torch.stack([loss_sums[name] for name in names]) / count
    values = accelerator.reduce(values, reduction="mean").tolist()
    losses = dict(zip(names, values))
    losses["loss"] = sum(values)
    losses["loss_aux"] = sum(v for k, v in zip(names, values) if k not in MAIN_LOSS_TERMS)
    return losses


def _check_resume_compatible(saved: dict, current: dict, checkpoint: Path) -> None:
    changed = {k: (saved["run"].get(k), current[k]) for k in RESUME_INVARIANTS if saved["run"].get(k) != current[k]}
    if changed:
        details = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ValueError(f"can not resume from {checkpoint}: settings that fix the data order changed ({details})")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or continue) a training; returns the last logged metrics, the final evaluation and the paths."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    # The DDP settings depend on the model config, so it is read before the model (which needs the dataset) exists.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        kwargs_handlers=accelerator_kwargs_handlers(init_config(args.init, args.config_overrides)),
    )
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    train_dataset = CocoInstanceDataset(
        args.train_json,
        args.train_images,
        transform=FastInstTrainTransform(
            short_edges=args.train_short_edges,
            max_size=args.train_max_size,
            crop_prob=args.crop_prob,
            crop_resize_short_edges=args.crop_resize_short_edges,
            crop_size_range=tuple(args.crop_size_range),
        ),
        seed=args.seed,
    )
    if len(train_dataset) == 0:
        raise ValueError(f"{args.train_json}: no image with a usable annotation to train on")
    model = build_model(args.init, args.config_overrides, train_dataset.id2label, log=accelerator.print)
    if args.backbone_weights is not None:
        load_imagenet_backbone(model, args.backbone_weights)
        accelerator.print(f"backbone initialised from ImageNet weights: {args.backbone_weights}")
    processor = processor_for_config(model.config)

    val_dataset = None
    if args.val_json is not None:
        val_dataset = build_eval_dataset(args.val_json, args.val_images, processor)
        if val_dataset.label_to_category_id != train_dataset.label_to_category_id:
            raise ValueError(
                f"{args.val_json} has categories {val_dataset.id2label} (ids {val_dataset.label_to_category_id}) but "
                f"{args.train_json} has {train_dataset.id2label} (ids {train_dataset.label_to_category_id})"
            )

    total_batch = args.batch_size * accelerator.num_processes * args.grad_accum
    lr = args.lr * total_batch / REFERENCE_TOTAL_BATCH if args.scale_lr else args.lr
    param_groups = build_param_groups(model, lr, args.weight_decay, args.backbone_lr_mult)
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=args.weight_decay)
    scheduler = build_scheduler(
        optimizer, args.schedule, args.max_steps, args.warmup_steps, args.lr_steps, args.lr_gamma, args.poly_power
    )
    sampler = EpochShuffleSampler(len(train_dataset), args.seed)
    train_loader = DataLoader(
        train_dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=FastInstCollator(),
        # Its own generator: creating an iterator must not draw from the global RNG (resume determinism).
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # The scheduler is stepped once per optimiser step on every process, so it is not prepared (accelerate would
    # step it num_processes times); it is registered so that save_state/load_state include it.
    accelerator.register_for_checkpointing(scheduler)
    val_loader = evaluator = None
    if val_dataset is not None:
        val_loader = accelerator.prepare(build_eval_dataloader(val_dataset, args.eval_batch_size, args.num_workers))
        evaluator = CocoMaskEvaluator(args.val_json, val_dataset.label_to_category_id, accelerator=accelerator)

    run = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "num_processes": accelerator.num_processes,
        "grad_accum": args.grad_accum,
        "max_steps": args.max_steps,
    }
    trainer_state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "run": run}
    checkpoint = None
    if args.resume == LATEST:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            accelerator.print(f"--resume: no checkpoint in {output_dir / CHECKPOINTS}, starting from scratch")
    elif args.resume is not None:
        checkpoint = Path(args.resume)
    if checkpoint is not None:
        saved = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        _check_resume_compatible(saved, run, checkpoint)
        accelerator.load_state(str(checkpoint))
        trainer_state.update(step=saved["step"], epoch=saved["epoch"], batches_in_epoch=saved["batches_in_epoch"])
        accelerator.print(f"resumed from {checkpoint} at step {saved['step']} (epoch {saved['epoch']})")

    if accelerator.is_main_process:
        info = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "per_device_batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "total_batch_size": total_batch,
            "lr": lr,
            "scale_lr": args.scale_lr,
            "param_groups": [
                {"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "num_params": len(g["params"])}
                for g in param_groups
            ],
            "num_train_images": len(train_dataset),
            "num_val_images": len(val_dataset) if val_dataset is not None else 0,
            "id2label": train_dataset.id2label,
            "resumed_from": str(checkpoint) if checkpoint is not None else None,
            "command": [sys.executable, *sys.argv],
            "args": vars(args),
        }
        atomic_write_text(output_dir / "run_info.json", json.dumps(info, indent=2, default=str))
        metrics = MetricsLog(output_dir, trainer_state["step"] if checkpoint is not None else None)
    accelerator.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device}, total batch {total_batch} "
        f"({args.batch_size} x {accelerator.num_processes} x {args.grad_accum}), lr {lr:g}, "
        f"{len(train_dataset)} training images, {len(train_loader)} batches per epoch per process"
    )

    def run_evaluation(step: int) -> dict[str, float]:
        # Evaluation must not move the training RNG, or a run that evaluates differs from one that does not.
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            results = evaluate(
                accelerator.unwrap_model(model), processor, val_loader, evaluator, accelerator, args.eval_threshold
            )
        model.train()
        accelerator.print(f"step {step}: validation mask AP\n{format_metrics(results, args.eval_batch_size)}")
        if accelerator.is_main_process:
            metrics.append({"step": step, "epoch": trainer_state["epoch"], **results})
        return results

    step = trainer_state["step"]
    stop_step = args.stop_at_step or args.max_steps
    with tqdm(
        total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train", unit="step"
    ) as progress:
        model.train()
        loss_sums: dict[str, torch.Tensor] = {}
        logged_micro_batches = micro_batches = 0
        last_logged: dict[str, Any] = {}
        start_time, start_step = time.perf_counter(), step
        while step < stop_step:
            # Through the prepared loader: its __iter__ re-applies its own epoch counter to the sampler.
            train_loader.set_epoch(trainer_state["epoch"])
            train_dataset.set_epoch(trainer_state["epoch"])
            skip = trainer_state["batches_in_epoch"]
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            for batch in loader:
                trainer_state["batches_in_epoch"] += 1
                micro_batches += 1
                sync_now = micro_batches == args.grad_accum
                # Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation.
                with contextlib.nullcontext() if sync_now else accelerator.no_sync(model):
                    outputs = model(
                        pixel_values=batch["pixel_values"],
                        mask_labels=batch["mask_labels"],
                        class_labels=batch["class_labels"],
                    )
                    accelerator.backward(outputs.loss / args.grad_accum)
                for name, value in outputs.loss_dict.items():
                    loss_sums[name] = loss_sums.get(name, 0.0) + value.detach().float()
                logged_micro_batches += 1
                if not sync_now:
                    continue
                micro_batches = 0
                if args.clip_grad is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}  # the lr of this step
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                trainer_state["step"] = step
                progress.update(1)

                if step % args.log_every == 0 or step == stop_step:
                    losses = _mean_losses(loss_sums, logged_micro_batches, accelerator)
                    loss_sums, logged_micro_batches = {}, 0
                    elapsed = time.perf_counter() - start_time
                    last_logged = {
                        "step": step,
                        "epoch": trainer_state["epoch"],
                        **losses,
                        "lr": lrs["head/decay"],
                        "lr_backbone": lrs.get("backbone/decay", 0.0),
                        "steps_per_s": (step - start_step) / elapsed,
                        "elapsed_s": elapsed,
                    }
                    progress.set_postfix(
                        loss=f"{losses['loss']:.3f}",
                        ce=f"{losses['loss_ce']:.3f}",
                        mask=f"{losses['loss_mask']:.3f}",
                        dice=f"{losses['loss_dice']:.3f}",
                        prop=f"{losses['loss_proposal']:.3f}",
                        lr=f"{lrs['head/decay']:.2e}",
                    )
                    if accelerator.is_main_process:
                        metrics.append(last_logged)
                if val_loader is not None and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                    run_evaluation(step)
                if (args.save_every and step % args.save_every == 0) or step == stop_step:
                    save_checkpoint(accelerator, output_dir, trainer_state, args.keep_checkpoints)
                    if accelerator.is_main_process:
                        metrics.plot()
                if step >= stop_step:
                    break
            else:
                trainer_state["epoch"] += 1
                trainer_state["batches_in_epoch"] = 0

    summary: dict[str, Any] = {"step": step, "last_logged": last_logged, "final_eval": None, "final_dir": None}
    if step < args.max_steps:
        accelerator.print(f"stopped at step {step} of {args.max_steps} (--stop-at-step); continue with --resume")
        accelerator.end_training()
        return summary
    if val_loader is not None:
        summary["final_eval"] = run_evaluation(step)
    final_dir = save_final_model(accelerator, model, processor, output_dir)
    summary["final_dir"] = str(final_dir)
    if accelerator.is_main_process:
        metrics.plot()
        if args.push_to_hub:
            unwrapped = accelerator.unwrap_model(model)
            description = (
                f"Trained with `fastinst_hf` on `{args.train_json}` for {step} steps "
                f"(`--init {args.init}`)."
                + (
                    f" COCO mask AP on `{args.val_json}`: {summary['final_eval']['AP']:.2f}."
                    if summary["final_eval"]
                    else ""
                )
            )
            card = render_model_card(unwrapped.config, args.push_to_hub, description=description)
            url = push_model_to_hub(unwrapped, processor, args.push_to_hub, model_card=card, private=args.hub_private)
            accelerator.print(f"pushed model, processor and model card: {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def save_final_model(accelerator, model: nn.Module, processor, output_dir: Path) -> Path:
    """`save_pretrained` of the model (safetensors) and the processor into `output_dir/final`, via a temp folder."""
    final_dir, tmp = output_dir / "final", output_dir / ".tmp_final"
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every process calls it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        _swap_in(tmp, final_dir)
        accelerator.print(f"saved the final model and processor to {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (`scripts/train.py`); returns the process exit status."""
    args = parse_args(argv)
    train(args)
    return 0
