"""COCO instances JSON: parsing, validation with problems named by file and id, and segmentation <-> RLE.

`parse_coco` turns a COCO file plus its image folder into `CocoRecord`s (usable non-crowd annotations per image)
and lists every bad annotation or image (polygon with fewer than 3 points, box outside the image, unknown category,
missing or unreadable image, size mismatch) by file and id.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, UnidentifiedImageError

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
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a JSON text file (byte {err.start} is not UTF-8: {err.reason})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: missing top-level field '{key}' (expected a list)")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: field '{key}' must be a list, got {type(data[key]).__name__}")
    for key in ("images", "annotations", "categories"):
        if not all(isinstance(entry, dict) for entry in data[key]):
            raise ValueError(f"{path}: every entry of '{key}' must be a JSON object")
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


def annotation_problem(ann: dict, height: int, width: int, category_ids: Collection[int]) -> str | None:
    """Why annotation `ann` of an image of `height` x `width` can not be used (unknown category, undecodable
    segmentation, box outside the image), or None. Training and evaluation drop the same annotations."""
    category_id = ann.get("category_id")
    if category_id not in category_ids:
        return f"unknown category id {category_id} (expected one of {sorted(category_ids)})"
    return _segmentation_problem(ann.get("segmentation"), height, width) or _bbox_problem(
        ann.get("bbox"), height, width
    )


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
        problem = annotation_problem(ann, record.height, record.width, categories.category_id_to_label)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        record.segmentations.append(ann["segmentation"])
        record.labels.append(categories.category_id_to_label[ann["category_id"]])
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
