"""Segment one image and describe its instances as JSON records."""

from __future__ import annotations

import time

import numpy as np
import pycocotools.mask as mask_util
import torch

from ..utils.device import synchronize


def predict_image(model, processor, image, device, threshold: float, max_instances: int | None):
    """Segment one PIL image; returns (masks `(N, H, W)` bool numpy, labels, scores, stage times in ms)."""
    start = time.perf_counter()
    inputs = processor(images=[image], return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device)
    synchronize(device)
    preprocessed = time.perf_counter()
    with torch.inference_mode():
        outputs = model(pixel_values=pixel_values)
    synchronize(device)
    inferred = time.perf_counter()
    result = processor.post_process_instance_segmentation(
        outputs, threshold=threshold, target_sizes=[(image.height, image.width)], return_binary_maps=True
    )[0]
    infos = result["segments_info"][:max_instances]
    masks = result["segmentation"][: len(infos)].cpu().numpy()
    done = time.perf_counter()
    timings = {
        "preprocess": (preprocessed - start) * 1000,
        "inference": (inferred - preprocessed) * 1000,
        "postprocess": (done - inferred) * 1000,
    }
    return masks, [info["label_id"] for info in infos], [info["score"] for info in infos], timings


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
