#!/usr/bin/env python
"""Accuracy of a reduced-precision forward pass against float32 PyTorch, on a trained model and COCO data: bf16 autocast,
bfloat16 weights with a split of the model kept in float32 (`fastinst_hf.inference.precision.FP32_SPLITS`), or int8 (the exported graph quantized by NNCF and run by OpenVINO; optional packages nncf and openvino).

Runs both precisions on every image, then reports the COCO mask AP of each and the share of float32 instances
(score >= --match-threshold) that the reduced-precision run also finds: same label, mask IoU >= --iou.
The acceptance rule for turning a precision on by default: AP within 0.3 points and >= 95 % matched.

    python scripts/check_reduced_precision.py --model DIR --coco-json val.json --images DIR [--precision bf16]
    python scripts/check_reduced_precision.py --shapes 60       # the embedded default model on new shape images
    python scripts/check_reduced_precision.py --shapes 60 --precision bf16-weights --split all-but-backbone
    python scripts/check_reduced_precision.py --precision int8 --model DIR --coco-json val.json --images DIR \
        --calibration-json train.json --calibration-images DIR [--int8-scheme backbone]

bf16 runs everywhere (emulated without bf16 units, slowly): the numbers are the same, only the speed differs.
int8 is calibrated on images that are not evaluated: the first --calibration-size images of --calibration-json, or
with --shapes, shape images of another seed. The exported graph and the int8 IR are cached under the fastinst_hf
cache (`$FASTINST_HF_CACHE`, default ~/.cache/fastinst_hf) in onnx/.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile

import torch

from fastinst_hf.data.synthetic import make_shapes_dataset
from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator
from fastinst_hf.evaluation.loop import build_eval_dataloader, build_eval_dataset
from fastinst_hf.inference.levers import (
    DEFAULT_INT8_SCHEME,
    INT8_SCHEMES,
    AutocastModel,
    OpenVinoModel,
    cached_graph,
    cpu_supports_bf16,
    quantized_graph,
)
from fastinst_hf.inference.loading import load_model_and_processor
from fastinst_hf.inference.precision import DEFAULT_SPLIT, FP32_SPLITS, apply_split
from fastinst_hf.inference.resolve import DEFAULT_MODEL_DIR, cache_root


def matched_share(reference: dict, candidate: dict, threshold: float, iou: float) -> tuple[int, int]:
    """(matched, total) reference instances with score >= threshold found in `candidate` (same label, IoU >= iou)."""
    keep = [i for i, info in enumerate(reference["segments_info"]) if info["score"] >= threshold]
    if not keep:
        return 0, 0
    masks = reference["segmentation"][keep].flatten(1).float()
    labels = torch.tensor([reference["segments_info"][i]["label_id"] for i in keep])
    other = candidate["segmentation"].flatten(1).float()
    other_labels = torch.tensor([info["label_id"] for info in candidate["segments_info"]])
    if other.shape[0] == 0:
        return 0, len(keep)
    intersection = masks @ other.T
    union = masks.sum(1, keepdim=True) + other.sum(1)[None] - intersection
    ious = torch.where(labels[:, None] == other_labels[None], intersection / union.clamp(min=1), 0)
    return int((ious.max(1).values >= iou).sum()), len(keep)


def calibration_batches(coco_json, images, processor, count: int) -> list[torch.Tensor]:
    """`pixel_values` `(1, 3, H, W)` of the first `count` images of a COCO set, preprocessed as at test time."""
    loader = build_eval_dataloader(build_eval_dataset(coco_json, images, processor))
    return [batch["pixel_values"] for batch, _ in zip(loader, range(count))]


def reduced_model(model, precision: str, calibration: list[torch.Tensor], scheme: str, split: str = DEFAULT_SPLIT):
    """`model` in `precision`: bf16 autocast, bfloat16 weights with `split` kept in float32 (a copy, as
    `from_pretrained(dtype=torch.bfloat16)` loads it), or its cached ONNX graph quantized to int8 run by OpenVINO."""
    if precision == "bf16":
        return AutocastModel(model, precision)
    if precision == "bf16-weights":
        return apply_split(copy.deepcopy(model), torch.bfloat16, split)
    graph = cached_graph(model, cache_root() / "onnx")
    return OpenVinoModel(quantized_graph(graph, calibration, scheme), config=model.config)


@torch.inference_mode()
def compare(model, reduced, processor, coco_json, images, precision: str, match_threshold: float, iou: float) -> dict:
    """AP of `model` (float32) and of `reduced` (its `precision` version) on a COCO set, and the matched share."""
    dataset = build_eval_dataset(coco_json, images, processor)
    models = {"fp32": model, precision: reduced}
    evaluators = {name: CocoMaskEvaluator(coco_json, dataset.label_to_category_id) for name in models}
    matched = total = 0
    for batch in build_eval_dataloader(dataset):
        predictions = {}
        for name, run in models.items():
            outputs = run(batch["pixel_values"])
            predictions[name] = processor.post_process_instance_segmentation(
                outputs,
                threshold=0.0,
                target_sizes=batch["orig_sizes"],
                image_sizes=batch["image_sizes"],
                return_binary_maps=True,
            )
            evaluators[name].update(batch["image_ids"], predictions[name])
        for reference, candidate in zip(predictions["fp32"], predictions[precision]):
            found, count = matched_share(reference, candidate, match_threshold, iou)
            matched, total = matched + found, total + count
    ap = {name: evaluator.compute()["AP"] for name, evaluator in evaluators.items()}
    return {
        "precision": precision,
        "bf16_units": cpu_supports_bf16(),
        "images": len(dataset),
        "AP_fp32": round(ap["fp32"], 3),
        f"AP_{precision}": round(ap[precision], 3),
        "AP_difference": round(ap[precision] - ap["fp32"], 3),
        "instances_compared": total,
        "matched_share": round(matched / max(total, 1), 4),
        "passes": abs(ap[precision] - ap["fp32"]) <= 0.3 and matched >= 0.95 * total,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="trained model (default: embedded model)")
    parser.add_argument("--coco-json", help="COCO instances file of the evaluation images")
    parser.add_argument("--images", help="folder of the evaluation images")
    parser.add_argument("--shapes", type=int, default=0, help="instead: this many new synthetic shape images")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "bf16-weights", "int8"))
    parser.add_argument(
        "--split", default=DEFAULT_SPLIT, choices=sorted(FP32_SPLITS), help="bf16-weights: the parts kept in float32"
    )
    parser.add_argument("--calibration-json", help="int8: COCO file of the calibration images (not the evaluated ones)")
    parser.add_argument("--calibration-images", help="int8: folder of the calibration images")
    parser.add_argument("--calibration-size", type=int, default=32, help="int8: calibrate on this many images")
    parser.add_argument("--int8-scheme", default=DEFAULT_INT8_SCHEME, choices=sorted(INT8_SCHEMES))
    parser.add_argument("--match-threshold", type=float, default=0.5, help="fp32 instances compared: score >= this")
    parser.add_argument("--iou", type=float, default=0.9)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if not args.shapes and not (args.coco_json and args.images):
        parser.error("pass --coco-json and --images, or --shapes N")
    if args.precision == "int8" and not args.shapes and not (args.calibration_json and args.calibration_images):
        parser.error("--precision int8 on --coco-json needs --calibration-json and --calibration-images")
    model, processor, _ = load_model_and_processor(args.model, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        coco_json, images = args.coco_json, args.images
        calibration_json, calibration_images = args.calibration_json, args.calibration_images
        if args.shapes:
            # Seeds the embedded model was not trained on, one for evaluation and another one for calibration.
            coco_json, images = make_shapes_dataset(f"{tmp}/eval", args.shapes, seed=12345), f"{tmp}/eval/images"
            calibration_json = make_shapes_dataset(f"{tmp}/calibration", args.calibration_size, seed=54321)
            calibration_images = f"{tmp}/calibration/images"
        calibration = []
        if args.precision == "int8":
            calibration = calibration_batches(calibration_json, calibration_images, processor, args.calibration_size)
        reduced = reduced_model(model, args.precision, calibration, args.int8_scheme, args.split)
        result = compare(model, reduced, processor, coco_json, images, args.precision, args.match_threshold, args.iou)
    if args.precision == "int8":
        result.update(int8_scheme=args.int8_scheme, calibration_images=len(calibration))
    if args.precision == "bf16-weights":
        result["split"] = args.split
    result["model"] = args.model
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
