"""COCO instances -> the dataset format of transformers' instance-segmentation example scripts.

`examples/pytorch/instance-segmentation/run_instance_segmentation*.py` read a `datasets` dataset with an `image`, an
`annotation` PNG whose red channel is the semantic id (0 = background) and green channel the instance id (0 = none),
and `semantic_class_to_id`. `write_example_dataset` writes such a dataset as parquet files that
`datasets.load_dataset(folder)` reads offline, so the scripts run unchanged on COCO-format data.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from .coco import decode_segmentation, load_coco_json

BACKGROUND = "background"


def annotation_png(coco: dict, image: dict, category_to_semantic: dict[int, int]) -> np.ndarray:
    """`(H, W, 3)` uint8: R = semantic id, G = instance id (1..255 in annotation order, later ones on top), B = 0."""
    height, width = image["height"], image["width"]
    annotation = np.zeros((height, width, 3), dtype=np.uint8)
    instances = [a for a in coco["annotations"] if a["image_id"] == image["id"] and not a.get("iscrowd", 0)]
    if len(instances) > 255:
        raise ValueError(f"image {image['file_name']}: {len(instances)} instances, the format holds at most 255")
    for instance_id, instance in enumerate(instances, start=1):
        mask = decode_segmentation(instance["segmentation"], height, width).astype(bool)
        annotation[mask, 0] = category_to_semantic[instance["category_id"]]
        annotation[mask, 1] = instance_id
    return annotation


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_example_dataset(
    splits: dict[str, tuple[str | os.PathLike, str | os.PathLike]], output_dir: str | os.PathLike
) -> Path:
    """Write `{split: (coco_json, image_dir)}` as `output_dir/data/{split}-00000-of-00001.parquet`.

    Semantic ids follow the category order of the first split's JSON, 1..K after the background (0): run the scripts
    with `--do_reduce_labels` to train on the K classes only. Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    first = load_coco_json(next(iter(splits.values()))[0])
    names = [category["name"] for category in first["categories"]]
    semantic_class_to_id = {BACKGROUND: 0, **{name: index + 1 for index, name in enumerate(names)}}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "semantic_class_to_id": {name: datasets.Value("int64") for name in semantic_class_to_id},
        }
    )
    for split, (coco_json, image_dir) in splits.items():
        coco = load_coco_json(coco_json)
        if [category["name"] for category in coco["categories"]] != names:
            raise ValueError(f"{coco_json}: categories differ from those of the first split")
        category_to_semantic = {category["id"]: index + 1 for index, category in enumerate(coco["categories"])}
        rows = {"image": [], "annotation": [], "semantic_class_to_id": []}
        for image in coco["images"]:
            rows["image"].append({"bytes": (Path(image_dir) / image["file_name"]).read_bytes(), "path": None})
            annotation = annotation_png(coco, image, category_to_semantic)
            rows["annotation"].append({"bytes": _png_bytes(annotation), "path": None})
            rows["semantic_class_to_id"].append(semantic_class_to_id)
        target = output_dir / "data" / f"{split}-00000-of-00001.parquet"
        temporary = target.with_name(target.name + ".tmp")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(temporary))
        temporary.replace(target)
    return output_dir


__all__ = ["write_example_dataset", "annotation_png"]
