"""The COCO mask AP `evaluate` module: `evaluate.load(METRIC_PATH)`."""

import os
from collections.abc import Mapping
from pathlib import Path

import evaluate

METRIC_PATH = str(Path(__file__).with_name("coco_mask_ap.py"))


def load_coco_metric(
    coco_gt: str | os.PathLike | dict, label_to_category_id: Mapping[int, int], iou_type: str = "segm"
):
    """The metric scoring against a COCO instances file (references = image ids), kept in memory: no cache files,
    and each process of a distributed run holds its own (the evaluation loop gathers the predictions). `iou_type`:
    "segm" (mask AP) or "boundary" (Boundary AP)."""
    coco_gt = coco_gt if isinstance(coco_gt, dict) else str(coco_gt)
    return evaluate.load(
        METRIC_PATH,
        coco_gt=coco_gt,
        label_to_category_id=label_to_category_id,
        iou_type=iou_type,
        keep_in_memory=True,
    )


__all__ = ["METRIC_PATH", "load_coco_metric"]
