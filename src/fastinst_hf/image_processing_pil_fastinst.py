"""Image processor for FastInst with the PIL/NumPy backend: resizes exactly like the official (detectron2) code."""

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import Unpack

from .image_processing_fastinst import FastInstImageProcessingMixin, FastInstImageProcessorKwargs, get_padded_size


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

    valid_kwargs = FastInstImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    # ImageNet mean/std x 255 = [123.675, 116.28, 103.53] / [58.395, 57.12, 57.375] on 0-255 values, as upstream.
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 640, "longest_edge": 853}
    default_to_square = False
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    size_divisor = 32
    num_detections = 100
    do_reduce_labels = False
    model_input_names = ["pixel_values", "pixel_mask"]

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        instance_id_to_semantic_id: list[dict[int, int]] | dict[int, int] | None = None,
        annotations: list[dict] | dict | None = None,
        **kwargs: Unpack[FastInstImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        images (`ImageInput`):
            PIL images, numpy arrays or torch tensors (uint8, uint16 or 0-255 float), of any sizes.
        segmentation_maps (`ImageInput`, *optional*):
            Per image an `(H, W)` integer map of segment ids, converted to one binary mask per id.
        instance_id_to_semantic_id (`dict[int, int]` or a list of them, *optional*):
            Class of each segment id of `segmentation_maps`; without it the segment id is the class.
        annotations (`list[dict]`, *optional*):
            Per image `{"masks": (N, H, W) bool, "labels": (N,) int}` at the image size.
        """
        return super().preprocess(images, segmentation_maps, instance_id_to_semantic_id, annotations, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        instance_id_to_semantic_id,
        annotations,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | None = None,
        **kwargs,
    ) -> BatchFeature:
        images = self._check_and_convert_images(images, do_convert_rgb, input_data_format)
        images = [
            self.process_image(image, do_convert_rgb=False, input_data_format=ChannelDimension.LAST)
            for image in images
        ]
        targets = self._targets_to_masks(
            len(images),
            segmentation_maps,
            instance_id_to_semantic_id,
            annotations,
            kwargs.get("ignore_index"),
            kwargs.get("do_reduce_labels"),
        )
        return self._preprocess(images, targets=targets, **kwargs)

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """Resize a `(C, H, W)` array to `(size.height, size.width)` with PIL (default bilinear)."""
        resample = PILImageResampling.BILINEAR if resample is None else resample
        new_size = (size.width, size.height)  # PIL takes (width, height)
        if image.dtype == np.uint8 and image.shape[0] in (1, 3):
            pil_image = PIL.Image.fromarray(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1))
            resized = np.asarray(pil_image.resize(new_size, resample))
            return resized[None] if resized.ndim == 2 else np.moveaxis(resized, -1, 0)
        channels = [
            np.asarray(PIL.Image.fromarray(channel.astype(np.float32)).resize(new_size, resample))
            for channel in image
        ]
        return np.stack(channels)

    def _preprocess(
        self,
        images: list[np.ndarray],
        targets: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
        do_resize: bool,
        size: SizeDict,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        size_divisor: int,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        resized_sizes = [self._resized_size(h, w, size, do_resize) for h, w in original_sizes]
        padded_size = get_padded_size(resized_sizes, size_divisor)
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

        encoded = BatchFeature(
            data={"pixel_values": pixel_values, "pixel_mask": pixel_mask}, tensor_type=return_tensors
        )
        if targets is not None:
            # Lists, not a stacked tensor: the number of instances differs between images.
            encoded["mask_labels"] = [
                self._resize_and_pad_masks(masks, resized, padded_size, index, original)
                for index, (masks, resized, original) in enumerate(zip(targets[0], resized_sizes, original_sizes))
            ]
            encoded["class_labels"] = targets[1]
        return encoded


__all__ = ["FastInstImageProcessorPil"]
