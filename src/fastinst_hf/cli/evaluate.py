"""`fastinst-hf evaluate`: COCO mask AP (or Boundary AP) and per-image time of a model on a COCO-format dataset.

AP comes from the COCO mask AP `evaluate` module (`evaluation/coco_mask_ap`) loaded with the COCO JSON as ground
truth; `--iou-type boundary` scores with Boundary IoU as the official `tools/evaluate_coco_boundary_ap.py` does
(faster-coco-eval's implementation). Also runs under `accelerate launch -m fastinst_hf.cli evaluate ...` (images
sharded, results gathered).
"""

from __future__ import annotations

import argparse

from ..utils.arguments import HelpFormatter
from ..utils.errors import InputError, one_line
from .options import add_device_argument, add_model_argument, check_at_least, check_file, check_folder, check_fraction

IOU_TYPES = ("segm", "boundary")  # = evaluation.coco_evaluator.IOU_TYPES, which imports torch


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate",
        description="COCO mask AP (or Boundary AP) and per-image inference time of a FastInst model on a "
        "COCO-format dataset.",
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("--coco-json", required=True, help="COCO instances JSON with the ground truth")
    parser.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    parser.add_argument(
        "--iou-type",
        choices=IOU_TYPES,
        default="segm",
        help="segm: mask AP; boundary: Boundary AP (min of mask and boundary IoU, dilation 2%% of the image "
        "diagonal), as the official tools/evaluate_coco_boundary_ap.py (default: %(default)s)",
    )
    parser.add_argument("--threshold", type=float, default=0.0, help="minimum instance score (0 = upstream AP)")
    add_device_argument(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="per process; upstream times batch size 1")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="autocast dtype for inference"
    )
    parser.set_defaults(run=run)


def validate(args: argparse.Namespace) -> None:
    check_file(args.coco_json, "--coco-json")
    check_folder(args.images, "--images")
    check_fraction(args, "threshold")
    check_at_least(args, 1, "batch_size")
    check_at_least(args, 0, "num_workers")


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from ..evaluation.coco_mask_ap import load_coco_metric
    from ..evaluation.loop import (
        build_eval_dataloader,
        build_eval_dataset,
        check_eval_dataset,
        eval_transform,
        evaluate,
        format_metrics,
    )
    from ..inference.loading import load_model_and_processor
    from ..utils.device import select_device

    select_device(args.device)  # fails early when CUDA is asked for but absent
    try:
        dataset = build_eval_dataset(args.coco_json, args.images, processor=None)
    except ValueError as error:
        raise InputError(f"--coco-json: {one_line(error)}") from error
    check_eval_dataset(dataset)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    model, processor, model_dir = load_model_and_processor(args.model)
    dataset.transform = eval_transform(processor)
    if model.config.num_labels > len(dataset.id2label):
        raise InputError(
            f"the model predicts {model.config.num_labels} labels but {args.coco_json} has "
            f"{len(dataset.id2label)} categories: its predictions can not all be mapped to a category"
        )
    if {int(k): v for k, v in model.config.id2label.items()} != dataset.id2label:
        accelerator.print(
            f"warning: the model's labels {model.config.id2label} differ from the dataset's {dataset.id2label}; "
            "predictions are mapped to category ids by label index"
        )
    model, dataloader = accelerator.prepare(model, build_eval_dataloader(dataset, args.batch_size, args.num_workers))
    metric = load_coco_metric(args.coco_json, dataset.label_to_category_id, iou_type=args.iou_type)
    metrics = evaluate(
        accelerator.unwrap_model(model), processor, dataloader, metric, accelerator, threshold=args.threshold
    )
    accelerator.print(
        f"model: {model_dir}  data: {args.coco_json}  device: {accelerator.device}  AP: {args.iou_type} IoU"
    )
    accelerator.print(
        f"scored {metric.num_annotations} annotation(s); {metric.num_dropped_annotations} unusable one(s) "
        "left out of the ground truth"
    )
    accelerator.print(format_metrics(metrics, args.batch_size))
    return 0
