"""The upstream training augmentation and the test-time resize, on numpy images and masks.

Every random choice comes from the `random.Random` passed in, which the datasets derive from (seed, epoch, index).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The processor's detectron2 ResizeShortestEdge rule, so training/evaluation sizes match inference exactly.
from ..image_processing_fastinst import get_fastinst_output_image_size
from .recipe import CROP_RESIZE_SHORT_EDGES, CROP_SIZE_RANGE, TRAIN_MAX_SIZE, TRAIN_SHORT_EDGES


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
