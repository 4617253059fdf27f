"""COCO mask AP for FastInst predictions (faster-coco-eval), distributed-aware through accelerate."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from faster_coco_eval import COCO, COCOeval_faster

from ..data.coco import annotation_problem, load_coco_json, segmentation_to_rle

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# "segm": mask IoU; "boundary": Boundary IoU (Cheng et al., CVPR 2021), the official tools/evaluate_coco_boundary_ap.py
# metric: each match's IoU is min(mask IoU, IoU of the mask boundaries), a boundary being the pixels within
# 2 % of the image diagonal of the mask's contour (faster-coco-eval's implementation of boundary-iou-api).
IOU_TYPES = ("segm", "boundary")
BOUNDARY_SETTINGS = {"boundary_dilation_ratio": 0.02}


def _prepare_ground_truth(coco_gt: str | os.PathLike | dict) -> tuple[dict, int]:
    """A copy of the GT dict without the annotations training and `parse_coco` drop (`annotation_problem`: unknown
    image or category, polygon of < 3 points, ...), so that AP scores exactly the annotations reported as used; the
    fields COCOeval needs ("iscrowd", "area") are filled in when absent. Returns `(data, number dropped)`."""
    data = copy.deepcopy(coco_gt) if isinstance(coco_gt, dict) else load_coco_json(coco_gt)
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    kept = [
        ann
        for ann in data["annotations"]
        if ann.get("image_id") in sizes and not annotation_problem(ann, *sizes[ann["image_id"]], category_ids)
    ]
    for ann in kept:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            h, w = sizes[ann["image_id"]]
            ann["area"] = float(mask_util.area(segmentation_to_rle(ann["segmentation"], h, w)))
    num_dropped = len(data["annotations"]) - len(kept)
    data["annotations"] = kept
    return data, num_dropped


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def unpack_prediction(prediction: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks bool [N, H, W], labels [N], scores [N]) from either supported prediction format."""
    if "masks" in prediction:
        masks = _as_numpy(prediction["masks"]).astype(bool)
        labels, scores = _as_numpy(prediction["labels"]), _as_numpy(prediction["scores"])
    elif "segmentation" in prediction and "segments_info" in prediction:
        segmentation = _as_numpy(prediction["segmentation"])
        infos = prediction["segments_info"]
        if segmentation.ndim == 3:  # return_binary_maps=True: one map per segment, in segments_info order
            masks = segmentation[: len(infos)].astype(bool)
        else:  # a segment-id map: lower-scored overlapping instances have lost their pixels
            masks = np.zeros((0, *segmentation.shape), dtype=bool)
            if infos:
                masks = np.stack([segmentation == info["id"] for info in infos])
        labels = np.asarray([info["label_id"] for info in infos])
        scores = np.asarray([info["score"] for info in infos], dtype=np.float64)
    else:
        raise ValueError(
            "prediction must be {'masks' [N,H,W], 'labels' [N], 'scores' [N]} or the output of "
            f"post_process_instance_segmentation ('segmentation', 'segments_info'); got keys {sorted(prediction)}"
        )
    if not (len(masks) == len(labels) == len(scores)):
        raise ValueError(f"prediction has {len(masks)} masks, {len(labels)} labels and {len(scores)} scores")
    return masks, labels, scores


def encode_prediction(prediction: Mapping[str, Any]) -> dict:
    """A prediction (either format of `unpack_prediction`) as `{"counts": [N] COCO RLE strings, "labels": [N],
    "scores": [N], "height", "width"}`: far smaller than dense masks, to gather across processes and to keep."""
    masks, labels, scores = unpack_prediction(prediction)
    return {**encode_instances(masks, labels), "scores": [float(score) for score in scores]}


def encode_instances(masks: np.ndarray, labels: np.ndarray) -> dict:
    """(N, H, W) bool masks and (N,) labels -> `{"counts": [N] COCO RLE strings, "labels", "height", "width"}`."""
    height, width = masks.shape[-2:]
    rles = mask_util.encode(np.asfortranarray(masks.reshape(-1, height, width).transpose(1, 2, 0).astype(np.uint8)))
    counts = [rle["counts"].decode("ascii") for rle in rles]
    return {"counts": counts, "labels": [int(label) for label in labels], "height": height, "width": width}


class CocoMaskEvaluator:
    """Accumulate instance predictions and compute COCO mask AP.

    Args:
        coco_gt: the ground-truth COCO instances JSON (path) or its dict.
        label_to_category_id: contiguous model label → COCO category id (CocoInstanceDataset.label_to_category_id).
        max_dets: detections kept per image (highest scores); COCO AP counts at most 100.
        iou_type: "segm" (mask AP) or "boundary" (Boundary AP), see `IOU_TYPES`.

    AP is computed over the images passed to `update` (not every GT image), so evaluating on a subset is
    valid. Masks must be at the original image size (the "height"/"width" of the GT). Annotations that training
    can not use (see `annotation_problem`) are left out of the ground truth; `num_dropped_annotations` counts them,
    `num_annotations` counts the scored ones. Without any scored annotation, AP is NaN. Across processes, gather
    the `encode_prediction` results and pass them to `add_encoded` (see `evaluation.loop.add_batch`).
    """

    def __init__(
        self,
        coco_gt: str | os.PathLike | dict,
        label_to_category_id: Mapping[int, int],
        max_dets: int = 100,
        iou_type: str = "segm",
    ):
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
        self.iou_type = iou_type
        gt, self.num_dropped_annotations = _prepare_ground_truth(coco_gt)
        self.num_annotations = len(gt["annotations"])
        self.image_sizes = {int(img["id"]): (int(img["height"]), int(img["width"])) for img in gt["images"]}
        # Built once: indexing a large GT file is slow and compute() may run every few thousand steps.
        self.coco_gt = COCO(gt)
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        self.max_dets = max_dets
        self.results: dict[int, list[dict]] = {}

    def reset(self) -> None:
        self.results = {}

    def update(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: `predictions[i]` belongs to `image_ids[i]` (see `unpack_prediction` for formats)."""
        if len(image_ids) != len(predictions):
            raise ValueError(f"{len(image_ids)} image ids but {len(predictions)} predictions")
        for image_id, prediction in zip(image_ids, predictions):
            self.add_encoded(int(image_id), encode_prediction(prediction))

    def add_encoded(self, image_id: int, encoded: Mapping[str, Any]) -> None:
        """Add the `encode_prediction` output of one image; adding an id again (sampler padding) replaces its
        detections rather than duplicating them."""
        if image_id not in self.image_sizes:
            raise ValueError(f"image id {image_id} is not in the ground-truth 'images'")
        size = (int(encoded["height"]), int(encoded["width"]))
        if encoded["counts"] and size != self.image_sizes[image_id]:
            raise ValueError(
                f"image id {image_id}: masks are {size} but the GT image is {self.image_sizes[image_id]} (h, w); "
                "resize predictions to the original size"
            )
        order = np.argsort(-np.asarray(encoded["scores"], dtype=np.float64), kind="stable")[: self.max_dets]
        labels = [int(encoded["labels"][k]) for k in order]
        unknown = set(labels) - set(self.label_to_category_id)
        if unknown:
            raise ValueError(f"predicted label {min(unknown)} has no entry in label_to_category_id")
        self.results[image_id] = [
            {
                "image_id": image_id,
                "category_id": self.label_to_category_id[label],
                "segmentation": {"size": list(size), "counts": encoded["counts"][k]},
                "score": float(encoded["scores"][k]),
            }
            for label, k in zip(labels, order)
        ]

    def compute(self) -> dict[str, float]:
        """{"AP", "AP50", "AP75", "APs", "APm", "APl"} (of `iou_type`) in percent; NaN for an area range without GT."""
        if not self.results:
            raise ValueError("no image was evaluated: CocoMaskEvaluator.compute() called before any update()")
        detections = [det for results in self.results.values() for det in results]
        if not self.num_annotations:
            return {name: float("nan") for name in METRIC_NAMES}
        if not detections:
            return {name: 0.0 for name in METRIC_NAMES}
        # loadRes adds fields (bbox arrays, ids) to the dicts it gets: keep the stored results untouched.
        coco_dt = self.coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval_faster(
            self.coco_gt, coco_dt, iouType=self.iou_type, print_function=lambda *a, **k: None, **BOUNDARY_SETTINGS
        )
        evaluator.params.imgIds = sorted(self.results)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return {name: float(v) * 100 if v >= 0 else float("nan") for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}
