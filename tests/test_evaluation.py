"""CocoMaskEvaluator: AP on perfect/degraded predictions, prediction formats, pycocotools parity; the evaluation
loop's gather into the COCO mask AP metric."""

import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

from fastinst_hf.data.coco import decode_segmentation, load_coco_json
from fastinst_hf.data.datasets import CocoInstanceDataset
from fastinst_hf.data.synthetic import make_shapes_dataset
from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator
from fastinst_hf.evaluation.coco_mask_ap import load_coco_metric
from fastinst_hf.evaluation.loop import add_batch


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_shapes")
    path = make_shapes_dataset(out, num_images=5, image_size=(48, 64), seed=11)
    dataset = CocoInstanceDataset(path, out / "images", filter_empty=False)
    coco = load_coco_json(path)
    category_to_label = {cid: label for label, cid in dataset.label_to_category_id.items()}
    per_image = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        mask = decode_segmentation(ann["segmentation"], 48, 64)
        per_image[ann["image_id"]].append((mask, category_to_label[ann["category_id"]]))
    return path, dataset.label_to_category_id, per_image


def _predictions(per_image, shift=0, keep_every=1, seed=0):
    rng = np.random.default_rng(seed)
    ids, preds = [], []
    for image_id, objects in per_image.items():
        objects = objects[::keep_every]
        masks = np.stack([np.roll(m, shift, axis=1) for m, _ in objects]) if objects else np.zeros((0, 48, 64), bool)
        ids.append(image_id)
        preds.append(
            {
                "masks": torch.from_numpy(masks),
                "labels": torch.tensor([label for _, label in objects], dtype=torch.long),
                "scores": torch.from_numpy(rng.uniform(0.5, 1.0, len(objects))),
            }
        )
    return ids, preds


def _evaluate(path, label_map, ids, preds, **kwargs):
    evaluator = CocoMaskEvaluator(path, label_map, **kwargs)
    evaluator.update(ids, preds)
    return evaluator


def test_perfect_shifted_and_missing(gt):
    path, label_map, per_image = gt
    evaluator = _evaluate(path, label_map, *_predictions(per_image))
    perfect = evaluator.compute()
    assert evaluator.compute() == pytest.approx(perfect, nan_ok=True)  # compute() leaves the state intact
    assert set(perfect) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert perfect["AP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    shifted = _evaluate(path, label_map, *_predictions(per_image, shift=3)).compute()
    missing = _evaluate(path, label_map, *_predictions(per_image, keep_every=2)).compute()
    assert shifted["AP"] < 90 and missing["AP"] < 80
    assert 0 < missing["AP"] and 0 < shifted["AP"]


def test_empty_predictions_and_bad_inputs(gt):
    path, label_map, per_image = gt
    ids, _ = _predictions(per_image)
    empty = {"masks": torch.zeros(0, 48, 64, dtype=torch.bool), "labels": torch.zeros(0), "scores": torch.zeros(0)}
    metrics = _evaluate(path, label_map, ids, [empty] * len(ids)).compute()
    assert metrics == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    with pytest.raises(ValueError, match="before any update"):
        CocoMaskEvaluator(path, label_map).compute()
    with pytest.raises(ValueError, match="image id 999"):
        _evaluate(path, label_map, [999], [empty])
    wrong_size = {
        "masks": torch.ones(1, 10, 10, dtype=torch.bool),
        "labels": torch.tensor([0]),
        "scores": torch.tensor([1.0]),
    }
    with pytest.raises(ValueError, match="original size"):
        _evaluate(path, label_map, ids[:1], [wrong_size])


def test_post_process_format_matches_simple_dict(gt):
    path, label_map, per_image = gt
    ids, preds = _predictions(per_image, shift=2)
    converted = [
        {
            "segmentation": p["masks"].float(),
            "segments_info": [
                {"id": k, "label_id": int(label), "score": float(score), "was_fused": False}
                for k, (label, score) in enumerate(zip(p["labels"], p["scores"]))
            ],
        }
        for p in preds
    ]
    a = _evaluate(path, label_map, ids, preds).compute()
    b = _evaluate(path, label_map, ids, converted).compute()
    assert a == pytest.approx(b, nan_ok=True)


class _TwoRankAccelerator:
    """Stands in for a 2-process Accelerator: every gathered batch comes back twice (rank 0 and rank 1 saw
    the same padded samples), which the metric must not double-count."""

    def __init__(self):
        self.calls = 0

    def gather_for_metrics(self, data, use_gather_object=False):
        assert use_gather_object
        self.calls += 1
        return list(data) + list(data)


def test_gathers_through_accelerator(gt):
    path, label_map, per_image = gt
    ids, preds = _predictions(per_image, shift=2)
    accelerator = _TwoRankAccelerator()
    metric = load_coco_metric(path, label_map)
    assert add_batch(metric, ids[:2], preds[:2], accelerator) == ids[:2] * 2
    add_batch(metric, ids[2:], preds[2:], accelerator)
    assert accelerator.calls == 2
    expected = _evaluate(path, label_map, ids, preds).compute()
    assert metric.compute() == pytest.approx(expected, rel=0, abs=0, nan_ok=True)  # identical


def test_pycocotools_agrees(gt):
    path, label_map, per_image = gt
    ids, preds = _predictions(per_image, shift=2, seed=3)
    evaluator = _evaluate(path, label_map, ids, preds)
    ours = evaluator.compute()
    detections = [det for results in evaluator.results.values() for det in results]
    coco_gt = PyCOCO(str(path))
    coco_eval = PyCOCOeval(coco_gt, coco_gt.loadRes(detections), iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), coco_eval.stats[:6]):
        if value < 0:
            assert math.isnan(ours[name])
        else:
            assert ours[name] == pytest.approx(value * 100, abs=1e-6), name
