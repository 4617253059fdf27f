"""Training/evaluation data for FastInst: COCO-format instance datasets, augmentation and collation.

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

import json
import os
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# The processor's detectron2 ResizeShortestEdge rule, so training/evaluation sizes match inference exactly.
from .image_processing_fastinst import get_fastinst_output_image_size

# The upstream (SparseInst/FastInst) training recipe, see FastInstInstanceDatasetMapper.
TRAIN_SHORT_EDGES = (416, 448, 480, 512, 544, 576, 608, 640)
TRAIN_MAX_SIZE = 853
CROP_RESIZE_SHORT_EDGES = (400, 500, 600)
CROP_SIZE_RANGE = (384, 600)
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
# Problems listed in one warning / error message; the full list stays in `dataset.problems`.
_MAX_LISTED_PROBLEMS = 20
_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------------
# COCO JSON parsing and validation
# --------------------------------------------------------------------------------------------------


@dataclass
class CocoRecord:
    """One image of a validated COCO file: its path, size and the usable non-crowd annotations."""

    image_id: int
    path: Path
    height: int
    width: int
    segmentations: list[Any] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    annotation_ids: list[int] = field(default_factory=list)


@dataclass
class CocoCategories:
    """Contiguous labels 0..K-1 in the order of ascending COCO category id."""

    id2label: dict[int, str]
    label2id: dict[str, int]
    label_to_category_id: dict[int, int]
    category_id_to_label: dict[int, int]


def load_coco_json(annotation_file: str | os.PathLike) -> dict:
    """Read a COCO instances JSON and check its top-level fields.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON or lacks one of "images", "annotations", "categories".
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: missing top-level field '{key}' (expected a list)")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: field '{key}' must be a list, got {type(data[key]).__name__}")
    category_ids = [cat.get("id") if isinstance(cat, dict) else None for cat in data["categories"]]
    if not all(isinstance(cid, int) for cid in category_ids):
        raise ValueError(f"{path}: every entry of 'categories' needs an integer 'id', got {category_ids}")
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"{path}: duplicate category ids in 'categories': {sorted(category_ids)}")
    return data


def coco_categories(coco: dict | str | os.PathLike) -> CocoCategories:
    """Contiguous label maps for the categories of a COCO dict or file (sorted by category id)."""
    data = coco if isinstance(coco, dict) else load_coco_json(coco)
    categories = sorted(data["categories"], key=lambda c: int(c["id"]))
    id2label = {label: str(cat.get("name", cat["id"])) for label, cat in enumerate(categories)}
    label_to_category_id = {label: int(cat["id"]) for label, cat in enumerate(categories)}
    return CocoCategories(
        id2label=id2label,
        label2id={name: label for label, name in id2label.items()},
        label_to_category_id=label_to_category_id,
        category_id_to_label={cid: label for label, cid in label_to_category_id.items()},
    )


def _segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why `segm` cannot be decoded for an image of `height` x `width`, or None if it can."""
    if isinstance(segm, list):
        if not segm:
            return "empty polygon list (expected at least one polygon of >= 3 points)"
        for poly in segm:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, list) else type(poly).__name__
                return f"polygon with {n} coordinates (expected a flat list [x1, y1, ...] of >= 3 points)"
        return None
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "RLE without 'counts'/'size'"
        size = [int(s) for s in segm["size"]]
        if size != [height, width]:
            return f"RLE size {size} differs from the image size [{height}, {width}]"
        return None
    return f"segmentation of type {type(segm).__name__} (expected polygons list or RLE dict)"


def _bbox_problem(bbox: Any, height: int, width: int) -> str | None:
    # One pixel of slack: many exporters round box corners outwards.
    if bbox is None:
        return None
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {bbox!r} (expected [x, y, w, h])"
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        return f"bbox {list(bbox)} outside the image of width {width}, height {height}"
    return None


def _image_problem(path: Path, height: int, width: int) -> str | None:
    if not path.is_file():
        return f"image file {path} not found"
    try:
        # Only the header is read here; pixels are decoded lazily in __getitem__.
        with Image.open(path) as img:
            size = img.size
            # EXIF orientations 5-8 rotate by 90°: annotations refer to the displayed (transposed) image.
            if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                size = size[::-1]
    except (UnidentifiedImageError, OSError) as err:
        return f"image file {path} is unreadable ({err})"
    if size != (width, height):
        return f"image file {path} is {size[0]}x{size[1]} (w x h) but the JSON says {width}x{height}"
    return None


def parse_coco(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    on_bad_annotation: str = "skip",
    check_images: bool = True,
) -> tuple[list[CocoRecord], CocoCategories, list[str]]:
    """Validate a COCO instances file and return one record per image.

    Crowd annotations are dropped. Bad annotations (malformed segmentation, bbox outside the image,
    unknown category or image id) are dropped; bad images (missing or unreadable file, size mismatch)
    are dropped with all their annotations.

    Args:
        on_bad_annotation: "skip" (warn once with the list of problems) or "error" (raise ValueError).
        check_images: open each image header up front so a broken file fails here, not in a worker.

    Returns:
        (records, categories, problems) where problems are human-readable strings naming the file and
        the annotation/image id.
    """
    if on_bad_annotation not in ("skip", "error"):
        raise ValueError(f"on_bad_annotation must be 'skip' or 'error', got {on_bad_annotation!r}")
    annotation_file = Path(annotation_file)
    image_dir = Path(image_dir)
    data = load_coco_json(annotation_file)
    categories = coco_categories(data)
    problems: list[str] = []

    records: dict[int, CocoRecord] = {}
    file_names: dict[int, str] = {}  # of every image id seen, usable or not
    for img in data["images"]:
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            problems.append(f"{annotation_file}: image entry {img.get('id', img)} lacks {missing}")
            continue
        image_id = int(img["id"])
        if image_id in file_names:
            # Annotations name their image by id only, so they can not tell two such entries apart: keep the first.
            problems.append(
                f"{annotation_file}: image id {image_id}: duplicate image id ({img['file_name']} skipped, "
                f"{file_names[image_id]} kept)"
            )
            continue
        file_names[image_id] = img["file_name"]
        record = CocoRecord(image_id, image_dir / img["file_name"], int(img["height"]), int(img["width"]))
        problem = _image_problem(record.path, record.height, record.width) if check_images else None
        if problem:
            problems.append(f"{annotation_file}: image id {record.image_id}: {problem}")
            continue
        records[record.image_id] = record
    known_images = {int(img["id"]) for img in data["images"] if "id" in img}

    for ann in data["annotations"]:
        ann_id = ann.get("id")
        if ann.get("iscrowd", 0):
            continue
        image_id = ann.get("image_id")
        where = f"{annotation_file}: annotation id {ann_id} (image id {image_id})"
        if image_id not in known_images:
            problems.append(f"{where}: unknown image id (expected one of the 'images' ids)")
            continue
        record = records.get(int(image_id))
        if record is None:  # the image itself was reported above
            continue
        category_id = ann.get("category_id")
        if category_id not in categories.category_id_to_label:
            problems.append(
                f"{where}: unknown category id {category_id} "
                f"(expected one of {sorted(categories.category_id_to_label)})"
            )
            continue
        problem = _segmentation_problem(ann.get("segmentation"), record.height, record.width) or _bbox_problem(
            ann.get("bbox"), record.height, record.width
        )
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        record.segmentations.append(ann["segmentation"])
        record.labels.append(categories.category_id_to_label[category_id])
        record.annotation_ids.append(ann_id)

    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        summary = f"{len(problems)} bad annotation(s)/image(s) in {annotation_file}:\n  {listed}" + (
            f"\n  ... and {more} more" if more > 0 else ""
        )
        if on_bad_annotation == "error":
            raise ValueError(summary)
        warnings.warn(summary + "\nThese were skipped.", stacklevel=2)
    return list(records.values()), categories, problems


def segmentation_to_rle(segm: list | dict, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as one compressed RLE."""
    if isinstance(segm, list):
        return mask_util.merge(mask_util.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_util.frPyObjects(segm, height, width)
    return segm


def decode_segmentation(segm: list | dict, height: int, width: int) -> np.ndarray:
    """Decode polygons, compressed RLE or uncompressed RLE into a bool mask [height, width]."""
    return mask_util.decode(segmentation_to_rle(segm, height, width)).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """Bool mask [H, W] → compressed COCO RLE with a JSON-serialisable str "counts"."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def resize_image_and_masks(
    image: np.ndarray, masks: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image [H, W, 3] uint8 bilinearly (PIL, as detectron2) and masks [N, H, W] bool nearest.

    Upstream rasterises transformed polygons at the output size instead; the two differ only along edges.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image, masks
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if masks.shape[0]:
        masks = F.interpolate(torch.from_numpy(masks[None]).to(torch.uint8), size=(h, w), mode="nearest")[0]
        masks = masks.numpy().astype(bool)
    else:
        masks = np.zeros((0, h, w), dtype=bool)
    return image, masks


class FastInstTrainTransform:
    """The FastInst/SparseInst training augmentation.

    With probability ``1 - crop_prob`` pipeline (a): ResizeShortestEdge (short side uniformly chosen from
    ``short_edges``, long side capped at ``max_size``) then horizontal flip with ``flip_prob``. Otherwise
    pipeline (b): ResizeShortestEdge to a choice of ``crop_resize_short_edges`` (no cap), a RandomCrop
    whose height and width are each uniform in ``crop_size_range`` (clipped to the image, detectron2's
    "absolute_range"), then pipeline (a). Instances left empty by the crop are removed.

    Call with ``(image [H, W, 3] uint8, masks [N, H, W] bool, labels [N] int64, rng: random.Random)``;
    returns the transformed triple. All randomness comes from ``rng``.
    """

    def __init__(
        self,
        short_edges: Sequence[int] = TRAIN_SHORT_EDGES,
        max_size: int = TRAIN_MAX_SIZE,
        flip_prob: float = 0.5,
        crop_prob: float = 0.5,
        crop_resize_short_edges: Sequence[int] = CROP_RESIZE_SHORT_EDGES,
        crop_size_range: tuple[int, int] = CROP_SIZE_RANGE,
    ):
        if crop_size_range[0] > crop_size_range[1]:
            raise ValueError(f"crop_size_range must be (min, max), got {crop_size_range}")
        self.short_edges = tuple(short_edges)
        self.max_size = max_size
        self.flip_prob = flip_prob
        self.crop_prob = crop_prob
        self.crop_resize_short_edges = tuple(crop_resize_short_edges)
        self.crop_size_range = crop_size_range

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray, rng: random.Random
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if rng.random() < self.crop_prob:
            h, w = image.shape[:2]
            # Upstream does not cap the long side before the crop.
            size = get_fastinst_output_image_size(h, w, rng.choice(self.crop_resize_short_edges), sys.maxsize)
            image, masks = resize_image_and_masks(image, masks, size)
            h, w = image.shape[:2]
            lo, hi = self.crop_size_range
            crop_h = rng.randint(min(h, lo), min(h, hi))
            crop_w = rng.randint(min(w, lo), min(w, hi))
            y0, x0 = rng.randint(0, h - crop_h), rng.randint(0, w - crop_w)
            image = image[y0 : y0 + crop_h, x0 : x0 + crop_w]
            masks = masks[:, y0 : y0 + crop_h, x0 : x0 + crop_w]
            keep = masks.any(axis=(1, 2))
            masks, labels = masks[keep], labels[keep]
        h, w = image.shape[:2]
        size = get_fastinst_output_image_size(h, w, rng.choice(self.short_edges), self.max_size)
        image, masks = resize_image_and_masks(image, masks, size)
        if rng.random() < self.flip_prob:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        # Nearest-neighbour downscaling can drop a tiny instance entirely.
        keep = masks.any(axis=(1, 2))
        return np.ascontiguousarray(image), np.ascontiguousarray(masks[keep]), labels[keep]


class FastInstEvalTransform:
    """Deterministic test-time resize (detectron2 ResizeShortestEdge(short_edge, max_size), no flip).

    Defaults are the R50/R101 "x3_640" configs; the D1 "x1_576" configs use 576 / 777.
    """

    def __init__(self, short_edge: int = 640, max_size: int = 853):
        self.short_edge = short_edge
        self.max_size = max_size

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray, rng: random.Random | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        size = get_fastinst_output_image_size(h, w, self.short_edge, self.max_size)
        image, masks = resize_image_and_masks(image, masks, size)
        return image, masks, labels


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
    array = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
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


# --------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------


class FastInstCollator:
    """Batch items into Mask2Former-style model inputs.

    Images are normalised ((x - mean) / std on 0-255 RGB) and zero-padded bottom/right to the batch
    maximum rounded up to `size_divisor` (zero *after* normalisation, as detectron2's ImageList).

    Returns:
        pixel_values float [B, 3, Hp, Wp]; pixel_mask long [B, Hp, Wp] (1 = real pixel);
        mask_labels list of float [N_i, Hp, Wp] (zero-padded); class_labels list of long [N_i];
        image_ids list[int]; orig_sizes list[(h, w)]; image_sizes list[(h, w)] resized, unpadded.
    """

    def __init__(
        self,
        image_mean: Sequence[float] = IMAGENET_MEAN_255,
        image_std: Sequence[float] = IMAGENET_STD_255,
        size_divisor: int = 32,
    ):
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        self.size_divisor = size_divisor

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        sizes = [tuple(item["image"].shape[-2:]) for item in items]
        divisor = max(self.size_divisor, 1)
        pad_h = -(-max(h for h, _ in sizes) // divisor) * divisor
        pad_w = -(-max(w for _, w in sizes) // divisor) * divisor
        pixel_values = torch.zeros(len(items), 3, pad_h, pad_w)
        pixel_mask = torch.zeros(len(items), pad_h, pad_w, dtype=torch.long)
        mask_labels = []
        for i, (item, (h, w)) in enumerate(zip(items, sizes)):
            pixel_values[i, :, :h, :w] = (item["image"].float() - self.image_mean) / self.image_std
            pixel_mask[i, :h, :w] = 1
            masks = torch.zeros(item["mask_labels"].shape[0], pad_h, pad_w)
            masks[:, :h, :w] = item["mask_labels"].float()
            mask_labels.append(masks)
        return {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "mask_labels": mask_labels,
            "class_labels": [item["class_labels"].long() for item in items],
            "image_ids": [item["image_id"] for item in items],
            "orig_sizes": [tuple(item["orig_size"]) for item in items],
            "image_sizes": sizes,
        }
