"""Segment images (one or a batch) and describe their instances as JSON records."""

from __future__ import annotations

import time

import numpy as np
import pycocotools.mask as mask_util
import torch

from ..image_processing_fastinst import instance_inference_single
from ..utils.device import synchronize
from ..utils.packed_masks import PackedMasks

MASK_THRESHOLD = 0.5


def predict_image(model, processor, image, device, threshold: float, max_instances: int | None):
    """Segment one PIL image; returns (masks `(N, H, W)` bool numpy, labels, scores, stage times in ms)."""
    (masks, labels, scores), timings = predict_images(model, processor, [image], device, threshold, max_instances)
    return masks[0], labels[0], scores[0], timings


def predict_images(model, processor, images, device, threshold: float, max_instances: int | None):
    """Segment a list of PIL images in one batch per padded input size, so that every result is the one it gets
    alone (a smaller image padded to a larger one's size would see other zeros).

    Returns `((masks, labels, scores), timings)`: per image, masks `(N, H, W)` bool at its size (`PackedMasks`: one
    bit per pixel, so that many instances of a large image fit in memory), labels and scores; and the stage times in
    ms per image (each batch's time shared equally by its images). The instances are those of the processor's
    `post_process_instance_segmentation` (non-empty masks, by descending score).
    """
    start = time.perf_counter()
    inputs = [processor(images=[image], return_tensors="pt") for image in images]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, item in enumerate(inputs):
        groups.setdefault(tuple(item["pixel_values"].shape), []).append(index)
    synchronize(device)
    preprocessed = time.perf_counter()
    outputs = {}
    with torch.inference_mode():
        for indices in groups.values():
            pixel_values = torch.cat([inputs[i]["pixel_values"] for i in indices]).to(device)
            pixel_mask = torch.cat([inputs[i]["pixel_mask"] for i in indices]).to(device)
            outputs[tuple(indices)] = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    synchronize(device)
    inferred = time.perf_counter()
    results = [None] * len(images)
    for indices, output in outputs.items():
        sizes = [(images[i].height, images[i].width) for i in indices]
        for index, (position, mask_sizes) in zip(indices, enumerate(processor._mask_sizes(output, sizes, None))):
            results[index] = _instances(
                processor,
                output.class_queries_logits[position],
                output.masks_queries_logits[position],
                *mask_sizes,
                threshold,
                max_instances,
            )
    done = time.perf_counter()
    per_image = 1000 / max(len(images), 1)
    timings = {
        "preprocess": (preprocessed - start) * per_image,
        "inference": (inferred - preprocessed) * per_image,
        "postprocess": (done - inferred) * per_image,
    }
    return tuple(zip(*results)) if results else ((), (), ()), timings


def _instances(processor, class_logits, mask_logits, resized_size, output_size, threshold, max_instances):
    """One image's instances (with `processor`'s top-k size and duplicate suppression), each distinct query's mask
    made once and bit-packed as it is made (never all of them as bytes)."""
    packed = []

    def pack(masks):
        packed.extend(np.packbits(mask.cpu().numpy()) for mask in masks)

    args = (resized_size, output_size, threshold, MASK_THRESHOLD, processor.num_detections)
    instance = instance_inference_single(
        class_logits,
        mask_logits,
        *args,
        keep_masks=False,
        mask_sink=pack,
        duplicate_iou_threshold=processor.duplicate_iou_threshold,
    )
    kept = torch.nonzero(instance["areas"] > 0).flatten()[:max_instances]
    masks = PackedMasks.from_packed([packed[index] for index in instance["mask_indices"][kept].tolist()], output_size)
    return masks, instance["labels"][kept].tolist(), instance["scores"][kept].tolist()


def instances_to_records(masks, labels, scores, id2label) -> list[dict]:
    """JSON records of instances: label id and name, score, COCO RLE (str counts), bbox [x, y, w, h] and area."""
    records = []
    for index, (mask, label, score) in enumerate(zip(masks, labels, scores)):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        records.append(
            {
                "id": index,
                "label_id": int(label),
                "label": id2label.get(int(label), str(int(label))),
                "score": round(float(score), 6),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "area": int(mask_util.area(rle)),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            }
        )
    return records
