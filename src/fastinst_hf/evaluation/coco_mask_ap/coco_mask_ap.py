"""COCO mask AP as an `evaluate` metric module, computed by fastinst_hf's COCO evaluator (faster-coco-eval).

import evaluate
from fastinst_hf.evaluation.coco_mask_ap import METRIC_PATH

metric = evaluate.load(METRIC_PATH)  # a local module: no Hub access
metric.add_batch(predictions=[...], references=[...])
metric.compute()  # {"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent

metric = evaluate.load(METRIC_PATH, coco_gt="instances_val.json", label_to_category_id={0: 1, 1: 3})
metric.add_batch(predictions=[...], references=[image ids])  # scored against the COCO file, as annotated
"""

import datasets
import evaluate
import numpy as np

from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator, encode_instances, encode_prediction

_DESCRIPTION = """COCO mask AP (AP, AP50, AP75, APs, APm, APl, in percent) of instance segmentation predictions, with
faster-coco-eval (the same numbers as pycocotools). Masks are run-length encoded when a batch is added, so a whole
validation set stays small in memory. The references are either instance masks, or, when the module is loaded with
`coco_gt`, the ids of the images in that COCO instances file: then its crowd regions, annotated areas and images
without annotations count as annotated (as in the official COCO evaluation)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per image either `{"masks": (N, H, W) bool, "labels": (N,) int, "scores": (N,) float}`, one output
        of `post_process_instance_segmentation` (`{"segmentation", "segments_info"}`, also with
        `return_binary_maps=True`), or the `fastinst_hf.evaluation.coco_evaluator.encode_prediction` of one of these
        (what the evaluation loop gathers across processes), at the size of the reference masks / GT image.
    references: per image `{"masks": (N, H, W) bool, "labels": (N,) int}`: the ground-truth instances (e.g. the
        `mask_labels` and `class_labels` the image processor returns); with `coco_gt`, the image id instead.
    max_detections: highest-scoring detections kept per image (COCO counts at most 100).
Returns:
    `{"AP", "AP50", "AP75", "APs", "APm", "APl"}`; NaN for an area range without ground truth.
"""

_INSTANCES = {
    "counts": datasets.Sequence(datasets.Value("string")),
    "labels": datasets.Sequence(datasets.Value("int64")),
    "height": datasets.Value("int64"),
    "width": datasets.Value("int64"),
}


def encode_reference(reference) -> dict:
    masks, labels = reference["masks"], reference["labels"]
    masks = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
    labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if masks.ndim != 3 or len(masks) != len(labels):
        raise ValueError(f"reference: expected masks (N, H, W) and labels (N,), got {masks.shape} and {labels.shape}")
    return encode_instances(masks.astype(bool), labels)


def ground_truth(references: list[dict], categories: list[int]) -> dict:
    """A COCO instances dict of the references: image ids 1..n, category id = label + 1."""
    images, annotations = [], []
    for image_id, reference in enumerate(references, start=1):
        size = [reference["height"], reference["width"]]
        images.append({"id": image_id, "height": size[0], "width": size[1]})
        for counts, label in zip(reference["counts"], reference["labels"]):
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


def mask_references_evaluator(predictions: list[dict], references: list[dict], max_detections: int, iou_type: str):
    """A `CocoMaskEvaluator` whose ground truth is the reference masks (image ids 1..n), with the predictions added."""
    categories = sorted({label for instances in [*predictions, *references] for label in instances["labels"]})
    evaluator = CocoMaskEvaluator(
        ground_truth(references, categories),
        {label: label + 1 for label in categories},
        max_dets=max_detections,
        iou_type=iou_type,
    )
    for image_id, (prediction, reference) in enumerate(zip(predictions, references), start=1):
        if (prediction["height"], prediction["width"]) != (reference["height"], reference["width"]):
            raise ValueError(
                f"image {image_id}: predicted masks are {prediction['height']}x{prediction['width']} but the "
                f"reference masks {reference['height']}x{reference['width']}"
            )
        evaluator.add_encoded(image_id, prediction)
    return evaluator


class CocoMaskAP(evaluate.Metric):
    """Init arguments (`evaluate.load(METRIC_PATH, coco_gt=..., label_to_category_id=...)`):
    coco_gt: a COCO instances JSON (path) or dict to score against; the references are then image ids. Its
        unusable annotations are left out (`num_dropped_annotations`; `num_annotations` are scored).
    label_to_category_id: with `coco_gt`, predicted label -> COCO category id.
    iou_type: "segm" (mask AP, the default) or "boundary" (Boundary AP, as the official FastInst tool).
    """

    def __init__(self, coco_gt=None, label_to_category_id=None, iou_type="segm", **kwargs):
        # Set before evaluate's __init__, which reads the features from `_info`. Built once: indexing a large COCO
        # file is slow and a training run computes the metric every few thousand steps.
        self.coco_evaluator = None
        self.iou_type = iou_type
        if coco_gt is not None:
            if label_to_category_id is None:
                raise ValueError("coco_gt needs label_to_category_id (predicted label -> COCO category id)")
            self.coco_evaluator = CocoMaskEvaluator(coco_gt, label_to_category_id, iou_type=iou_type)
            self.num_annotations = self.coco_evaluator.num_annotations
            self.num_dropped_annotations = self.coco_evaluator.num_dropped_annotations
        super().__init__(**kwargs)

    def _info(self):
        references = _INSTANCES if self.coco_evaluator is None else datasets.Value("int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {**_INSTANCES, "scores": datasets.Sequence(datasets.Value("float64"))},
                    "references": references,
                }
            ),
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (encoded to COCO RLE here)."""
        # Stored run-length encoded: dense masks of every image would not fit in memory for a real validation set.
        predictions = [p if "counts" in p else encode_prediction(p) for p in predictions]
        if self.coco_evaluator is None:
            references = [encode_reference(reference) for reference in references]
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add the prediction and reference of one image."""
        self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def _compute(self, predictions, references, max_detections: int = 100):
        if self.coco_evaluator is None:
            return mask_references_evaluator(predictions, references, max_detections, self.iou_type).compute()
        evaluator = self.coco_evaluator
        evaluator.reset()
        evaluator.max_dets = max_detections
        for prediction, image_id in zip(predictions, references):
            evaluator.add_encoded(image_id, prediction)
        return evaluator.compute()
