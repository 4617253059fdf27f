"""The COCO mask AP `evaluate` module: loads offline from its path, and gives the AP of the project's COCO evaluator,
against reference masks or a COCO file."""

import json

import evaluate
import numpy as np
import pytest
import torch

from fastinst_hf.data.coco import decode_segmentation
from fastinst_hf.data.synthetic import make_shapes_dataset
from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator
from fastinst_hf.evaluation.coco_mask_ap import METRIC_PATH


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    path = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 4, image_size=(48, 64), seed=3)
    return path, json.loads(path.read_text())


def references_and_predictions(coco: dict):
    """Per image the GT masks, and predictions made from them: shifted by one pixel, the last one missed, plus a
    false positive, with scores that rank them."""
    rng = np.random.default_rng(0)
    references, predictions = [], []
    for image in coco["images"]:
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        masks = np.stack([decode_segmentation(a["segmentation"], 48, 64).astype(bool) for a in annotations])
        labels = np.array([a["category_id"] - 1 for a in annotations])
        references.append({"masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels)})
        predicted = np.concatenate([np.roll(masks[:-1], 1, axis=2), np.ones((1, 48, 64), dtype=bool)])
        predicted_labels = np.concatenate([labels[:-1], [0]])
        predictions.append(
            {"masks": predicted, "labels": predicted_labels, "scores": rng.uniform(0.1, 1, len(predicted))}
        )
    return references, predictions


def test_metric_equals_the_coco_evaluator_on_the_json(coco):
    path, data = coco
    references, predictions = references_and_predictions(data)
    metric = evaluate.load(METRIC_PATH)
    for reference, prediction in zip(references[:2], predictions[:2]):
        metric.add(prediction=prediction, reference=reference)
    metric.add_batch(predictions=predictions[2:], references=references[2:])
    ours = metric.compute()

    evaluator = CocoMaskEvaluator(path, {k: k + 1 for k in range(3)})
    evaluator.update([image["id"] for image in data["images"]], predictions)
    expected = evaluator.compute()
    assert 0 < ours["AP"] < 100
    assert ours == pytest.approx(expected, nan_ok=True)


def test_metric_scores_against_a_coco_file(coco):
    path, data = coco
    _, predictions = references_and_predictions(data)
    image_ids = [image["id"] for image in data["images"]]
    metric = evaluate.load(METRIC_PATH, coco_gt=str(path), label_to_category_id={k: k + 1 for k in range(3)})
    metric.add_batch(predictions=predictions[:2], references=image_ids[:2])
    metric.add_batch(predictions=predictions[2:], references=image_ids[2:])
    evaluator = CocoMaskEvaluator(path, {k: k + 1 for k in range(3)})
    evaluator.update(image_ids, predictions)
    assert metric.compute() == pytest.approx(evaluator.compute(), rel=0, abs=0, nan_ok=True)
    with pytest.raises(ValueError, match="label_to_category_id"):
        evaluate.load(METRIC_PATH, coco_gt=str(path))


def test_metric_reads_post_processing_output_and_checks_sizes(coco):
    _, data = coco
    references, _ = references_and_predictions(data)
    reference = references[0]
    # post_process_instance_segmentation(..., return_binary_maps=True) output, the GT itself as prediction
    segments_info = [{"id": i, "label_id": int(label), "score": 0.9} for i, label in enumerate(reference["labels"])]
    prediction = {"segmentation": reference["masks"], "segments_info": segments_info}
    result = evaluate.load(METRIC_PATH).compute(predictions=[prediction], references=[reference])
    assert result["AP"] == pytest.approx(100.0)
    wrong_size = {"masks": torch.zeros(1, 24, 32, dtype=torch.bool), "labels": [0], "scores": [0.5]}
    with pytest.raises(ValueError, match="24x32"):
        evaluate.load(METRIC_PATH).compute(predictions=[wrong_size], references=[reference])
