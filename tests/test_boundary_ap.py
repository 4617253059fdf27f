"""Boundary AP (`iou_type="boundary"`, as the official tools/evaluate_coco_boundary_ap.py) against the Boundary IoU
definition computed here independently with scipy on a hand-made case."""

import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
from scipy import ndimage

from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator

SIZE = 100  # image side: the boundary band is round(0.02 x diagonal) = 3 pixels wide
THRESHOLDS = np.linspace(0.5, 0.95, 10)


def boundary(mask: np.ndarray, ratio: float = 0.02) -> np.ndarray:
    """Cheng et al.'s mask boundary: the mask minus its erosion by round(ratio x image diagonal) pixels (at least 1),
    the image border counting as background."""
    dilation = max(1, round(ratio * math.hypot(*mask.shape)))
    return mask & ~ndimage.binary_erosion(mask, np.ones((3, 3)), iterations=dilation, border_value=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def square(x: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[20:60, x : x + 40] = True
    return mask


def coco_ap(ground_truth: np.ndarray, prediction: np.ndarray, iou_type: str) -> dict:
    rle = mask_util.encode(np.asfortranarray(ground_truth.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    gt = {
        "images": [{"id": 1, "height": SIZE, "width": SIZE, "file_name": "a.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "area": int(ground_truth.sum()),
             "bbox": [20, 20, 40, 40], "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "square"}],
    }  # fmt: skip
    evaluator = CocoMaskEvaluator(gt, {0: 1}, iou_type=iou_type)
    evaluator.update([1], [{"masks": prediction[None], "labels": np.array([0]), "scores": np.array([0.9])}])
    return evaluator.compute()


@pytest.mark.parametrize("shift", [1, 3])  # IoUs away from the thresholds: no ties
def test_boundary_ap_follows_the_boundary_iou_definition(shift):
    ground_truth, prediction = square(20), square(20 + shift)
    mask_iou = iou(ground_truth, prediction)
    boundary_iou = min(mask_iou, iou(boundary(ground_truth), boundary(prediction)))
    assert boundary_iou < mask_iou  # the case tells the two metrics apart
    for iou_type, value in (("segm", mask_iou), ("boundary", boundary_iou)):
        # One ground truth, one detection: matched at each threshold up to its IoU, precision 1 there.
        expected = 100 * np.mean(THRESHOLDS <= value + 1e-12)
        metrics = coco_ap(ground_truth, prediction, iou_type)
        assert metrics["AP"] == pytest.approx(expected, abs=1e-6), (iou_type, value)
        assert metrics["APm"] == pytest.approx(expected, abs=1e-6)  # a 40x40 object is "medium"


def test_unknown_iou_type_is_refused():
    with pytest.raises(ValueError, match="iou_type must be one of segm, boundary"):
        CocoMaskEvaluator({"images": [], "annotations": [], "categories": []}, {}, iou_type="bbox")
