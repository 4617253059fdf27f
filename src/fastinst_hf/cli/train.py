"""`fastinst-hf train`: train on a COCO-format dataset (see `fastinst_hf.training.loop` for the recipe and the run
folder). Data-parallel: `accelerate launch -m fastinst_hf.cli train ...`.

The options and their checks live here (`add_arguments`, `validate`), as for every command; `parse_args` serves
the scripts. `run` refuses a `--config-json` or `--init` that does not make a model before the training starts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..data.recipe import (
    CROP_RESIZE_SHORT_EDGES,
    CROP_SIZE_RANGE,
    TRAIN_MAX_SIZE,
    TRAIN_SHORT_EDGES,
    UPSTREAM_LR_STEPS,
    UPSTREAM_MAX_STEPS,
)
from ..training.checkpoints import CHECKPOINTS, LATEST, TRAINER_STATE, read_trainer_state
from ..utils.arguments import HelpFormatter, default_num_workers
from ..utils.errors import InputError, one_line
from ..utils.files import check_output_folder
from .options import (
    VARIANT_NAMES,
    check_at_least,
    check_file,
    check_finite,
    check_folder,
    check_fraction,
    check_repo_id,
)

DESCRIPTION = "Train FastInst on a COCO-format instance segmentation dataset (accelerate-aware)."
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


def add_parser(commands) -> None:
    parser = commands.add_parser("train", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options, in groups (data, model, optimisation, logging/evaluation/checkpoints)."""
    data = parser.add_argument_group("data")
    data.add_argument("--train-json", required=True, help="COCO instances JSON of the training set")
    data.add_argument("--train-images", required=True, help="image folder of the training set")
    data.add_argument("--val-json", help="COCO instances JSON of the validation set (enables mask AP)")
    data.add_argument("--val-images", help="image folder of the validation set")
    data.add_argument(
        "--train-short-edges", type=int, nargs="+", default=list(TRAIN_SHORT_EDGES), help="resize choices (pixels)"
    )
    data.add_argument("--train-max-size", type=int, default=TRAIN_MAX_SIZE, help="cap of the long side (pixels)")
    data.add_argument("--crop-prob", type=float, default=0.5, help="probability of the resize-crop pipeline")
    data.add_argument(
        "--crop-resize-short-edges",
        type=int,
        nargs="+",
        default=list(CROP_RESIZE_SHORT_EDGES),
        help="crop pipeline: resize choices before the crop (pixels)",
    )
    data.add_argument(
        "--crop-size-range",
        type=int,
        nargs=2,
        default=list(CROP_SIZE_RANGE),
        metavar=("MIN", "MAX"),
        help="crop pipeline: crop height and width, each uniform in [MIN, MAX] (pixels)",
    )
    data.add_argument(
        "--num-workers",
        type=int,
        default=default_num_workers(),
        help="data-loading worker processes (default: one per available CPU, at most 4)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--init",
        default="config",
        help="'config' (FastInstConfig defaults + --config-json, random weights), a variant name "
        f"({', '.join(VARIANT_NAMES)}; random weights), or a folder written by save_pretrained / the converter",
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
    optim.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="default: the launcher's (`accelerate launch --mixed_precision`), else no",
    )
    optim.add_argument("--clip-grad", type=float, help="max global gradient norm (upstream: off)")
    optim.add_argument("--seed", type=int, default=42, help=f"in [0, {MAX_SEED}]")

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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate `argv` (for scripts and tests; the command line goes through `fastinst_hf.cli`)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    validate(args)
    return args


def run(args: argparse.Namespace) -> int:
    from ..training.loop import train
    from ..training.model_init import check_init

    check_init(args.init, args.config_overrides)
    train(args)
    return 0


def validate(args: argparse.Namespace) -> None:
    """Check paths and values before any work starts; raises `InputError` naming the option. Adds
    `args.config_overrides` (the parsed `--config-json`)."""
    check_file(args.train_json, "--train-json")
    check_folder(args.train_images, "--train-images")
    if (args.val_json is None) != (args.val_images is None):
        raise InputError("--val-json and --val-images must be given together")
    check_file(args.val_json, "--val-json")
    check_folder(args.val_images, "--val-images")
    check_output_folder(args.output_dir, "--output-dir")
    _check_numbers(args)
    _check_sizes(args)
    _check_model_options(args)
    if args.resume not in (None, LATEST):
        if not (Path(args.resume) / TRAINER_STATE).is_file():
            raise InputError(f"--resume: {args.resume} is not a checkpoint folder (no {TRAINER_STATE})")
        read_trainer_state(Path(args.resume))
    if args.resume is None and (Path(args.output_dir) / CHECKPOINTS / LATEST).is_file():
        raise InputError(
            f"--output-dir {args.output_dir} already holds a run with checkpoints: pass --resume to continue it, "
            "or choose another folder"
        )
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)
    args.config_overrides = _read_config_overrides(args.config_json)
    if "backbone_config" in args.config_overrides and args.init not in ("config", *VARIANT_NAMES):
        raise InputError("--config-json: backbone_config can not be overridden when --init is a saved model")


def _check_numbers(args: argparse.Namespace) -> None:
    check_finite(args, "lr", "weight_decay", "backbone_lr_mult", "lr_gamma", "poly_power", "clip_grad")
    check_fraction(args, "crop_prob", "eval_threshold")
    if args.lr <= 0:
        raise InputError(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0 or args.backbone_lr_mult < 0:
        raise InputError(
            f"--weight-decay and --backbone-lr-mult must be >= 0, got {args.weight_decay} and {args.backbone_lr_mult}"
        )
    if args.lr_gamma <= 0 or args.poly_power <= 0 or (args.clip_grad is not None and args.clip_grad <= 0):
        raise InputError(
            f"--lr-gamma, --poly-power and --clip-grad must be > 0, got {args.lr_gamma}, {args.poly_power} and "
            f"{args.clip_grad}"
        )
    check_at_least(args, 1, "batch_size", "grad_accum", "max_steps", "log_every", "eval_batch_size")
    check_at_least(args, 0, "eval_every", "save_every", "keep_checkpoints", "warmup_steps", "num_workers")
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= args.max_steps:
        raise InputError(f"--stop-at-step must be in [1, --max-steps={args.max_steps}], got {args.stop_at_step}")
    if args.schedule == "step" and not all(0 < f < 1 for f in args.lr_steps):
        raise InputError(f"--lr-steps are fractions of --max-steps in (0, 1), got {args.lr_steps}")
    if args.warmup_steps >= args.max_steps:
        raise InputError(f"--warmup-steps ({args.warmup_steps}) must be smaller than --max-steps ({args.max_steps})")
    if not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")


def _check_sizes(args: argparse.Namespace) -> None:
    """The augmentation's sizes: positive pixel counts, and a crop range MIN <= MAX."""
    for option, values in (
        ("--train-short-edges", args.train_short_edges),
        ("--train-max-size", [args.train_max_size]),
        ("--crop-resize-short-edges", args.crop_resize_short_edges),
        ("--crop-size-range", args.crop_size_range),
    ):
        if min(values) < 1:
            raise InputError(f"{option} must be sizes in pixels >= 1, got {' '.join(map(str, values))}")
    low, high = args.crop_size_range
    if low > high:
        raise InputError(f"--crop-size-range MIN MAX must have MIN <= MAX, got {low} {high}")


def _check_model_options(args: argparse.Namespace) -> None:
    new_model = args.init in ("config", *VARIANT_NAMES)
    if not new_model and not (Path(args.init) / "config.json").is_file():
        raise InputError(
            f"--init: {args.init!r} is neither 'config', a variant ({', '.join(VARIANT_NAMES)}) "
            "nor a folder with a config.json"
        )
    if args.backbone_weights is not None and not new_model:
        raise InputError("--backbone-weights only applies to a new model (--init config or a variant name)")
    if args.backbone_weights != "torchvision":
        check_file(args.backbone_weights, "--backbone-weights")


def _read_config_overrides(value: str | None) -> dict:
    if value is None:
        return {}
    text = value if value.lstrip().startswith("{") else None
    if text is None:
        check_file(value, "--config-json")
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"--config-json: cannot read {value} as UTF-8 text ({one_line(error)})") from error
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--config-json: not valid JSON ({err})") from err
    if not isinstance(overrides, dict):
        raise InputError(
            f"--config-json: expected a JSON object of FastInstConfig fields, got {type(overrides).__name__}"
        )
    for key in ("id2label", "label2id", "num_labels"):
        if key in overrides:
            raise InputError(f"--config-json: {key} is taken from the training set's categories; remove it")
    return overrides
