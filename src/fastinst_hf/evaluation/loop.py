"""The evaluation loop: COCO mask AP and per-image inference time of a FastInst model on a COCO-format dataset.

Used by the trainer for its periodic evaluation and by `fastinst-hf evaluate` / `scripts/evaluate_model.py`; AP comes
from the COCO mask AP `evaluate` module. It also runs under `accelerate launch` (the images are sharded over the
processes and the predictions gathered).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data.collate import FastInstCollator
from ..data.datasets import CocoInstanceDataset
from ..data.transforms import FastInstEvalTransform
from ..image_processing_fastinst import FastInstImageProcessor
from ..utils.device import synchronize
from ..utils.errors import InputError
from .coco_evaluator import METRIC_NAMES, encode_prediction


def build_eval_dataset(
    annotation_file: str | Path, image_dir: str | Path, processor: FastInstImageProcessor | None
) -> CocoInstanceDataset:
    """Every image of a COCO file (also those without annotations), resized as `processor` does at test time.

    The resize is the dataset's PIL resize (the official detectron2 one); the processor only post-processes.
    With `processor=None` the images keep their size: set `dataset.transform = eval_transform(processor)` later
    (the command line checks the data before it loads the model).
    """
    return CocoInstanceDataset(
        annotation_file,
        image_dir,
        transform=eval_transform(processor) if processor is not None else None,
        filter_empty=False,
    )


def eval_transform(processor: FastInstImageProcessor) -> FastInstEvalTransform:
    return FastInstEvalTransform(processor.size.shortest_edge, processor.size.longest_edge)


def check_eval_dataset(dataset: CocoInstanceDataset) -> None:
    """Raise `InputError` when `dataset` can not give a meaningful AP: no category, no readable image, or no usable
    annotation (AP would be NaN)."""
    where = dataset.annotation_file
    if not dataset.id2label:
        raise InputError(f"{where}: 'categories' is empty (expected at least one category)")
    if not len(dataset):
        raise InputError(f"{where}: no image was readable ({len(dataset.problems)} problem(s) reported above)")
    if not any(record.labels for record in dataset.records):
        raise InputError(f"{where}: no usable annotation on the readable images (AP would be NaN)")


def build_eval_dataloader(dataset: CocoInstanceDataset, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=FastInstCollator()
    )


def add_batch(metric, image_ids, predictions: list[dict], accelerator=None) -> list[int]:
    """Add one batch to `metric` (a `load_coco_metric` module) and return the ids of the images added.

    The predictions are RLE-encoded first (far smaller than dense masks) and, with `accelerator`, gathered from every
    process with `gather_for_metrics`, which drops the samples duplicated to even out the last batch: every process
    adds the whole batch to its own metric and so computes the full-dataset AP, as one process would.
    """
    batch = [(int(image_id), encode_prediction(p)) for image_id, p in zip(image_ids, predictions)]
    if accelerator is not None:
        batch = accelerator.gather_for_metrics(batch, use_gather_object=True)
    metric.add_batch(predictions=[p for _, p in batch], references=[image_id for image_id, _ in batch])
    return [image_id for image_id, _ in batch]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor: FastInstImageProcessor,
    dataloader,
    metric,
    accelerator=None,
    threshold: float = 0.0,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Run `model` over `dataloader` and return COCO mask AP plus timings.

    Args:
        model: a `FastInstForInstanceSegmentation` (unwrapped; it is put in eval mode and left there).
        processor: post-processes the outputs (`post_process_instance_segmentation`) to masks at the original size.
        dataloader: batches from `FastInstCollator` (prepared by `accelerator` when distributed, so that
            the gather can drop the samples duplicated to even out the last batch).
        metric: the COCO mask AP `evaluate` module from `load_coco_metric` (the ground truth of the dataset).
        threshold: minimum final score of a kept instance; 0 keeps the top-`num_detections` pairs, as upstream.
        device: where to move the batch when `accelerator` is None (a prepared dataloader moves it itself).

    Returns:
        `{"AP", "AP50", "AP75", "APs", "APm", "APl"}` in percent, `"ms_per_image"` (forward + post-processing),
        `"model_ms_per_image"`, `"postprocess_ms_per_image"` (wall-clock, averaged over every image of every
        process at the dataloader's batch size) and `"num_images"` (evaluated images, without duplicates).
    """
    model.eval()
    device = accelerator.device if accelerator is not None else (device or next(model.parameters()).device)
    model_seconds = post_seconds = 0.0
    images_seen = 0
    evaluated = set()
    for batch in dataloader:
        pixel_values = batch["pixel_values"].to(device)
        synchronize(device)
        start = time.perf_counter()
        outputs = model(pixel_values=pixel_values)
        synchronize(device)
        middle = time.perf_counter()
        predictions = processor.post_process_instance_segmentation(
            outputs,
            threshold=threshold,
            target_sizes=batch["orig_sizes"],
            image_sizes=batch["image_sizes"],
            return_binary_maps=True,
        )
        synchronize(device)
        end = time.perf_counter()
        model_seconds += middle - start
        post_seconds += end - middle
        images_seen += pixel_values.shape[0]
        evaluated.update(add_batch(metric, batch["image_ids"], predictions, accelerator))
    totals = torch.tensor([model_seconds, post_seconds, float(images_seen)], dtype=torch.float64, device=device)
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
    model_seconds, post_seconds, images_seen = totals.tolist()
    metrics = metric.compute()
    per_image = 1000.0 / max(images_seen, 1.0)
    metrics.update(
        ms_per_image=(model_seconds + post_seconds) * per_image,
        model_ms_per_image=model_seconds * per_image,
        postprocess_ms_per_image=post_seconds * per_image,
        num_images=float(len(evaluated)),
    )
    return metrics


def format_metrics(metrics: dict[str, float], batch_size: int = 1) -> str:
    """A two-line AP table with the per-image inference time beside it."""
    names = list(METRIC_NAMES) + ["ms/img", "model ms", "post ms"]
    values = [metrics[name] for name in METRIC_NAMES] + [
        metrics["ms_per_image"],
        metrics["model_ms_per_image"],
        metrics["postprocess_ms_per_image"],
    ]
    header = " | ".join(f"{name:>8}" for name in names)
    row = " | ".join("     nan" if math.isnan(v) else f"{v:8.2f}" for v in values)
    note = f"({int(metrics['num_images'])} images, batch size {batch_size}; ms = wall-clock per image)"
    return f"{header}\n{row}\n{note}"
