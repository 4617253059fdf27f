"""Training/evaluation datasets for FastInst and their collation into model inputs.

Two routes produce identical items:

* :class:`CocoInstanceDataset` reads a local COCO instances JSON plus an image folder.
* :func:`coco_to_hf_dataset` converts the same files into a :class:`datasets.Dataset` (masks normalised to
  RLE strings) and :class:`HFCocoInstanceDataset` reads it back.

Every item is ``{"image": uint8 [3, H, W] RGB, "mask_labels": bool [N, H, W], "class_labels": int64 [N],
"image_id": int, "orig_size": (h, w)}`` where ``H, W`` is the size after augmentation.

Reproducibility: the random augmentation of an item depends only on ``(seed, epoch, index)`` (see
:meth:`CocoInstanceDataset.set_epoch`), never on the DataLoader worker or on global RNG state. Together
with a seeded sampler (``accelerate.utils.set_seed`` before building the DataLoader and
``accelerator.skip_first_batches`` on resume) a resumed run sees the same images with the same augmentation.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..utils.images import to_rgb
from .coco import CocoRecord, decode_segmentation, encode_mask, parse_coco

Transform = Callable[[np.ndarray, np.ndarray, np.ndarray, random.Random], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _make_item(
    image: Image.Image,
    segmentations: Sequence[list | dict],
    labels: Sequence[int],
    image_id: int,
    transform: Transform | None,
    rng: random.Random,
) -> dict[str, Any]:
    # Apply the EXIF rotation as detectron2's read_image does (a no-op for images without the tag).
    array = np.asarray(to_rgb(ImageOps.exif_transpose(image)))
    h, w = array.shape[:2]
    masks = np.zeros((0, h, w), dtype=bool)
    if segmentations:
        masks = np.stack([decode_segmentation(s, h, w) for s in segmentations])
    label_array = np.asarray(labels, dtype=np.int64)
    if transform is not None:
        array, masks, label_array = transform(array, masks, label_array, rng)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))),
        "mask_labels": torch.from_numpy(masks),
        "class_labels": torch.from_numpy(label_array),
        "image_id": int(image_id),
        "orig_size": (h, w),
    }


class _SeededItems(torch.utils.data.Dataset):
    """Per-item RNG derived from (seed, epoch, index) so augmentation is independent of worker layout."""

    seed: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch`; call it at the start of every epoch (and on resume).

        With DataLoader workers, set it before the workers are created (persistent_workers=False, the
        default, recreates them each epoch) or the workers keep the old epoch.
        """
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> random.Random:
        # A str seed is hashed with SHA-512, so the stream is stable across processes and Python runs.
        return random.Random(f"fastinst-{self.seed}-{self.epoch}-{index}")


class CocoInstanceDataset(_SeededItems):
    """A COCO instances JSON + image folder as a torch Dataset of FastInst training/eval items.

    Args:
        annotation_file: COCO instances JSON (polygons, compressed or uncompressed RLE).
        image_dir: folder the "file_name" entries are relative to.
        transform: e.g. FastInstTrainTransform() or FastInstEvalTransform(); None keeps the original size.
        on_bad_annotation: "skip" (drop with one warning) or "error" (ValueError), checked at construction.
        filter_empty: drop images without any non-crowd annotation (upstream FILTER_EMPTY_ANNOTATIONS for
            training; pass False for evaluation).
        seed: base seed of the per-item augmentation RNG (see set_epoch).
        check_images: open every image header at construction (missing/unreadable files and size
            mismatches are reported up front). False saves that pass on very large datasets; a broken image
            then fails in __getitem__.

    Attributes: id2label, label2id, label_to_category_id (contiguous label → COCO category id, for
    evaluation output), problems (validation messages), image_ids.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        transform: Transform | None = None,
        on_bad_annotation: str = "skip",
        filter_empty: bool = True,
        seed: int = 0,
        check_images: bool = True,
    ):
        self.annotation_file = Path(annotation_file)
        records, categories, self.problems = parse_coco(annotation_file, image_dir, on_bad_annotation, check_images)
        self.records = [r for r in records if r.labels] if filter_empty else records
        self.id2label = categories.id2label
        self.label2id = categories.label2id
        self.label_to_category_id = categories.label_to_category_id
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        with Image.open(record.path) as image:
            return _make_item(
                image, record.segmentations, record.labels, record.image_id, self.transform, self.item_rng(index)
            )


# --------------------------------------------------------------------------------------------------
# `datasets` route
# --------------------------------------------------------------------------------------------------


def coco_features(category_names: Sequence[str]):
    """Explicit `datasets.Features` of the converted COCO dataset (segmentation = RLE "counts" string)."""
    import datasets  # imported here: it is slow to import and only this route needs it

    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "category": datasets.ClassLabel(names=list(category_names)),
                    "segmentation": datasets.Value("string"),
                }
            ),
        }
    )


def _generate_coco_examples(records: list[CocoRecord], stamp: str):
    # `stamp` (file size + mtime) is unused here; it is part of gen_kwargs so datasets' cache fingerprint
    # changes when the JSON is edited in place.
    del stamp
    for record in records:
        yield {
            "image": str(record.path),
            "image_id": record.image_id,
            "width": record.width,
            "height": record.height,
            "objects": [
                {
                    "id": int(ann_id) if ann_id is not None else -1,
                    "category": label,
                    "segmentation": encode_mask(decode_segmentation(segm, record.height, record.width))["counts"],
                }
                for segm, label, ann_id in zip(record.segmentations, record.labels, record.annotation_ids)
            ],
        }


def coco_to_hf_dataset(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    on_bad_annotation: str = "skip",
    cache_dir: str | os.PathLike | None = None,
):
    """Convert a COCO instances JSON + image folder into a `datasets.Dataset` (one row per image).

    Validation is the same as CocoInstanceDataset; crowd and bad annotations are dropped, images without
    annotations are kept (filter in HFCocoInstanceDataset). Polygons and RLE are normalised to compressed
    RLE "counts" strings at the image size. Objects' "category" is a ClassLabel of contiguous labels in
    ascending COCO category id order (`coco_categories(annotation_file)` gives the id maps).
    """
    import datasets

    records, categories, _ = parse_coco(annotation_file, image_dir, on_bad_annotation)
    stat = Path(annotation_file).stat()
    stamp = f"{Path(annotation_file).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return datasets.Dataset.from_generator(
        _generate_coco_examples,
        features=coco_features([categories.id2label[i] for i in range(len(categories.id2label))]),
        gen_kwargs={"records": records, "stamp": stamp},
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )


class HFCocoInstanceDataset(_SeededItems):
    """Wrap a dataset from `coco_to_hf_dataset` so it yields the same items as CocoInstanceDataset."""

    def __init__(self, hf_dataset, transform: Transform | None = None, filter_empty: bool = True, seed: int = 0):
        self.dataset = hf_dataset
        names = hf_dataset.features["objects"].feature["category"].names
        self.id2label = dict(enumerate(names))
        self.label2id = {name: label for label, name in self.id2label.items()}
        if filter_empty:
            lengths = [len(objects) for objects in hf_dataset["objects"]]
            self.indices = [i for i, n in enumerate(lengths) if n]
        else:
            self.indices = list(range(len(hf_dataset)))
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[self.indices[index]]
        size = [row["height"], row["width"]]
        segmentations = [{"size": size, "counts": obj["segmentation"]} for obj in row["objects"]]
        labels = [obj["category"] for obj in row["objects"]]
        return _make_item(row["image"], segmentations, labels, row["image_id"], self.transform, self.item_rng(index))
