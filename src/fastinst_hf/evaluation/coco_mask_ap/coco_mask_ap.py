"""COCO mask AP as an `evaluate` metric module, computed by fastinst_hf's COCO evaluator (faster-coco-eval).

import evaluate
from fastinst_hf.evaluation.coco_mask_ap import METRIC_PATH

metric = evaluate.load(METRIC_PATH)  # a local module: no Hub access
metric.add_batch(predictions=[...], references=[...])
metric.compute()  # {"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent
"""

import datasets
import evaluate
import numpy as np
import pycocotools.mask as mask_util

from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator, unpack_prediction

_DESCRIPTION = """COCO mask AP (AP, AP50, AP75, APs, APm, APl, in percent) of instance segmentation predictions against
reference instance masks, with faster-coco-eval (the same numbers as pycocotools). Masks are run-length encoded when
a batch is added, so a whole validation set stays small in memory."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per image either `{"masks": (N, H, W) bool, "labels": (N,) int, "scores": (N,) float}` or one output
        of `post_process_instance_segmentation` (`{"segmentation", "segments_info"}`, also with
        `return_binary_maps=True`), at the size of the reference masks.
    references: per image `{"masks": (N, H, W) bool, "labels": (N,) int}`: the ground-truth instances (e.g. the
        `mask_labels` and `class_labels` the image processor returns).
    max_detections: highest-scoring detections kept per image (COCO counts at most 100).
Returns:
    `{"AP", "AP50", "AP75", "APs", "APm", "APl"}`; NaN for an area range without ground truth.
"""

_INSTANCES = {
    "segmentation": datasets.Sequence(datasets.Value("string")),
    "labels": datasets.Sequence(datasets.Value("int64")),
    "height": datasets.Value("int64"),
    "width": datasets.Value("int64"),
}


def _encode(masks: np.ndarray, labels: np.ndarray) -> dict:
    """(N, H, W) masks -> COCO RLE counts strings, with the labels and the image size."""
    height, width = masks.shape[-2:]
    rles = mask_util.encode(np.asfortranarray(masks.reshape(-1, height, width).transpose(1, 2, 0).astype(np.uint8)))
    counts = [rle["counts"].decode("ascii") for rle in rles]
    return {"segmentation": counts, "labels": [int(label) for label in labels], "height": height, "width": width}


def encode_prediction(prediction) -> dict:
    masks, labels, scores = unpack_prediction(prediction)
    return {**_encode(masks, labels), "scores": [float(score) for score in scores]}


def encode_reference(reference) -> dict:
    masks, labels = reference["masks"], reference["labels"]
    masks = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
    labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if masks.ndim != 3 or len(masks) != len(labels):
        raise ValueError(f"reference: expected masks (N, H, W) and labels (N,), got {masks.shape} and {labels.shape}")
    return _encode(masks.astype(bool), labels)


def _decode(instances: dict) -> np.ndarray:
    size = [instances["height"], instances["width"]]
    if not instances["segmentation"]:
        return np.zeros((0, *size), dtype=bool)
    rles = [{"size": size, "counts": counts.encode("ascii")} for counts in instances["segmentation"]]
    return mask_util.decode(rles).transpose(2, 0, 1).astype(bool)


def ground_truth(references: list[dict], categories: list[int]) -> dict:
    """A COCO instances dict of the references: image ids 1..n, category id = label + 1."""
    images, annotations = [], []
    for image_id, reference in enumerate(references, start=1):
        size = [reference["height"], reference["width"]]
        images.append({"id": image_id, "height": size[0], "width": size[1]})
        for counts, label in zip(reference["segmentation"], reference["labels"]):
            segmentation = {"size": size, "counts": counts}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "segmentation": segmentation,
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": label + 1, "name": str(label)} for label in categories],
    }


class CocoMaskAP(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {**_INSTANCES, "scores": datasets.Sequence(datasets.Value("float64"))},
                    "references": _INSTANCES,
                }
            ),
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (encoded to COCO RLE here)."""
        # Stored run-length encoded: dense masks of every image would not fit in memory for a real validation set.
        predictions = [encode_prediction(prediction) for prediction in predictions]
        references = [encode_reference(reference) for reference in references]
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add the prediction and reference of one image."""
        self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def _compute(self, predictions, references, max_detections: int = 100):
        labels = {label for instances in [*predictions, *references] for label in instances["labels"]}
        categories = sorted(labels)
        evaluator = CocoMaskEvaluator(
            ground_truth(references, categories), {label: label + 1 for label in categories}, max_dets=max_detections
        )
        for image_id, (prediction, reference) in enumerate(zip(predictions, references), start=1):
            if (prediction["height"], prediction["width"]) != (reference["height"], reference["width"]):
                raise ValueError(
                    f"image {image_id}: predicted masks are {prediction['height']}x{prediction['width']} but the "
                    f"reference masks {reference['height']}x{reference['width']}"
                )
            masks = _decode(prediction)
            evaluator.update(
                [image_id], [{"masks": masks, "labels": prediction["labels"], "scores": prediction["scores"]}]
            )
        return evaluator.compute()
