"""Segment images (one or a batch) and describe their instances as JSON records."""

from __future__ import annotations

import time

import numpy as np
import pycocotools.mask as mask_util
import torch

from ..utils.device import synchronize


def predict_image(model, processor, image, device, threshold: float, max_instances: int | None):
    """Segment one PIL image; returns (masks `(N, H, W)` bool numpy, labels, scores, stage times in ms)."""
    (masks, labels, scores), timings = predict_images(model, processor, [image], device, threshold, max_instances)
    return masks[0], labels[0], scores[0], timings


def predict_images(model, processor, images, device, threshold: float, max_instances: int | None):
    """Segment a list of PIL images in one batch per padded input size, so that every result is the one it gets
    alone (a smaller image padded to a larger one's size would see other zeros).

    Returns `((masks, labels, scores), timings)`: per image, masks `(N, H, W)` bool numpy at its size, labels and
    scores; and the stage times in ms per image (each batch's time shared equally by its images).
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
        processed = processor.post_process_instance_segmentation(
            output, threshold=threshold, target_sizes=sizes, return_binary_maps=True
        )
        for i, result in zip(indices, processed):
            infos = result["segments_info"][:max_instances]
            masks = result["segmentation"][: len(infos)].cpu().numpy()
            results[i] = (masks, [info["label_id"] for info in infos], [info["score"] for info in infos])
    done = time.perf_counter()
    per_image = 1000 / max(len(images), 1)
    timings = {
        "preprocess": (preprocessed - start) * per_image,
        "inference": (inferred - preprocessed) * per_image,
        "postprocess": (done - inferred) * per_image,
    }
    return tuple(zip(*results)) if results else ((), (), ()), timings


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
