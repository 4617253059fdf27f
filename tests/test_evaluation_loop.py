"""The evaluation loop of `fastinst-hf evaluate` and training scores through the COCO mask AP `evaluate` module with
the numbers of the project's COCO evaluator, also where COCO is special: crowd regions, images without annotations,
annotations dropped as unusable."""

import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from fastinst_hf.cli import main
from fastinst_hf.data.coco import annotation_problem, decode_segmentation, load_coco_json
from fastinst_hf.data.synthetic import make_shapes_dataset
from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator
from fastinst_hf.evaluation.coco_mask_ap import load_coco_metric
from fastinst_hf.evaluation.loop import build_eval_dataloader, build_eval_dataset, evaluate
from fastinst_hf.image_processing_fastinst import FastInstImageProcessor

HEIGHT, WIDTH = 48, 64
CROWD = (slice(30, 46), slice(2, 30))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Shapes with a crowd region on the first image, an unusable 2-point polygon and an image without annotations."""
    out = tmp_path_factory.mktemp("special")
    path = make_shapes_dataset(out, num_images=3, image_size=(HEIGHT, WIDTH), seed=5)
    data = load_coco_json(path)
    crowd = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    crowd[CROWD] = 1
    rle = mask_util.encode(np.asfortranarray(crowd))
    first, next_id = data["images"][0]["id"], max(ann["id"] for ann in data["annotations"]) + 1
    data["annotations"] += [
        {"id": next_id, "image_id": first, "category_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}},
        {"id": next_id + 1, "image_id": first, "category_id": 2, "segmentation": [[1, 1, 5, 5]]},
    ]  # fmt: skip
    # Mirrored: a plain copy would give the first image's scores exactly, and COCO ranks exact ties by image order.
    Image.open(out / "images" / data["images"][0]["file_name"]).transpose(Image.FLIP_LEFT_RIGHT).save(
        out / "images" / "empty.png"
    )
    data["images"].append({"id": 99, "file_name": "empty.png", "height": HEIGHT, "width": WIDTH})
    path.write_text(json.dumps(data))
    return path, out / "images", data


def predictions(data: dict) -> dict[int, dict]:
    """Per image id: its usable non-crowd instances shifted by a pixel, a detection on the crowd region and a false
    positive, with random scores."""
    rng = np.random.default_rng(0)
    result = {}
    for image in data["images"]:
        annotations = [
            a
            for a in data["annotations"]
            if a["image_id"] == image["id"]
            and not a.get("iscrowd")
            and not annotation_problem(a, HEIGHT, WIDTH, {1, 2, 3})
        ]
        masks = [np.roll(decode_segmentation(a["segmentation"], HEIGHT, WIDTH), 1, axis=1) for a in annotations]
        crowd, false_positive = np.zeros((2, HEIGHT, WIDTH), dtype=bool)
        crowd[CROWD], false_positive[:10, 40:60] = True, True
        labels = [a["category_id"] - 1 for a in annotations] + [0, 1]
        scores = rng.uniform(0.1, 1.0, len(labels))
        result[image["id"]] = {
            "masks": torch.from_numpy(np.stack([*masks, crowd, false_positive])),
            "labels": torch.tensor(labels),
            "scores": torch.from_numpy(scores).float(),
        }
    return result


class Replay(torch.nn.Module):
    """Model and processor stand-in: post-processing returns the given predictions in the dataloader's order."""

    def __init__(self, predictions: list[dict]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.predictions = list(predictions)

    def forward(self, pixel_values):
        return pixel_values

    def post_process_instance_segmentation(self, outputs, target_sizes, **kwargs):
        return [self.predictions.pop(0) for _ in target_sizes]


def test_loop_through_the_metric_equals_the_coco_evaluator(coco):
    path, images, data = coco
    processor = FastInstImageProcessor(size={"shortest_edge": HEIGHT, "longest_edge": WIDTH})
    with pytest.warns(UserWarning, match="polygon with 4 coordinates"):
        dataset = build_eval_dataset(path, images, processor)
    per_image = predictions(data)
    replay = Replay([per_image[image_id] for image_id in dataset.image_ids])
    metric = load_coco_metric(path, dataset.label_to_category_id)
    loader = build_eval_dataloader(dataset, batch_size=3)
    ours = evaluate(replay, replay, loader, metric, device=torch.device("cpu"))

    evaluator = CocoMaskEvaluator(path, dataset.label_to_category_id)
    evaluator.update(list(per_image), list(per_image.values()))
    expected = evaluator.compute()
    assert {name: ours[name] for name in expected} == pytest.approx(expected, rel=0, abs=0, nan_ok=True)
    assert 0 < ours["AP"] < 100 and ours["num_images"] == 4
    assert (metric.num_annotations, metric.num_dropped_annotations) == (evaluator.num_annotations, 1)
    # The crowd region counts: scored as an ordinary instance, the AP moves.
    no_crowd = {**data, "annotations": [{**a, "iscrowd": 0} for a in data["annotations"]]}
    as_instance = CocoMaskEvaluator(no_crowd, dataset.label_to_category_id)
    as_instance.update(list(per_image), list(per_image.values()))
    assert as_instance.compute()["AP"] != ours["AP"]


@pytest.mark.slow  # an `accelerate launch` of 2 processes: about a minute on a loaded 2-core machine
def test_two_processes_give_the_one_process_ap(coco, capsys):
    """`fastinst-hf evaluate` of the embedded model under `accelerate launch` with 2 CPU processes: 4 images in
    batches of 3, so the second process pads its batch with duplicates, which must not count."""
    path, images, _ = coco
    args = ["evaluate", "--coco-json", str(path), "--images", str(images), "--device", "cpu", "--batch-size", "3"]
    assert main(args) == 0
    one = capsys.readouterr().out
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastinst_hf.cli"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(4 images, batch size 3" in one and "(4 images, batch size 3" in two.stdout
    assert ap_row(two.stdout) == ap_row(one) and float(ap_row(one)[0]) > 0


def ap_row(stdout: str) -> list[str]:
    """The AP, AP50, ... cells of the table `fastinst-hf evaluate` prints."""
    return [cell.strip() for cell in [line for line in stdout.splitlines() if "|" in line][1].split("|")[:6]]
