#!/usr/bin/env python
"""Does training learn? Train a small FastInst on CPU for a few minutes and compare val mask AP before and after.

Generates the random-shapes dataset (`fastinst_hf.data.synthetic.make_shapes_dataset`, split by image into train/val),
evaluates the randomly initialised model (the exact weights training starts from), trains with
`fastinst_hf.training.loop` and evaluates again. With `--nuclei-wheel` (the stardist wheel, e.g. from
`pip download stardist --no-deps -d /tmp/sd`; never commit it) it does the same on 128x128 nuclei tiles.

    OMP_NUM_THREADS=1 python scripts/learning_check.py --steps 600
    python scripts/learning_check.py --nuclei-wheel /tmp/sd/stardist-0.9.2-*.whl --skip-shapes

Prints, per dataset: steps, wall time, AP (and AP50/AP75) untrained vs trained, and the training command line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from fastinst_hf.cli.train import parse_args
from fastinst_hf.data.coco import coco_categories
from fastinst_hf.data.synthetic import make_nuclei_dataset, make_shapes_dataset, split_coco
from fastinst_hf.evaluation.coco_mask_ap import load_coco_metric
from fastinst_hf.evaluation.loop import build_eval_dataloader, build_eval_dataset, evaluate
from fastinst_hf.image_processing_fastinst import image_processor_for_config
from fastinst_hf.training.loop import train
from fastinst_hf.training.model_init import build_model

# A small model that learns in minutes on a CPU: ResNet with one bottleneck per stage, 64-wide decoder.
SMALL_CONFIG = {
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 16,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 1, 1, 1],
        "layer_type": "bottleneck",
        "out_features": ["stage2", "stage3", "stage4"],
    },
    "hidden_dim": 64,
    "pixel_decoder_channels": 64,
    "mask_dim": 64,
    "group_norm_groups": 8,
    "num_attention_heads": 4,
    "dim_feedforward": 128,
    "decoder_layers": 1,
    "num_queries": 20,
    "num_auxiliary_queries": 4,
    "train_num_points": 1024,
}


def untrained_ap(config_overrides: dict, data: dict, seed: int) -> dict[str, float]:
    """Val AP of the model `fastinst_hf.training.loop` starts from (same seed, so the same initial weights)."""
    set_seed(seed)
    model = build_model("config", config_overrides, coco_categories(data["train_json"]).id2label, log=lambda m: None)
    processor = image_processor_for_config(model.config)
    dataset = build_eval_dataset(data["val_json"], data["images"], processor)
    metric = load_coco_metric(data["val_json"], dataset.label_to_category_id)
    return evaluate(model, processor, build_eval_dataloader(dataset), metric)


def run_check(name: str, data: dict, args: argparse.Namespace) -> dict:
    size = data["image_size"]
    overrides = {**SMALL_CONFIG, "test_shortest_edge": size, "test_longest_edge": size}
    config_path = Path(args.out_dir) / f"{name}_config.json"
    config_path.write_text(json.dumps(overrides), encoding="utf-8")
    output_dir = Path(args.out_dir) / f"{name}_run"
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run each time this check is repeated
    train_argv = [
        "--train-json", str(data["train_json"]), "--train-images", str(data["images"]),
        "--val-json", str(data["val_json"]), "--val-images", str(data["images"]),
        "--output-dir", str(output_dir), "--config-json", str(config_path),
        "--train-short-edges", str(size), "--train-max-size", str(size), "--crop-prob", "0",
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--max-steps", str(args.steps),
        "--schedule", "poly", "--warmup-steps", str(min(50, args.steps // 10)),
        "--log-every", "25", "--eval-every", "0", "--save-every", "0", "--num-workers", "0",
        "--seed", str(args.seed),
    ]  # fmt: skip
    command = "python scripts/train.py " + shlex.join(train_argv)
    print(f"[{name}] training command:\n  {command}", flush=True)

    before = untrained_ap(overrides, data, args.seed)
    start = time.perf_counter()
    summary = train(parse_args(train_argv))
    wall = time.perf_counter() - start
    after = summary["final_eval"]
    result = {
        "dataset": name,
        "steps": summary["step"],
        "batch_size": args.batch_size,
        "wall_s": round(wall, 1),
        "final_train_loss": round(summary["last_logged"]["loss"], 3),
        "untrained": {k: round(before[k], 2) for k in ("AP", "AP50", "AP75")},
        "trained": {k: round(after[k], 2) for k in ("AP", "AP50", "AP75")},
        "ms_per_image": round(after["ms_per_image"], 2),
        "command": command,
    }
    print(
        f"[{name}] {result['steps']} steps (batch {args.batch_size}) in {result['wall_s']} s: val mask AP "
        f"{before['AP']:.2f} untrained -> {after['AP']:.2f} trained (AP50 {before['AP50']:.2f} -> {after['AP50']:.2f}, "
        f"AP75 {before['AP75']:.2f} -> {after['AP75']:.2f}); final train loss {result['final_train_loss']}",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="/tmp/fastinst_learning_check", help="data, runs and results.json")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4, help="higher than upstream: tiny model, few steps")
    parser.add_argument("--num-images", type=int, default=120, help="shapes images (20%% go to val)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nuclei-wheel", help="stardist wheel (or extracted folder) for the nuclei check")
    parser.add_argument("--skip-shapes", action="store_true", help="only run the nuclei check")
    args = parser.parse_args(argv)
    if args.skip_shapes and not args.nuclei_wheel:
        parser.error("--skip-shapes needs --nuclei-wheel (nothing to run otherwise)")
    if args.nuclei_wheel and not Path(args.nuclei_wheel).exists():
        parser.error(f"--nuclei-wheel: not found: {args.nuclei_wheel}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("command line: " + shlex.join([sys.executable, *sys.argv]), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)", flush=True)

    results = []
    if not args.skip_shapes:
        shapes_dir = out_dir / "shapes"
        annotations = make_shapes_dataset(
            shapes_dir, args.num_images, image_size=(args.image_size, args.image_size), seed=args.seed
        )
        train_json, val_json = split_coco(annotations, val_fraction=0.2, seed=args.seed)
        data = {"train_json": train_json, "val_json": val_json, "images": shapes_dir / "images"}
        results.append(run_check("shapes", {**data, "image_size": args.image_size}, args))
    if args.nuclei_wheel:
        nuclei_dir = out_dir / "nuclei"
        train_json, val_json = make_nuclei_dataset(nuclei_dir, args.nuclei_wheel, tile=128)
        data = {"train_json": train_json, "val_json": val_json, "images": nuclei_dir / "images", "image_size": 128}
        results.append(run_check("nuclei", data, args))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"results written to {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
