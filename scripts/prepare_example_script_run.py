#!/usr/bin/env python
"""Dataset and model folder for running transformers' instance-segmentation example scripts on FastInst.

    python scripts/prepare_example_script_run.py OUT [--train-images 16] [--val-images 8] [--size 128]

Writes synthetic shapes as COCO files (`OUT/coco_train`, `OUT/coco_val`), the same in the scripts' dataset format
(`OUT/dataset`: `image`, `annotation` PNG with R = semantic id / G = instance id, `semantic_class_to_id`) and the
embedded default model saved with `save_pretrained` (`OUT/model`: code files and `auto_map`, so the scripts load it as
remote code), then prints the commands of the runs in the README.
"""

import argparse
import sys
from pathlib import Path

import fastinst_hf
from fastinst_hf import FastInstForInstanceSegmentation, FastInstImageProcessor
from fastinst_hf.data.example_format import write_example_dataset
from fastinst_hf.data.synthetic import make_shapes_dataset

DEFAULT_MODEL = Path(fastinst_hf.__file__).parent / "assets" / "default_model"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder to write into")
    parser.add_argument("--train-images", type=int, default=16)
    parser.add_argument("--val-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image height and width")
    args = parser.parse_args(argv)
    size = (args.size, args.size)
    train = make_shapes_dataset(args.output / "coco_train", args.train_images, image_size=size, seed=0)
    val = make_shapes_dataset(args.output / "coco_val", args.val_images, image_size=size, seed=1)
    splits = {"train": (train, train.parent / "images"), "validation": (val, val.parent / "images")}
    dataset = write_example_dataset(splits, args.output / "dataset")
    model = args.output / "model"
    FastInstForInstanceSegmentation.from_pretrained(DEFAULT_MODEL).save_pretrained(model)
    FastInstImageProcessor.from_pretrained(DEFAULT_MODEL).save_pretrained(model)
    common = (
        f"--model_name_or_path {model} --dataset_name {dataset} --image_height {args.size} "
        f"--image_width {args.size} --do_reduce_labels --learning_rate 1e-4 --seed 0"
    )
    print("# answer y to transformers' remote-code prompts (or pipe `yes y |`)")
    print(
        "python run_instance_segmentation.py --output_dir runs/trainer --do_train --do_eval --max_steps 20 "
        f"--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --report_to none --save_strategy no --use_cpu {common}"
    )
    print(
        "python run_instance_segmentation_no_trainer.py --output_dir runs/no_trainer --max_train_steps 20 "
        f"--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --dataloader_num_workers 1 {common}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
