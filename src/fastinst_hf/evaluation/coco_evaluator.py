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


class CocoMaskEvaluator:
    """Accumulate instance predictions and compute COCO mask AP.

    Args:
        coco_gt: the ground-truth COCO instances JSON (path) or its dict.
        label_to_category_id: contiguous model label → COCO category id (CocoInstanceDataset.label_to_category_id).
        accelerator: optional `accelerate.Accelerator`; each `update` then gathers the batch's encoded
            results from all processes with `gather_for_metrics` (which drops the samples duplicated to
            even out the last batch), so `compute` gives the full-dataset AP on every process.
        max_dets: detections kept per image (highest scores); COCO AP counts at most 100.

    AP is computed over the images passed to `update` (not every GT image), so evaluating on a subset is
    valid. Masks must be at the original image size (the "height"/"width" of the GT). Annotations that training
    can not use (see `annotation_problem`) are left out of the ground truth; `num_dropped_annotations` counts them,
    `num_annotations` counts the scored ones. Without any scored annotation, AP is NaN.
    """

    def __init__(
        self,
        coco_gt: str | os.PathLike | dict,
        label_to_category_id: Mapping[int, int],
        accelerator=None,
        max_dets: int = 100,
    ):
        gt, self.num_dropped_annotations = _prepare_ground_truth(coco_gt)
        self.num_annotations = len(gt["annotations"])
        self.image_sizes = {int(img["id"]): (int(img["height"]), int(img["width"])) for img in gt["images"]}
        # Built once: indexing a large GT file is slow and compute() may run every few thousand steps.
        self.coco_gt = COCO(gt)
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        self.accelerator = accelerator
        self.max_dets = max_dets
        self.results: dict[int, list[dict]] = {}

    def reset(self) -> None:
        self.results = {}

    def _encode(self, image_id: int, prediction: Mapping[str, Any]) -> list[dict]:
        if image_id not in self.image_sizes:
            raise ValueError(f"image id {image_id} is not in the ground-truth 'images'")
        masks, labels, scores = unpack_prediction(prediction)
        if masks.shape[0] and tuple(masks.shape[1:]) != self.image_sizes[image_id]:
            raise ValueError(
                f"image id {image_id}: masks are {tuple(masks.shape[1:])} but the GT image is "
                f"{self.image_sizes[image_id]} (h, w); resize predictions to the original size"
            )
        order = np.argsort(-scores, kind="stable")[: self.max_dets]
        if order.size == 0:
            return []
        rles = mask_util.encode(np.asfortranarray(masks[order].transpose(1, 2, 0).astype(np.uint8)))
        results = []
        for rle, k in zip(rles, order):
            label = int(labels[k])
            if label not in self.label_to_category_id:
                raise ValueError(f"predicted label {label} has no entry in label_to_category_id")
            results.append(
                {
                    "image_id": image_id,
                    "category_id": self.label_to_category_id[label],
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "score": float(scores[k]),
                }
            )
        return results

    def update(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: `predictions[i]` belongs to `image_ids[i]` (see class docstring for formats)."""
        if len(image_ids) != len(predictions):
            raise ValueError(f"{len(image_ids)} image ids but {len(predictions)} predictions")
        # Encode before gathering: RLE strings are far smaller than dense masks.
        batch = [(int(i), self._encode(int(i), p)) for i, p in zip(image_ids, predictions)]
        if self.accelerator is not None:
            batch = self.accelerator.gather_for_metrics(batch, use_gather_object=True)
        for image_id, results in batch:
            # Re-inserting an id (sampler padding) replaces rather than duplicates its detections.
            self.results[image_id] = results

    def compute(self) -> dict[str, float]:
        """{"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent; NaN for an area range without GT."""
        if not self.results:
            raise ValueError("no image was evaluated: CocoMaskEvaluator.compute() called before any update()")
        detections = [det for results in self.results.values() for det in results]
        if not self.num_annotations:
            return {name: float("nan") for name in METRIC_NAMES}
        if not detections:
            return {name: 0.0 for name in METRIC_NAMES}
        # loadRes adds fields (bbox arrays, ids) to the dicts it gets: keep the stored results untouched.
        coco_dt = self.coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval_faster(self.coco_gt, coco_dt, iouType="segm", print_function=lambda *a, **k: None)
        evaluator.params.imgIds = sorted(self.results)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return {name: float(v) * 100 if v >= 0 else float("nan") for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}
