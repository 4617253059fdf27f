"""Image processor for FastInst with the PIL/NumPy backend: resizes exactly like the official (detectron2) code."""

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict

from .image_processing_fastinst import FastInstImageProcessingMixin, FastInstImageProcessorKwargs


class FastInstImageProcessorPil(FastInstImageProcessingMixin, PilBackend):
    r"""
    FastInst image processor (PIL backend). uint8 images are resized with `PIL.Image.resize(..., BILINEAR)` on the
    RGB image, exactly as detectron2's `ResizeTransform`, so `pixel_values` match the official model input
    bit for bit. Float images are resized channel by channel in PIL's "F" mode.

    Returns `pixel_values` `(B, 3, H, W)` float32 (normalised, zero-padded bottom/right to a multiple of
    `size_divisor` and to the batch maximum) and `pixel_mask` `(B, H, W)` int64 (1 = real pixel). With
    `segmentation_maps` or `annotations`, also `mask_labels` (list of `(N_i, H, W)` float) and `class_labels`
    (list of `(N_i,)` long) at the `pixel_values` size.
    """

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """Resize a `(C, H, W)` array to `(size.height, size.width)` with PIL (default bilinear)."""
        resample = PILImageResampling.BILINEAR if resample is None else resample
        new_size = (size.width, size.height)  # PIL takes (width, height)
        if image.dtype == np.uint8 and image.shape[0] in (1, 3):
            pil_image = PIL.Image.fromarray(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1))
            resized = np.asarray(pil_image.resize(new_size, resample))
            return resized[None] if resized.ndim == 2 else np.moveaxis(resized, -1, 0)
        channels = [
            np.asarray(PIL.Image.fromarray(channel.astype(np.float32)).resize(new_size, resample)) for channel in image
        ]
        return np.stack(channels)

    def _resize_normalize_and_pad(
        self,
        images,
        resized_sizes,
        padded_size,
        resample,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        # Fuse rescale and normalisation into one float32 `(x - mean) / std` on 0-255 values, as upstream computes.
        scale = rescale_factor if do_rescale else 1.0
        mean = np.asarray(image_mean if do_normalize else 0.0, dtype=np.float64) / scale
        std = np.asarray(image_std if do_normalize else 1.0, dtype=np.float64) / scale
        mean = mean.astype(np.float32).reshape(-1, 1, 1)
        std = std.astype(np.float32).reshape(-1, 1, 1)
        pixel_values, pixel_mask = [], []
        for image, resized_size in zip(images, resized_sizes):
            if tuple(image.shape[-2:]) != resized_size:
                image = self.resize(image, SizeDict(height=resized_size[0], width=resized_size[1]), resample=resample)
            image = (image.astype(np.float32) - mean) / std
            padded = np.zeros((image.shape[0], *padded_size), dtype=np.float32)
            padded[:, : resized_size[0], : resized_size[1]] = image
            pixel_values.append(padded)
            mask = np.zeros(padded_size, dtype=np.int64)
            mask[: resized_size[0], : resized_size[1]] = 1
            pixel_mask.append(mask)
        return pixel_values, pixel_mask


__all__ = ["FastInstImageProcessorPil", "FastInstImageProcessorKwargs"]
