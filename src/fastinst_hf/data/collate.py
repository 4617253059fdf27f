"""Collation of dataset items into FastInst model inputs (Mask2Former's input names)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


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
