"""Train FastInst with accelerate: the upstream optimiser and schedule, resumable atomic checkpoints, COCO mask AP.

Runs the same under `fastinst-hf train ...` / `python scripts/train.py ...` (one process) and
`accelerate launch -m fastinst_hf.cli train ...` (data-parallel; `--batch-size` is per process). On a CPU-only
machine the working 2-process command is

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no scripts/train.py ...

Recipe (upstream `Base-COCO-InstanceSegmentation` + detectron2 defaults): AdamW, lr 1e-4 for a total batch of 16,
weight decay 0.05, backbone lr x0.1, no weight decay on normalisation layers and `nn.Embedding` weights (biases and
the bare positional-embedding parameter are decayed), step decay x0.1 at 88.9 % and 96.3 % of the steps, no warm-up,
no gradient clipping, AMP. Linear scaling rule (`--scale-lr`): lr = `--lr` x total_batch / 16, total_batch =
batch_size x processes x grad_accum.

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from evaluate import EvaluationModule
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..conversion.imagenet import load_imagenet_backbone
from ..data.collate import FastInstCollator
from ..data.datasets import CocoInstanceDataset
from ..data.transforms import FastInstTrainTransform
from ..evaluation.coco_mask_ap import load_coco_metric
from ..evaluation.loop import build_eval_dataloader, build_eval_dataset, check_eval_dataset, evaluate, format_metrics
from ..hub.model_card import render_model_card
from ..hub.push import push_model_to_hub
from ..image_processing_fastinst import image_processor_for_config
from ..utils.errors import InputError, one_line
from ..utils.files import atomic_write_text
from .checkpoints import (
    CHECKPOINTS,
    LATEST,
    check_resume_compatible,
    latest_checkpoint,
    read_trainer_state,
    save_checkpoint,
    save_final_model,
)
from .metrics_log import MetricsLog, mean_losses
from .model_init import accelerator_kwargs_handlers, build_model, init_config
from .optim import REFERENCE_TOTAL_BATCH, EpochShuffleSampler, build_param_groups, build_scheduler


@dataclass
class TrainingRun:
    """What a training holds from setup to finish. `state` is what a checkpoint stores besides accelerate's state."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dataset: CocoInstanceDataset
    train_loader: DataLoader
    val_loader: DataLoader | None
    val_metric: EvaluationModule | None
    output_dir: Path
    state: dict[str, Any]
    metrics: MetricsLog | None = None
    last_logged: dict[str, Any] = field(default_factory=dict)
    # Accumulated across epoch boundaries: losses since the last log row, micro-batches since the last optimiser step.
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    logged_micro_batches: int = 0
    micro_batches: int = 0
    start_time: float = field(default_factory=time.perf_counter)
    start_step: int = 0


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or continue) a training; returns the last logged metrics, the final evaluation and the paths."""
    run = setup(args)
    run.start_time, run.start_step = time.perf_counter(), run.state["step"]
    stop_step = args.stop_at_step or args.max_steps
    main_process = run.accelerator.is_local_main_process
    with tqdm(total=args.max_steps, initial=run.state["step"], disable=not main_process, unit="step") as progress:
        progress.set_description("train")
        while run.state["step"] < stop_step:
            if train_one_epoch(run, stop_step, progress):
                run.state["epoch"] += 1
                run.state["batches_in_epoch"] = 0
    return finish(run)


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


def setup(args: argparse.Namespace) -> TrainingRun:
    """Accelerator, data, model, optimiser and schedule, restored from a checkpoint when resuming."""
    # The DDP settings depend on the model config, so it is read before the model (which needs the dataset) exists.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        kwargs_handlers=accelerator_kwargs_handlers(init_config(args.init, args.config_overrides)),
    )
    set_seed(args.seed)

    train_dataset = build_train_dataset(args)
    model = build_model(args.init, args.config_overrides, train_dataset.id2label, log=accelerator.print)
    if args.backbone_weights is not None:
        load_imagenet_backbone(model, args.backbone_weights)
        accelerator.print(f"backbone initialised from ImageNet weights: {args.backbone_weights}")
    processor = image_processor_for_config(model.config)
    val_dataset = build_val_dataset(args, processor, train_dataset)

    total_batch = args.batch_size * accelerator.num_processes * args.grad_accum
    lr = args.lr * total_batch / REFERENCE_TOTAL_BATCH if args.scale_lr else args.lr
    param_groups = build_param_groups(model, lr, args.weight_decay, args.backbone_lr_mult)
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=args.weight_decay)
    scheduler = build_scheduler(
        optimizer, args.schedule, args.max_steps, args.warmup_steps, args.lr_steps, args.lr_gamma, args.poly_power
    )
    train_loader = DataLoader(
        train_dataset,
        batch_size=args.batch_size,
        sampler=EpochShuffleSampler(len(train_dataset), args.seed),
        num_workers=args.num_workers,
        collate_fn=FastInstCollator(),
        # Its own generator: creating an iterator must not draw from the global RNG (resume determinism).
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # The scheduler is stepped once per optimiser step on every process, so it is not prepared (accelerate would
    # step it num_processes times); it is registered so that save_state/load_state include it.
    accelerator.register_for_checkpointing(scheduler)
    val_loader = val_metric = None
    if val_dataset is not None:
        val_loader = accelerator.prepare(build_eval_dataloader(val_dataset, args.eval_batch_size, args.num_workers))
        val_metric = load_coco_metric(args.val_json, val_dataset.label_to_category_id)

    # Created only now: a run refused while checking its data or model leaves no empty folder behind.
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "run": resume_invariants(args, accelerator)}
    run = TrainingRun(
        args, accelerator, model, processor, optimizer, scheduler, train_dataset, train_loader, val_loader,
        val_metric, output_dir, state,
    )  # fmt: skip
    checkpoint = restore_checkpoint(run)
    if accelerator.is_main_process:
        write_run_info(run, total_batch, lr, param_groups, val_dataset, checkpoint)
        run.metrics = MetricsLog(output_dir, state["step"] if checkpoint is not None else None)
    accelerator.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device}, total batch {total_batch} "
        f"({args.batch_size} x {accelerator.num_processes} x {args.grad_accum}), lr {lr:g}, "
        f"{len(train_dataset)} training images, {len(train_loader)} batches per epoch per process"
    )
    return run


def build_train_dataset(args: argparse.Namespace) -> CocoInstanceDataset:
    transform = FastInstTrainTransform(
        short_edges=args.train_short_edges,
        max_size=args.train_max_size,
        crop_prob=args.crop_prob,
        crop_resize_short_edges=args.crop_resize_short_edges,
        crop_size_range=tuple(args.crop_size_range),
    )
    try:
        dataset = CocoInstanceDataset(args.train_json, args.train_images, transform=transform, seed=args.seed)
    except ValueError as error:
        raise InputError(f"--train-json: {one_line(error)}") from error
    if not dataset.id2label:
        raise InputError(f"{args.train_json}: 'categories' is empty (expected at least one category)")
    if len(dataset) == 0:
        raise InputError(
            f"{args.train_json}: no readable image with a usable annotation to train on "
            f"({len(dataset.problems)} problem(s) reported above)"
        )
    return dataset


def build_val_dataset(args: argparse.Namespace, processor, train_dataset: CocoInstanceDataset):
    """The validation set (None without `--val-json`); its categories must be the training set's."""
    if args.val_json is None:
        return None
    try:
        dataset = build_eval_dataset(args.val_json, args.val_images, processor)
    except ValueError as error:
        raise InputError(f"--val-json: {one_line(error)}") from error
    check_eval_dataset(dataset)
    if dataset.label_to_category_id != train_dataset.label_to_category_id:
        raise InputError(
            f"{args.val_json} has categories {dataset.id2label} (ids {dataset.label_to_category_id}) but "
            f"{args.train_json} has {train_dataset.id2label} (ids {train_dataset.label_to_category_id})"
        )
    return dataset


def resume_invariants(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, int]:
    return {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "num_processes": accelerator.num_processes,
        "grad_accum": args.grad_accum,
        "max_steps": args.max_steps,
    }


def restore_checkpoint(run: TrainingRun) -> Path | None:
    """Load the checkpoint `--resume` names (if any) into the accelerator and `run.state`; returns its folder."""
    args, accelerator = run.args, run.accelerator
    checkpoint = None
    if args.resume == LATEST:
        checkpoint = latest_checkpoint(run.output_dir)
        if checkpoint is None:
            accelerator.print(f"--resume: no checkpoint in {run.output_dir / CHECKPOINTS}, starting from scratch")
    elif args.resume is not None:
        checkpoint = Path(args.resume)
    if checkpoint is None:
        return None
    saved = read_trainer_state(checkpoint)
    check_resume_compatible(saved, run.state["run"], checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise InputError(f"--resume: cannot load the checkpoint {checkpoint}: {one_line(error)}") from error
    run.state.update(step=saved["step"], epoch=saved["epoch"], batches_in_epoch=saved["batches_in_epoch"])
    accelerator.print(f"resumed from {checkpoint} at step {saved['step']} (epoch {saved['epoch']})")
    return checkpoint


def write_run_info(run: TrainingRun, total_batch: int, lr: float, param_groups, val_dataset, checkpoint) -> None:
    accelerator, args = run.accelerator, run.args
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
        "num_train_images": len(run.train_dataset),
        "num_val_images": len(val_dataset) if val_dataset is not None else 0,
        "id2label": run.train_dataset.id2label,
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
    }
    atomic_write_text(run.output_dir / "run_info.json", json.dumps(info, indent=2, default=str))


# --------------------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------------------


def train_one_epoch(run: TrainingRun, stop_step: int, progress) -> bool:
    """Train from the current position in the epoch; True when the epoch's batches ran out, False at `stop_step`."""
    args, accelerator, state = run.args, run.accelerator, run.state
    # Through the prepared loader: its __iter__ re-applies its own epoch counter to the sampler.
    run.train_loader.set_epoch(state["epoch"])
    run.train_dataset.set_epoch(state["epoch"])
    skip = state["batches_in_epoch"]
    loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    run.model.train()
    for batch in loader:
        state["batches_in_epoch"] += 1
        run.micro_batches += 1
        run.logged_micro_batches += 1
        sync_now = run.micro_batches == args.grad_accum
        forward_backward(run, batch, sync_now)
        if not sync_now:
            continue
        run.micro_batches = 0
        lrs = optimizer_step(run)
        progress.update(1)
        step = state["step"]
        if step % args.log_every == 0 or step == stop_step:
            log_step(run, lrs, progress)
        if run.val_loader is not None and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            run_evaluation(run)
        if (args.save_every and step % args.save_every == 0) or step == stop_step:
            save_checkpoint(accelerator, run.output_dir, state, args.keep_checkpoints)
            if accelerator.is_main_process:
                run.metrics.plot()
        if step >= stop_step:
            return False
    return True


def forward_backward(run: TrainingRun, batch: dict, sync_now: bool) -> None:
    """One micro-batch: loss, backward (scaled for accumulation), and the loss terms added to `run.loss_sums`."""
    # Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation.
    with contextlib.nullcontext() if sync_now else run.accelerator.no_sync(run.model):
        outputs = run.model(
            pixel_values=batch["pixel_values"], mask_labels=batch["mask_labels"], class_labels=batch["class_labels"]
        )
        run.accelerator.backward(outputs.loss / run.args.grad_accum)
    for name, value in outputs.loss_dict.items():
        run.loss_sums[name] = run.loss_sums.get(name, 0.0) + value.detach().float()


def optimizer_step(run: TrainingRun) -> dict[str, float]:
    """Clip, step optimiser and schedule, advance `state["step"]`; returns the learning rates this step used."""
    if run.args.clip_grad is not None:
        run.accelerator.clip_grad_norm_(run.model.parameters(), run.args.clip_grad)
    lrs = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["step"] += 1
    return lrs


def log_step(run: TrainingRun, lrs: dict[str, float], progress) -> None:
    """Average the losses since the last row over micro-batches and processes; one metrics row and progress bar."""
    losses = mean_losses(run.loss_sums, run.logged_micro_batches, run.accelerator)
    run.loss_sums, run.logged_micro_batches = {}, 0
    elapsed = time.perf_counter() - run.start_time
    run.last_logged = {
        "step": run.state["step"],
        "epoch": run.state["epoch"],
        **losses,
        "lr": lrs["head/decay"],
        "lr_backbone": lrs.get("backbone/decay", 0.0),
        "steps_per_s": (run.state["step"] - run.start_step) / elapsed,
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
    if run.accelerator.is_main_process:
        run.metrics.append(run.last_logged)


def run_evaluation(run: TrainingRun) -> dict[str, float]:
    """COCO mask AP on the validation set, logged; the training RNG is left untouched."""
    accelerator, args = run.accelerator, run.args
    # Evaluation must not move the training RNG, or a run that evaluates differs from one that does not.
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        results = evaluate(
            accelerator.unwrap_model(run.model),
            run.processor,
            run.val_loader,
            run.val_metric,
            accelerator,
            args.eval_threshold,
        )
    run.model.train()
    step = run.state["step"]
    accelerator.print(f"step {step}: validation mask AP\n{format_metrics(results, args.eval_batch_size)}")
    if accelerator.is_main_process:
        run.metrics.append({"step": step, "epoch": run.state["epoch"], **results})
    return results


# --------------------------------------------------------------------------------------------------
# Finish
# --------------------------------------------------------------------------------------------------


def finish(run: TrainingRun) -> dict[str, Any]:
    """Final evaluation, final model folder and optional push, unless the job stopped early (`--stop-at-step`)."""
    accelerator, args, step = run.accelerator, run.args, run.state["step"]
    summary: dict[str, Any] = {"step": step, "last_logged": run.last_logged, "final_eval": None, "final_dir": None}
    if step < args.max_steps:
        accelerator.print(f"stopped at step {step} of {args.max_steps} (--stop-at-step); continue with --resume")
        accelerator.end_training()
        return summary
    if run.val_loader is not None:
        summary["final_eval"] = run_evaluation(run)
    summary["final_dir"] = str(save_final_model(accelerator, run.model, run.processor, run.output_dir))
    if accelerator.is_main_process:
        run.metrics.plot()
        if args.push_to_hub:
            push_final_model(run, summary["final_eval"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def push_final_model(run: TrainingRun, final_eval: dict[str, float] | None) -> None:
    args = run.args
    model = run.accelerator.unwrap_model(run.model)
    description = (
        f"Trained with `fastinst_hf` on `{args.train_json}` for {run.state['step']} steps (`--init {args.init}`)."
    )
    if final_eval:
        description += f" COCO mask AP on `{args.val_json}`: {final_eval['AP']:.2f}."
    card = render_model_card(model.config, args.push_to_hub, description=description)
    url = push_model_to_hub(model, run.processor, args.push_to_hub, model_card=card, private=args.hub_private)
    run.accelerator.print(f"pushed model, processor and model card: {url}")
