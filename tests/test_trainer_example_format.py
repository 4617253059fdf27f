"""Training with the transformers Trainer on a dataset in the format of transformers' instance-segmentation example
scripts (`image`, `annotation` PNG with R = semantic id and G = instance id, `semantic_class_to_id`), the way those
scripts do it: processor call per image, list-of-masks collator, unbatched evaluation with a COCO mask AP metric."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import evaluate
import numpy as np
import pytest
import torch
from datasets import load_dataset
from test_transformers_conventions import tiny_config
from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, Trainer, TrainingArguments

from fastinst_hf import FastInstForInstanceSegmentation, FastInstImageProcessor
from fastinst_hf.data.coco import decode_segmentation
from fastinst_hf.data.example_format import write_example_dataset
from fastinst_hf.data.synthetic import make_shapes_dataset
from fastinst_hf.evaluation.coco_mask_ap import METRIC_PATH


@pytest.fixture(scope="module")
def example_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("example-format")
    train = make_shapes_dataset(root / "train", 4, image_size=(64, 64), seed=0)
    validation = make_shapes_dataset(root / "validation", 3, image_size=(64, 64), seed=1)
    splits = {"train": (train, root / "train" / "images"), "validation": (validation, root / "validation" / "images")}
    write_example_dataset(splits, root / "dataset")
    return load_dataset(str(root / "dataset"), cache_dir=str(root / "cache")), validation


def test_annotation_png_holds_semantic_and_instance_ids(example_dataset):
    dataset, validation_json = example_dataset
    coco = json.loads(validation_json.read_text())
    example = dataset["validation"][0]
    assert example["semantic_class_to_id"] == {"background": 0, "ellipse_0": 1, "rectangle_1": 2, "triangle_2": 3}
    annotation = np.array(example["annotation"])
    for instance_id, instance in enumerate([a for a in coco["annotations"] if a["image_id"] == 1], start=1):
        mask = decode_segmentation(instance["segmentation"], 64, 64).astype(bool)
        # the shapes annotate visible parts, so instances do not overlap and every pixel keeps its ids
        assert (annotation[mask, 1] == instance_id).all()
        assert (annotation[mask, 0] == instance["category_id"]).all()
    assert (annotation[annotation[..., 1] == 0, 0] == 0).all()


def transform_batch(examples, processor):
    """What the scripts' `augment_and_transform_batch` does, without the augmentation."""
    batch = {"pixel_values": [], "mask_labels": [], "class_labels": []}
    for image, annotation in zip(examples["image"], examples["annotation"]):
        semantic_and_instance = np.array(annotation)[..., :2]
        pairs = np.unique(semantic_and_instance.reshape(-1, 2), axis=0)
        inputs = processor(
            images=[np.array(image)],
            segmentation_maps=[semantic_and_instance[..., 1]],
            instance_id_to_semantic_id={int(instance): int(semantic) for semantic, instance in pairs},
            return_tensors="pt",
        )
        for key in batch:
            batch[key].append(inputs[key][0])
    return batch


def collate(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "mask_labels": [example["mask_labels"] for example in examples],
        "class_labels": [example["class_labels"] for example in examples],
    }


def test_trainer_trains_evaluates_and_saves(example_dataset, tmp_path):
    dataset, _ = example_dataset
    label2id = {name: index - 1 for name, index in dataset["train"][0]["semantic_class_to_id"].items() if index}
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained"
    FastInstForInstanceSegmentation(tiny_config(id2label={0: "x", 1: "y"})).save_pretrained(pretrained)
    FastInstImageProcessor().save_pretrained(pretrained)
    # As the scripts load them: new classes (heads re-initialised), fixed size, background dropped.
    model = AutoModelForUniversalSegmentation.from_pretrained(
        pretrained, label2id=label2id, id2label={v: k for k, v in label2id.items()}, ignore_mismatched_sizes=True
    )
    processor = AutoImageProcessor.from_pretrained(
        pretrained, do_resize=True, size={"height": 64, "width": 64}, do_reduce_labels=True
    )
    metric = evaluate.load(METRIC_PATH)
    batches = []

    def compute_metrics(evaluation, compute_result):
        class_logits, mask_logits = evaluation.predictions[:2]
        masks, labels = evaluation.label_ids
        batches.append((tuple(class_logits.shape), len(masks)))
        outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
        predictions = processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[m.shape[-2:] for m in masks], return_binary_maps=True
        )
        metric.add_batch(predictions=predictions, references=[{"masks": m, "labels": c} for m, c in zip(masks, labels)])
        return metric.compute() if compute_result else None

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-4,
        remove_unused_columns=False,
        eval_do_concat_batches=False,
        batch_eval_metrics=True,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset["train"].with_transform(lambda batch: transform_batch(batch, processor)),
        eval_dataset=dataset["validation"].with_transform(lambda batch: transform_batch(batch, processor)),
        processing_class=processor,
        data_collator=collate,
        compute_metrics=compute_metrics,
    )
    result = trainer.train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    metrics = trainer.evaluate()
    # 3 validation images in batches of 2: the prediction tuple starts with the class logits of each batch
    assert batches == [((2, 10, 4), 2), ((1, 10, 4), 1)]
    assert np.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_AP"] <= 100
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "final")
    assert reloaded.config.id2label == {0: "ellipse_0", 1: "rectangle_1", 2: "triangle_2"}
    assert AutoImageProcessor.from_pretrained(tmp_path / "final").size == {"height": 64, "width": 64}


def test_prepare_script_writes_dataset_and_remote_code_model(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_example_script_run.py"
    args = [sys.executable, str(script), str(tmp_path), "--train-images", "2", "--val-images", "1", "--size", "64"]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "run_instance_segmentation_no_trainer.py" in completed.stdout
    dataset = load_dataset(str(tmp_path / "dataset"), cache_dir=str(tmp_path / "cache"))
    assert dataset["train"].num_rows == 2 and dataset["validation"].num_rows == 1
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "AutoModelForUniversalSegmentation" in config["auto_map"]
    assert (tmp_path / "model" / "modeling_fastinst.py").is_file()
