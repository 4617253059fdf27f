"""Offline demo datasets in COCO format: random shapes and nuclei tiles from the stardist wheel.

Both write images plus a COCO instances JSON that `fastinst_hf.data.CocoInstanceDataset` reads. Every file
is written to a temporary name in the target folder and moved into place with `os.replace`, so an
interrupted run never leaves a truncated image or JSON behind.
"""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from ..utils.files import atomic_write_bytes
from .coco import encode_mask, load_coco_json

SHAPE_KINDS = ("ellipse", "rectangle", "triangle")
# Base colours of the classes (RGB); class k draws shape SHAPE_KINDS[k % 3] in colour _PALETTE[k].
_PALETTE = (
    (220, 60, 60),
    (60, 180, 75),
    (70, 110, 230),
    (240, 200, 40),
    (170, 80, 200),
    (40, 200, 200),
    (250, 140, 30),
    (150, 150, 150),
    (120, 60, 20),
    (255, 120, 200),
)
# Files inside the stardist wheel (0.9.2): a 512x512 uint16 DSB-2018 fluorescence image and its labels.
STARDIST_IMAGE_MEMBER = "stardist/data/images/img2d.tif"
STARDIST_LABELS_MEMBER = "stardist/data/images/mask2d.tif"


def _atomic_save_image(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG", quality=95)
    atomic_write_bytes(path, buffer.getvalue())


def write_coco_json(path: str | os.PathLike, coco: dict) -> Path:
    """Write a COCO dict atomically and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(coco).encode("utf-8"))
    return path


def class_name(label: int) -> str:
    """Name of class `label`: its shape kind, numbered from the second colour of a kind on ("ellipse_3")."""
    kind = SHAPE_KINDS[label % 3]
    return kind if label < len(SHAPE_KINDS) else f"{kind}_{label}"


def _shape_polygon(kind: str, rng: random.Random, height: int, width: int) -> list[float]:
    """A random shape as a flat polygon [x1, y1, ...] (ellipses approximated by 32 vertices)."""
    size = min(height, width)
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    rx, ry = rng.uniform(0.06, 0.22) * size, rng.uniform(0.06, 0.22) * size
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        points = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    elif kind == "rectangle":
        points = np.array([[cx - rx, cy - ry], [cx + rx, cy - ry], [cx + rx, cy + ry], [cx - rx, cy + ry]])
    else:
        angles = np.array([rng.uniform(0, 2 * np.pi / 3) + k * 2 * np.pi / 3 for k in range(3)])
        points = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)
    points[:, 0] = points[:, 0].clip(0, width - 1)
    points[:, 1] = points[:, 1].clip(0, height - 1)
    return [round(float(v), 2) for v in points.reshape(-1)]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured background [H, W, 3] float: a random colour gradient, stripes and pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    image = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    freq, phase = rng.uniform(10, 40), rng.uniform(0, 2 * np.pi)
    image += 15 * np.sin(freq * (xx + yy) + phase)[..., None]
    return image + rng.normal(0, 12, size=image.shape)


def make_shapes_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    image_size: tuple[int, int] = (256, 256),
    num_classes: int = 3,
    seed: int = 0,
    polygon_fraction: float = 0.5,
    max_shapes: int = 6,
    min_area: int = 40,
    image_format: str = "png",
) -> Path:
    """Generate a COCO instance dataset of random coloured shapes and return the JSON path.

    Class k (< 10) is shape SHAPE_KINDS[k % 3] in a class colour (with jitter), drawn over a textured,
    noisy background. Shapes overlap; each annotation is the *visible* part of its shape. Unoccluded shapes
    are stored as polygons with probability `polygon_fraction`, all others as compressed RLE. Instances
    with fewer than `min_area` visible pixels are dropped. Layout: `out_dir/images/*.{png,jpg}` and
    `out_dir/annotations.json` (category ids start at 1, as in COCO).
    """
    if not 1 <= num_classes <= len(_PALETTE):
        raise ValueError(f"num_classes must be in [1, {len(_PALETTE)}], got {num_classes}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    height, width = image_size
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "name": class_name(k), "supercategory": "shape"} for k in range(num_classes)]
    images, annotations = [], []
    for image_index in range(num_images):
        canvas = _background(np_rng, height, width)
        shapes = []  # (label, polygon, full mask) in drawing order, later ones on top
        for _ in range(rng.randint(1, max_shapes)):
            label = rng.randrange(num_classes)
            polygon = _shape_polygon(SHAPE_KINDS[label % 3], rng, height, width)
            # Rasterise with pycocotools so the image agrees exactly with the decoded annotation.
            full = mask_util.decode(mask_util.merge(mask_util.frPyObjects([polygon], height, width))).astype(bool)
            colour = np.clip(np.array(_PALETTE[label]) + np_rng.normal(0, 15, size=3), 0, 255)
            canvas[full] = colour + np_rng.normal(0, 8, size=(int(full.sum()), 3))
            shapes.append((label, polygon, full))
        file_name = f"{image_index:06d}.{image_format}"
        _atomic_save_image(out_dir / "images" / file_name, Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)))
        image_id = image_index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        covered = np.zeros((height, width), dtype=bool)
        for label, polygon, full in reversed(shapes):  # top-most first, so `covered` = everything above
            visible = full & ~covered
            covered |= full
            if visible.sum() < min_area:
                continue
            rle = encode_mask(visible)
            occluded = not np.array_equal(visible, full)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "segmentation": rle if occluded or rng.random() >= polygon_fraction else [polygon],
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": categories}
    return write_coco_json(out_dir / "annotations.json", coco)


def split_coco(
    annotation_file: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Split a COCO file by image into `train.json` and `val.json` (same image folder, same categories).

    A seeded random `val_fraction` of the images (at least one, if there are two or more) goes to val.
    Files are written next to `annotation_file` unless `out_dir` is given. Returns (train_json, val_json).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    coco = load_coco_json(annotation_file)
    ids = sorted(img["id"] for img in coco["images"])
    random.Random(seed).shuffle(ids)
    num_val = max(1, round(len(ids) * val_fraction)) if len(ids) > 1 else 0
    val_ids = set(ids[:num_val])
    out_dir = Path(out_dir) if out_dir is not None else Path(annotation_file).parent
    paths = []
    for name, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        subset = {
            **{k: v for k, v in coco.items() if k not in ("images", "annotations")},
            "images": [img for img in coco["images"] if keep(img["id"])],
            "annotations": [ann for ann in coco["annotations"] if keep(ann["image_id"])],
        }
        paths.append(write_coco_json(out_dir / f"{name}.json", subset))
    return paths[0], paths[1]


def load_stardist_nuclei(wheel_or_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read the 2D nuclei image and its instance label map shipped in the stardist wheel.

    Args:
        wheel_or_dir: the downloaded wheel (`pip download stardist --no-deps -d DIR`), any zip with the
            same member layout, or a directory containing `stardist/data/images/` (extracted wheel or a
            site-packages folder) or the `stardist` package folder itself.

    Returns:
        (image uint16 [H, W], labels int32 [H, W]) with label 0 = background. The files are uncompressed
        TIFFs that PIL reads, so neither tifffile nor TensorFlow is needed.
    """
    source = Path(wheel_or_dir)
    arrays = []
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            names = set(archive.namelist())
            for member in (STARDIST_IMAGE_MEMBER, STARDIST_LABELS_MEMBER):
                if member not in names:
                    raise FileNotFoundError(f"{source}: no member {member} (is this the stardist wheel?)")
                with Image.open(io.BytesIO(archive.read(member))) as img:
                    arrays.append(np.array(img))
    elif source.is_dir():
        for member in (STARDIST_IMAGE_MEMBER, STARDIST_LABELS_MEMBER):
            candidates = [source / member, source / member.removeprefix("stardist/")]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(f"{source}: none of {[str(c) for c in candidates]} exists")
            with Image.open(found) as img:
                arrays.append(np.array(img))
    else:
        raise FileNotFoundError(f"stardist wheel or directory not found: {source}")
    image, labels = arrays
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"{source}: expected 2D image and labels of equal shape, got {image.shape} and {labels.shape}")
    return image.astype(np.uint16), labels.astype(np.int32)


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """Percentile-normalise a single-channel image to uint8 and repeat it to RGB [H, W, 3]."""
    lo, hi = np.percentile(image, (1, 99.8))
    scaled = np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((scaled * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def _tile_coco(
    rgb: np.ndarray,
    labels: np.ndarray,
    x_range: tuple[int, int],
    tile: int,
    min_area: int,
    image_dir: Path,
    prefix: str,
) -> dict:
    """COCO dict of the non-overlapping tiles whose columns lie in `x_range`; writes the tile images."""
    images, annotations = [], []
    height = labels.shape[0]
    for y0 in range(0, height - tile + 1, tile):
        for x0 in range(x_range[0], x_range[1] - tile + 1, tile):
            tile_labels = labels[y0 : y0 + tile, x0 : x0 + tile]
            file_name = f"{prefix}_y{y0:04d}_x{x0:04d}.png"
            _atomic_save_image(image_dir / file_name, Image.fromarray(rgb[y0 : y0 + tile, x0 : x0 + tile]))
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "height": tile, "width": tile})
            for value in np.unique(tile_labels):
                mask = tile_labels == value
                # A nucleus cut by the tile border keeps its visible part unless that is a sliver.
                if value == 0 or mask.sum() < min_area:
                    continue
                rle = encode_mask(mask)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "segmentation": rle,
                        "area": float(mask_util.area(rle)),
                        "bbox": [float(v) for v in mask_util.toBbox(rle)],
                        "iscrowd": 0,
                    }
                )
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "nucleus"}]}


def make_nuclei_dataset(
    out_dir: str | os.PathLike,
    wheel_or_dir: str | os.PathLike,
    tile: int = 128,
    train_fraction: float = 0.75,
    min_area: int = 15,
) -> tuple[Path, Path]:
    """Cut the stardist nuclei image into non-overlapping `tile` x `tile` COCO tiles.

    The left `train_fraction` of the columns gives the train tiles, the rest the val tiles, so train and
    val never share pixels (columns that do not fill a whole tile are dropped). One category "nucleus";
    masks are RLE; fragments smaller than `min_area` pixels are dropped. Images go to `out_dir/images/`.

    Returns:
        (train_json, val_json) = (`out_dir/train.json`, `out_dir/val.json`).
    """
    image, labels = load_stardist_nuclei(wheel_or_dir)
    height, width = labels.shape
    split_x = int(round(width * train_fraction))
    if tile > height or tile > split_x or tile > width - split_x:
        raise ValueError(f"tile {tile} does not fit the {height}x{width} image split at column {split_x}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rgb = _to_rgb8(image)
    train = _tile_coco(rgb, labels, (0, split_x), tile, min_area, image_dir, "train")
    val = _tile_coco(rgb, labels, (split_x, width), tile, min_area, image_dir, "val")
    return write_coco_json(out_dir / "train.json", train), write_coco_json(out_dir / "val.json", val)


def moving_shapes_frames(
    num_frames: int, image_size: tuple[int, int] = (256, 256), num_shapes: int = 3, seed: int = 0
) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[int]]]:
    """A clip of the shapes of `make_shapes_dataset` (classes 0..2, one per kind, in turn) moving in straight lines
    and bouncing off the borders, over one textured background (fresh pixel noise per frame).

    Yields per frame `(image (H, W, 3) uint8, visible masks (H, W) bool, labels)`, one mask per shape in a fixed
    order (object `i` is mask `i` in every frame; later shapes are drawn on top of earlier ones).
    """
    height, width = image_size
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    background = _background(np_rng, height, width)
    labels = [index % len(SHAPE_KINDS) for index in range(num_shapes)]
    polygons = [np.reshape(_shape_polygon(SHAPE_KINDS[label], rng, height, width), (-1, 2)) for label in labels]
    polygons = [polygon - polygon.mean(0) for polygon in polygons]  # centred: moved by their centres below
    centres = np.array([[rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height] for _ in labels])
    speeds = np.array([[rng.uniform(-1, 1), rng.uniform(-1, 1)] for _ in labels]) * 0.02 * min(height, width)
    colours = [np.array(_PALETTE[label], dtype=float) for label in labels]
    for _ in range(num_frames):
        canvas = background + np_rng.normal(0, 6, size=background.shape)
        fulls = []
        for polygon, centre, colour in zip(polygons, centres, colours):
            points = (polygon + centre).reshape(-1).tolist()
            full = mask_util.decode(mask_util.merge(mask_util.frPyObjects([points], height, width))).astype(bool)
            canvas[full] = colour + np_rng.normal(0, 8, size=(int(full.sum()), 3))
            fulls.append(full)
        covered = np.zeros((height, width), dtype=bool)
        visible = []
        for full in reversed(fulls):
            visible.append(full & ~covered)
            covered |= full
        yield np.clip(canvas, 0, 255).astype(np.uint8), visible[::-1], labels
        centres += speeds
        for axis, size in ((0, width), (1, height)):  # bounce: keep the centres inside [15%, 85%] of the image
            out = (centres[:, axis] < 0.15 * size) | (centres[:, axis] > 0.85 * size)
            speeds[out, axis] *= -1
