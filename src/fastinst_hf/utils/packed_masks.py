"""Instance masks kept at one bit per pixel, unpacked one at a time (large images with many instances)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PackedMasks:
    """`(N, H, W)` bool masks stored bit-packed: N x H x W / 8 bytes instead of N x H x W.

    Indexing with an int unpacks one `(H, W)` bool mask; iteration unpacks them in turn. `np.asarray(packed)` gives
    the dense `(N, H, W)` array (what the bit-packing avoids for large images).
    """

    def __init__(self, masks: Iterator[np.ndarray], size: tuple[int, int]):
        self._packed = [np.packbits(np.asarray(mask, dtype=bool)) for mask in masks]
        self.shape = (len(self._packed), *size)

    @classmethod
    def from_packed(cls, packed: list[np.ndarray], size: tuple[int, int]) -> "PackedMasks":
        """From masks already packed with `np.packbits` (a list may hold the same array twice: not copied)."""
        masks = cls.__new__(cls)
        masks._packed, masks.shape = packed, (len(packed), *size)
        return masks

    def __len__(self) -> int:
        return len(self._packed)

    def __getitem__(self, index: int) -> np.ndarray:
        height, width = self.shape[1:]
        return np.unpackbits(self._packed[index], count=height * width).reshape(height, width).view(bool)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[index] for index in range(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=bool)
        for index, mask in enumerate(self):
            dense[index] = mask
        return dense if dtype is None else dense.astype(dtype)
