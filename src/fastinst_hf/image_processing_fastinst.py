"""Image processor for FastInst (torchvision backend) and the shared FastInst pre/post-processing logic.

Test-time preprocessing reproduces the official FastInst / detectron2 `DefaultPredictor` pipeline:
RGB uint8 -> `ResizeShortestEdge` (detectron2 rounding) with bilinear resampling -> `(x - mean) / std` on
0-255 values -> zero padding at the bottom/right to a multiple of `size_divisor` and to the batch maximum.

Post-processing reproduces the official `FastInst.instance_inference`, but selects the top-k
(query, class) pairs first and only upsamples the masks of the kept queries (on CPU, only the output tiles where
a mask pixel can be, see `mask_resizing_fastinst.py`), and the official `semantic_inference` and
`panoptic_inference`, on masks resized the same way.
"""

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.nn import functional as F
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import logging

from .mask_resizing_fastinst import MASK_STRIDE, iter_binary_masks, resize_mask_logits

logger = logging.get_logger(__name__)

# The mask logits of FastInst are predicted at stride 8 of the padded input.
PROCESSOR_CODE = {
    "torchvision": ("image_processing_fastinst", "FastInstImageProcessor"),
    "pil": ("image_processing_pil_fastinst", "FastInstImageProcessorPil"),
}


class FastInstImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to `32`):
        The padded height and width are rounded up to a multiple of this number (the backbone's output stride).
    num_detections (`int`, *optional*, defaults to `100`):
        Number of (query, class) pairs kept by the top-k of the instance post-processing (detectron2's
        `TEST.DETECTIONS_PER_IMAGE`).
    ignore_index (`int`, *optional*, defaults to `255`):
        Segment id of `segmentation_maps` that is not an instance (void, Mask2Former's convention); no mask is made
        for it. `None` makes a mask for every id.
    do_reduce_labels (`bool`, *optional*, defaults to `False`):
        Whether to map segment id 0 to `ignore_index` and subtract 1 from every other id of `segmentation_maps`
        (and from the classes of `instance_id_to_semantic_id`): drops a background labelled 0.
    duplicate_iou_threshold (`float`, *optional*, defaults to `None`):
        When set, the post-processing drops a (query, class) pair whose mask overlaps a higher-ranked pair of the
        same class with an IoU above it (see [`suppress_duplicates`]). `None` (the default) is the official,
        NMS-free inference; a small model that still masks some objects twice can set it in its processor config.
    """

    size_divisor: int
    num_detections: int
    ignore_index: int | None
    do_reduce_labels: bool
    duplicate_iou_threshold: float | None


def get_fastinst_output_image_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """
    detectron2's `ResizeShortestEdge.get_output_shape`: the short side becomes `shortest_edge` unless the long side
    would then exceed `longest_edge`, in which case the long side becomes `longest_edge`; sides are rounded with
    `int(x + 0.5)` (transformers' own helper floors, which gives other sizes).

    Returns:
        `tuple[int, int]`: the resized `(height, width)`, each at least 1.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"Image height and width must be positive, got ({height}, {width}).")
    # Same float operations and order as detectron2, so .5 ties round identically.
    scale = shortest_edge * 1.0 / min(height, width)
    if height < width:
        new_height, new_width = float(shortest_edge), scale * width
    else:
        new_height, new_width = scale * height, float(shortest_edge)
    if max(new_height, new_width) > longest_edge:
        scale = longest_edge * 1.0 / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    return max(int(new_height + 0.5), 1), max(int(new_width + 0.5), 1)


def get_padded_size(sizes: list[tuple[int, int]], size_divisor: int) -> tuple[int, int]:
    """Batch padded `(height, width)`: the largest height/width rounded up to a multiple of `size_divisor`."""
    height = max(size[0] for size in sizes)
    width = max(size[1] for size in sizes)
    if size_divisor and size_divisor > 1:
        height = -(-height // size_divisor) * size_divisor
        width = -(-width // size_divisor) * size_divisor
    return height, width


def _flatten_images(images: Any) -> list:
    """A single image, a list of images or a list of lists of images -> flat list (2-D grayscale arrays allowed)."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    return [images]


def _to_rgb_uint8_or_float(
    image: Any, index: int, do_convert_rgb: bool, input_data_format: ChannelDimension | str | None = None
) -> np.ndarray | torch.Tensor:
    """
    Bring one raw input image to channels-last `(H, W, 3)` with dtype uint8 or float (0-255 values).

    - PIL images are converted with `PIL.Image.convert("RGB")`, which is what detectron2's `read_image` does
      (grayscale -> 3 equal channels, RGBA -> alpha dropped, palette -> RGB).
    - numpy arrays / torch tensors may be `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in {1, 3, 4}: one channel is
      repeated, a fourth (alpha) channel is dropped. When both layouts fit (e.g. a `(3, 5, 3)` image) and
      `input_data_format` is not given, numpy arrays are read as channels-last and tensors as channels-first.
    - 16-bit images (PIL "I;16*" modes, uint16 arrays) are mapped to 8 bits with `round(x / 257)`, which maps
      0..65535 linearly onto 0..255 (exact for 8-bit data stored as 16 bits); so is a PIL "I" image whose values
      fit 0..65535. Other integer dtypes, other "I" images and the "F" mode have no defined range and are rejected.
    - float inputs are taken as 0-255 values (as upstream's float32 model input).
    """
    if isinstance(image, PIL.Image.Image):
        # Some PIL versions open 16-bit grayscale PNGs as mode "I": 0..65535 values are read as 16-bit data.
        if image.mode.startswith("I;16") or (
            image.mode == "I" and 0 <= min(image.getextrema()) <= max(image.getextrema()) <= 65535
        ):
            image = np.asarray(image).astype(np.uint16)
        elif image.mode in ("I", "F"):
            raise ValueError(
                f"Image {index}: PIL mode {image.mode!r} has no defined value range; convert it to an 8-bit 'RGB' "
                "or 'L' image (or a uint8 array) first."
            )
        else:
            return np.array(image.convert("RGB") if do_convert_rgb else image)

    is_torch = isinstance(image, torch.Tensor)
    if not is_torch and not isinstance(image, np.ndarray):
        raise TypeError(f"Image {index}: expected a PIL image, numpy array or torch tensor, got {type(image)}.")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(
            f"Image {index}: expected shape (H, W), (H, W, C) or (C, H, W) with C in (1, 3, 4), got "
            f"{tuple(image.shape)}."
        )
    if input_data_format is None:
        first, last = image.shape[0] in (1, 3, 4), image.shape[-1] in (1, 3, 4)
        if not (first or last):
            raise ValueError(
                f"Image {index}: expected 1, 3 or 4 channels in the first or last dimension, got shape "
                f"{tuple(image.shape)}."
            )
        channels_first = first and (is_torch or not last)
    else:
        channels_first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
    if channels_first:
        image = image.permute(1, 2, 0) if is_torch else np.moveaxis(image, 0, -1)

    dtype = str(image.dtype).replace("torch.", "")
    if dtype == "uint16":
        scaled = (image.to(torch.float32) if is_torch else image.astype(np.float32)) / 257.0
        image = scaled.round().to(torch.uint8) if is_torch else np.rint(scaled).astype(np.uint8)
    elif dtype.startswith(("float", "bfloat")):
        if (image.numel() if is_torch else image.size) and float(image.max()) <= 1.0:
            logger.warning_once(
                f"Image {index}: a float image with values in [0, 1]. FastInst processors read float images as "
                "0-255 values, like the official model input: multiply by 255 or pass uint8 images."
            )
    elif dtype != "uint8":
        raise ValueError(
            f"Image {index}: expected dtype uint8, uint16 or float (0-255 values), got {dtype}. Other integer "
            "types have no defined value range."
        )

    if do_convert_rgb:
        channels = image.shape[-1]
        if channels == 1:
            image = image.expand(-1, -1, 3) if is_torch else np.repeat(image, 3, axis=-1)
        elif channels == 4:
            image = image[..., :3]
    return image


def _masks_from_segmentation_map(
    segmentation_map: torch.Tensor,
    instance_id_to_semantic_id: dict[int, int] | None,
    ignore_index: int | None,
    do_reduce_labels: bool,
    index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(H, W)` map of segment ids -> `(N, H, W)` bool masks and `(N,)` long labels, segments in increasing id."""
    if do_reduce_labels:
        if ignore_index is None:
            raise ValueError("`do_reduce_labels=True` needs `ignore_index` to mark the former label 0.")
        segmentation_map = torch.where(segmentation_map == 0, ignore_index, segmentation_map - 1)
    segment_ids = torch.unique(segmentation_map)
    if ignore_index is not None:
        segment_ids = segment_ids[segment_ids != ignore_index]
    masks = segmentation_map[None] == segment_ids[:, None, None]
    if instance_id_to_semantic_id is None:
        return masks, segment_ids.long()
    labels = []
    for segment_id in segment_ids.tolist():
        key = segment_id + 1 if do_reduce_labels else segment_id
        if key not in instance_id_to_semantic_id:
            raise ValueError(
                f"Segmentation map {index}: instance id {key} is missing from `instance_id_to_semantic_id`."
            )
        label = instance_id_to_semantic_id[key]
        labels.append(label - 1 if do_reduce_labels else label)
    return masks, torch.tensor(labels, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------------------
# Above this many bytes of boolean masks per image, the painted map and the RLEs are made in two passes (scores
# first, then the masks again in score order) instead of holding every mask: bounded memory for huge targets.
MAX_MASK_BYTES = 1 << 30


def binary_mask_to_rle(mask: torch.Tensor | np.ndarray) -> list[int]:
    """
    Run-length encoding of a `(H, W)` binary mask in transformers' format: `[start, length, start, length, ...]` of
    the runs of ones in the row-major flattened mask, with 1-based starts.
    """
    pixels = torch.as_tensor(mask).flatten().bool()
    # With a 0 on both sides, the positions where the value changes alternate: run start, run end (1-based).
    padded = torch.cat([pixels.new_zeros(1), pixels, pixels.new_zeros(1)])
    bounds = torch.nonzero(padded[1:] != padded[:-1]).flatten() + 1
    bounds[1::2] -= bounds[::2]
    return bounds.tolist()


def select_top_detections(
    class_logits: torch.Tensor, num_detections: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    `(Q, K+1)` class logits of one image -> the top-`num_detections` (query, class) pairs by class probability
    ("no object" dropped) whose class score is `>= threshold`: `(N,)` class scores (descending), query indices and
    labels. The final score is class score x mask score <= class score, so the other pairs can never pass.
    """
    num_classes = class_logits.shape[-1] - 1
    class_probs = class_logits.softmax(-1)[:, :num_classes]
    class_scores, flat_indices = class_probs.flatten().topk(min(num_detections, class_probs.numel()), sorted=True)
    keep = class_scores >= threshold
    class_scores, flat_indices = class_scores[keep], flat_indices[keep]
    return class_scores, torch.div(flat_indices, num_classes, rounding_mode="floor"), flat_indices % num_classes


def suppress_duplicates(
    mask_logits: torch.Tensor,
    query_indices: torch.Tensor,
    labels: torch.Tensor,
    class_scores: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """
    `(N,)` bool keep-mask of (query, class) pairs: greedily by estimated final score, a pair is dropped when its mask
    has an IoU above `iou_threshold` with a kept pair of the same label. Masks and scores are estimated at the
    resolution of the `(Q, h, w)` stride-8 mask logits (probability > 0.5; class score x mean probability inside the
    mask): cheap, and enough to tell a duplicate.
    """
    probs = mask_logits[query_indices].flatten(1).sigmoid()
    masks = (probs > 0.5).float()
    areas = masks.sum(1)
    estimated_scores = class_scores * (probs * masks).sum(1) / (areas + 1e-6)
    intersections = masks @ masks.T
    ious = intersections / (areas[:, None] + areas[None] - intersections).clamp(min=1)
    duplicates = (ious > iou_threshold) & (labels[:, None] == labels[None])
    keep = torch.ones(len(query_indices), dtype=torch.bool, device=mask_logits.device)
    ranked = torch.argsort(estimated_scores, descending=True, stable=True)
    for position, i in enumerate(ranked.tolist()):
        if keep[i]:
            keep[ranked[position + 1 :]] &= ~duplicates[i, ranked[position + 1 :]]
    return keep


def instance_inference_single(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized_size: tuple[int, int],
    output_size: tuple[int, int],
    threshold: float,
    mask_threshold: float,
    num_detections: int,
    keep_masks: bool = True,
    mask_sink=None,
    duplicate_iou_threshold: float | None = None,
) -> dict[str, torch.Tensor]:
    """
    The official `FastInst.instance_inference` for one image (`(Q, K+1)` class logits, `(Q, h, w)` mask logits),
    computed on the kept (query, class) pairs only; see [`~FastInstImageProcessor.instance_inference`].

    With `keep_masks=False` the masks are not returned (only their `(N,)` pixel `areas`), so memory stays bounded
    by one chunk of masks; [`iter_instance_masks`] makes them again, or `mask_sink` takes them as they are made: it
    is called with each chunk's `(n, H, W)` bool masks of the distinct kept queries, in turn, and instance `i` has
    mask number `mask_indices[i]`. With `duplicate_iou_threshold`, duplicate pairs are dropped first
    ([`suppress_duplicates`]).
    """
    class_scores, query_indices, labels = select_top_detections(class_logits, num_detections, threshold)
    if duplicate_iou_threshold is not None:
        keep = suppress_duplicates(mask_logits, query_indices, labels, class_scores, duplicate_iou_threshold)
        class_scores, query_indices, labels = class_scores[keep], query_indices[keep], labels[keep]
    # A query can be kept with several classes: resize each distinct query's mask once.
    unique_queries, inverse = torch.unique(query_indices, return_inverse=True)
    mask_scores = class_scores.new_zeros(len(unique_queries))
    areas = torch.zeros(len(unique_queries), dtype=torch.long, device=mask_logits.device)
    chunks = []
    for start, masks, chunk_scores, chunk_areas in iter_binary_masks(
        mask_logits[unique_queries], resized_size, output_size, mask_threshold
    ):
        mask_scores[start : start + len(chunk_scores)] = chunk_scores
        areas[start : start + len(chunk_areas)] = chunk_areas
        if keep_masks:
            chunks.append(masks)
        if mask_sink is not None:
            mask_sink(masks)
    scores = class_scores * mask_scores[inverse]

    keep = scores >= threshold
    order = torch.argsort(scores[keep], descending=True, stable=True)
    picked = inverse[keep][order]
    result = {
        "scores": scores[keep][order],
        "class_scores": class_scores[keep][order],
        "labels": labels[keep][order],
        "query_indices": query_indices[keep][order],
        "areas": areas[picked],
        "mask_indices": picked,
    }
    if keep_masks:
        none = torch.zeros((0, *output_size), dtype=torch.bool, device=mask_logits.device)
        masks = chunks[0] if len(chunks) == 1 else torch.cat([none, *chunks])
        result["masks"] = masks[picked]
    return result


def iter_instance_masks(
    mask_logits: torch.Tensor, query_indices: torch.Tensor, resized_size, output_size, mask_threshold: float
):
    """Yields the `(H, W)` bool mask of each query of `query_indices` in turn (the masks of
    [`instance_inference_single`] made again, one chunk at a time)."""
    for _, masks, _, _ in iter_binary_masks(mask_logits[query_indices], resized_size, output_size, mask_threshold):
        yield from masks


def resolve_mask_sizes(
    batch_size: int,
    padded_size: tuple[int, int],
    target_sizes,
    image_sizes,
    resized_size_of,
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """
    Per image `(resized_size, output_size)`: the resized, unpadded model input size (from `image_sizes`, else
    `resized_size_of(*target_size)`, else the padded size) and the size the masks are returned at (the target size,
    else the resized size).
    """
    for name, sizes in (("target_sizes", target_sizes), ("image_sizes", image_sizes)):
        if sizes is not None and len(sizes) != batch_size:
            raise ValueError(f"Got {len(sizes)} `{name}` for a batch of {batch_size} predictions.")
    sizes = []
    for i in range(batch_size):
        target_size = None if target_sizes is None else tuple(int(s) for s in target_sizes[i])
        if image_sizes is not None:
            resized_size = tuple(int(s) for s in image_sizes[i])
        elif target_size is not None:
            resized_size = resized_size_of(*target_size)
        else:
            resized_size = padded_size
        if resized_size[0] > padded_size[0] or resized_size[1] > padded_size[1]:
            raise ValueError(
                f"Image {i}: resized size {resized_size} exceeds the padded input size {padded_size} "
                f"(mask logits {padded_size[0] // MASK_STRIDE, padded_size[1] // MASK_STRIDE} x {MASK_STRIDE}); "
                "pass the right `image_sizes`."
            )
        sizes.append((resized_size, target_size if target_size is not None else resized_size))
    return sizes


def check_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            "Expected `class_queries_logits` of shape (B, Q, K+1) and `masks_queries_logits` of shape "
            f"(B, Q, h, w), got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}."
        )


def paint_segmentation(indexed_masks, output_size: tuple[int, int], device=None) -> torch.Tensor:
    """
    `(H, W)` int32 map of instance ids, -1 where no instance. `indexed_masks` yields `(index, (H, W) bool mask)`
    from the lowest-scoring instance to the highest, so that the highest-scoring one owns overlapping pixels.
    """
    segmentation = torch.full(output_size, -1, dtype=torch.int32, device=device)
    for index, mask in indexed_masks:
        segmentation.masked_fill_(mask, index)
    return segmentation


def paint_masks(masks: torch.Tensor, mask_indices: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """
    [`paint_segmentation`] in one pass over `(U, H, W)` bool masks (overwritten): segment `i`, by descending score,
    has mask `mask_indices[i]`; a mask kept with several labels shows its best segment.
    """
    count = len(mask_indices)
    if not 0 < count < 256:
        indexed = ((index, masks[mask_indices[index]]) for index in range(count - 1, -1, -1))
        return paint_segmentation(indexed, output_size, masks.device)
    # Weight count - i for segment i (each mask: its best segment's): the largest weight covering a pixel is the best.
    ranks = torch.arange(count, 0, -1, device=masks.device)
    weights = torch.zeros(len(masks), dtype=torch.long, device=masks.device)
    weights.scatter_reduce_(0, mask_indices, ranks, "amax")
    best = masks.view(torch.uint8).mul_(weights.to(torch.uint8)[:, None, None]).amax(0)
    return torch.where(best > 0, count - best.int(), -1)


def post_process_instances_single(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized_size: tuple[int, int],
    output_size: tuple[int, int],
    threshold: float,
    mask_threshold: float,
    num_detections: int,
    return_coco_annotation: bool,
    return_binary_maps: bool,
    duplicate_iou_threshold: float | None = None,
) -> dict:
    """One image of [`~FastInstImageProcessor.post_process_instance_segmentation`] (same arguments)."""
    num_masks = min(num_detections, class_logits.shape[0])
    two_passes = not return_binary_maps and num_masks * output_size[0] * output_size[1] > MAX_MASK_BYTES
    # The painted map needs each distinct mask once (taken as made), the binary maps and RLEs one per segment.
    painted = not (two_passes or return_binary_maps or return_coco_annotation)
    chunks = []
    args = (resized_size, output_size, threshold, mask_threshold, num_detections)
    keep_masks = not (two_passes or painted)
    instance = instance_inference_single(
        class_logits,
        mask_logits,
        *args,
        keep_masks=keep_masks,
        mask_sink=chunks.append if painted else None,
        duplicate_iou_threshold=duplicate_iou_threshold,
    )
    non_empty = instance["areas"] > 0
    scores, labels = instance["scores"][non_empty].tolist(), instance["labels"][non_empty].tolist()
    segments_info = [
        {"id": index, "label_id": label, "was_fused": False, "score": score}
        for index, (label, score) in enumerate(zip(labels, scores))
    ]
    if two_passes:
        queries = instance["query_indices"][non_empty]
        if return_coco_annotation:
            segmentation = [
                binary_mask_to_rle(mask)
                for mask in iter_instance_masks(mask_logits, queries, resized_size, output_size, mask_threshold)
            ]
        else:
            lowest_first = iter_instance_masks(mask_logits, queries.flip(0), resized_size, output_size, mask_threshold)
            indexed = zip(range(len(queries) - 1, -1, -1), lowest_first)
            segmentation = paint_segmentation(indexed, output_size, mask_logits.device)
        return {"segmentation": segmentation, "segments_info": segments_info}
    if painted:
        none = torch.zeros((0, *output_size), dtype=torch.bool, device=mask_logits.device)
        masks = chunks[0] if len(chunks) == 1 else torch.cat([none, *chunks])
        segmentation = paint_masks(masks, instance["mask_indices"][non_empty], output_size)
        return {"segmentation": segmentation, "segments_info": segments_info}

    masks = instance["masks"]
    masks = masks if non_empty.all() else masks[non_empty]  # avoids copying the masks in the common case
    if return_binary_maps:
        segmentation = masks
    else:
        segmentation = [binary_mask_to_rle(mask) for mask in masks]
    return {"segmentation": segmentation, "segments_info": segments_info}


def semantic_scores_single(class_logits, mask_logits, resized_size, output_size) -> torch.Tensor:
    """
    The official `FastInst.semantic_inference` for one image: `(K, H, W)` class scores
    `sum_q softmax(class_logits)[q, k] * sigmoid(mask_q)` ("no object" dropped), the masks resized as the official
    inference resizes them ([`resize_mask_logits`]) before the sigmoid.
    """
    mask_probs = resize_mask_logits(mask_logits.float(), resized_size, output_size).sigmoid()
    class_probs = class_logits.float().softmax(-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", class_probs, mask_probs)


def panoptic_inference_single(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized_size: tuple[int, int],
    output_size: tuple[int, int],
    threshold: float,
    mask_threshold: float,
    overlap_mask_area_threshold: float,
    label_ids_to_fuse: set[int],
) -> dict:
    """
    The official `FastInst.panoptic_inference` for one image: the queries whose best class (not "no object") has a
    probability `> threshold` compete for each pixel by `score * sigmoid(mask)`; a query keeps the pixels it wins
    where its own probability is `>= mask_threshold`, unless it wins less than `overlap_mask_area_threshold` of its
    own mask. The segments of a label in `label_ids_to_fuse` share one id (the official code fuses "stuff" labels).
    Returns `{"segmentation": (H, W) int32 segment ids (0 = none), "segments_info": [...]}`.
    """
    scores, labels = class_logits.float().softmax(-1).max(-1)
    keep = labels.ne(class_logits.shape[-1] - 1) & (scores > threshold)
    scores, labels = scores[keep], labels[keep]
    segmentation = torch.zeros(output_size, dtype=torch.int32, device=mask_logits.device)
    segments_info = []
    if not keep.any():
        return {"segmentation": segmentation, "segments_info": segments_info}
    mask_probs = resize_mask_logits(mask_logits[keep].float(), resized_size, output_size).sigmoid()
    owners = (scores[:, None, None] * mask_probs).argmax(0)
    fused_ids = {}
    for k, (label, score) in enumerate(zip(labels.tolist(), scores.tolist())):
        won, own = owners == k, mask_probs[k] >= mask_threshold
        won_area, own_area = int(won.sum()), int(own.sum())
        mask = won & own
        if won_area == 0 or own_area == 0 or not mask.any() or won_area / own_area < overlap_mask_area_threshold:
            continue
        if label in fused_ids:
            segmentation[mask] = fused_ids[label]
            continue
        segment_id = len(segments_info) + 1
        if label in label_ids_to_fuse:
            fused_ids[label] = segment_id
        segmentation[mask] = segment_id
        segments_info.append(
            {"id": segment_id, "label_id": label, "was_fused": label in label_ids_to_fuse, "score": score}
        )
    return {"segmentation": segmentation, "segments_info": segments_info}


def packed_instances_single(
    class_logits, mask_logits, resized_size, output_size, threshold, mask_threshold, num_detections, duplicate_iou
) -> dict:
    """One image of `post_process_instance_segmentation(..., return_packed_masks=True)`: each distinct query's mask
    made once and bit-packed as it is made (never all of them as bytes)."""
    packed = []

    def pack(masks):
        packed.extend(np.packbits(mask.cpu().numpy()) for mask in masks)

    args = (resized_size, output_size, threshold, mask_threshold, num_detections)
    instance = instance_inference_single(
        class_logits, mask_logits, *args, keep_masks=False, mask_sink=pack, duplicate_iou_threshold=duplicate_iou
    )
    non_empty = instance["areas"] > 0
    scores, labels = instance["scores"][non_empty].tolist(), instance["labels"][non_empty].tolist()
    segments_info = [
        {"id": index, "label_id": label, "was_fused": False, "score": score}
        for index, (label, score) in enumerate(zip(labels, scores))
    ]
    return {
        "segmentation": [packed[i] for i in instance["mask_indices"][non_empty].tolist()],
        "segments_info": segments_info,
    }


class FastInstImageProcessingMixin:
    """Backend-independent parts of the FastInst image processors: input checks, targets and post-processing."""

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
    ignore_index = 255
    duplicate_iou_threshold = None
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
        # Only the torchvision backend takes a device.
        device = {"device": kwargs["device"]} if kwargs.get("device") is not None else {}
        images = [
            self.process_image(image, do_convert_rgb=False, input_data_format=ChannelDimension.LAST, **device)
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, plus the code files (with the modules they import) and an `auto_map` offering each backend whose code is at hand, so that
        the folder loads with `trust_remote_code=True` where fastinst_hf is not installed
        (`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="pil")` for the exact PIL resize).
        The mapping is also kept in memory, so a reloaded processor has the same `to_dict()`.
        """
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        backends = {}
        for backend, (module, class_name) in PROCESSOR_CODE.items():
            source = Path(__file__).with_name(f"{module}.py")
            # Under remote code only the modules that were loaded sit in the cache beside this file.
            if source.is_file():
                for code_file in [source, *map(Path, get_relative_import_files(source))]:
                    target = folder / code_file.name
                    if not target.exists() or not target.samefile(code_file):
                        shutil.copyfile(code_file, target)
                backends[backend] = f"{module}.{class_name}"
        self.auto_map = {"AutoImageProcessor": backends}
        config_file = folder / "preprocessor_config.json"
        temporary = config_file.with_name(config_file.name + ".tmp")
        temporary.write_text(self.to_json_string())
        temporary.replace(config_file)
        return saved

    def _preprocess(
        self,
        images: list,
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
        """Resize (detectron2 sizes), normalise and pad each image (the backend's `_resize_normalize_and_pad`), then
        bring the training targets to the padded size."""
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        resized_sizes = [self._resized_size(h, w, size, do_resize) for h, w in original_sizes]
        padded_size = get_padded_size(resized_sizes, size_divisor)
        pixel_values, pixel_mask = self._resize_normalize_and_pad(
            images,
            resized_sizes,
            padded_size,
            resample,
            do_rescale,
            rescale_factor,
            do_normalize,
            image_mean,
            image_std,
        )
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

    def _check_and_convert_images(
        self, images: ImageInput, do_convert_rgb: bool, input_data_format: ChannelDimension | str | None
    ) -> list:
        images = _flatten_images(self.fetch_images(images))
        return [
            _to_rgb_uint8_or_float(image, index, do_convert_rgb, input_data_format)
            for index, image in enumerate(images)
        ]

    def _targets_to_masks(
        self,
        num_images: int,
        segmentation_maps: ImageInput | None,
        instance_id_to_semantic_id: list[dict[int, int]] | dict[int, int] | None,
        annotations: list[dict] | None,
        ignore_index: int | None,
        do_reduce_labels: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Per image `(N_i, H, W)` bool masks at the input image size and `(N_i,)` long labels, or None."""
        if segmentation_maps is not None and annotations is not None:
            raise ValueError("Pass either `segmentation_maps` or `annotations`, not both.")
        if segmentation_maps is None and annotations is None:
            return None
        masks_list, labels_list = [], []
        if annotations is not None:
            if isinstance(annotations, dict):
                annotations = [annotations]
            if len(annotations) != num_images:
                raise ValueError(f"Got {num_images} images but {len(annotations)} annotations.")
            for index, annotation in enumerate(annotations):
                if "masks" not in annotation or "labels" not in annotation:
                    raise ValueError(f"Annotation {index}: expected keys 'masks' (N, H, W) and 'labels' (N,).")
                masks = annotation["masks"]
                masks = masks if torch.is_tensor(masks) else torch.from_numpy(np.asarray(masks))
                labels = torch.as_tensor(annotation["labels"]).long().reshape(-1)
                if masks.ndim != 3 or masks.shape[0] != labels.shape[0]:
                    raise ValueError(
                        f"Annotation {index}: expected 'masks' of shape (N, H, W) and 'labels' of shape (N,), got "
                        f"{tuple(masks.shape)} and {tuple(labels.shape)}."
                    )
                masks_list.append(masks.bool())
                labels_list.append(labels)
            return masks_list, labels_list

        if not isinstance(segmentation_maps, (list, tuple)):
            segmentation_maps = [segmentation_maps]
        if len(segmentation_maps) != num_images:
            raise ValueError(f"Got {num_images} images but {len(segmentation_maps)} segmentation maps.")
        for index, segmentation_map in enumerate(segmentation_maps):
            segmentation_map = torch.as_tensor(np.asarray(segmentation_map))
            if segmentation_map.ndim == 3 and segmentation_map.shape[0] == 1:  # (1, H, W)
                segmentation_map = segmentation_map[0]
            elif segmentation_map.ndim == 3 and segmentation_map.shape[-1] == 1:  # (H, W, 1)
                segmentation_map = segmentation_map[..., 0]
            if segmentation_map.ndim != 2 or segmentation_map.is_floating_point():
                raise ValueError(
                    f"Segmentation map {index}: expected an integer (H, W) map of segment ids, got shape "
                    f"{tuple(segmentation_map.shape)} and dtype {segmentation_map.dtype}."
                )
            mapping = (
                instance_id_to_semantic_id[index]
                if isinstance(instance_id_to_semantic_id, (list, tuple))
                else instance_id_to_semantic_id
            )
            masks, labels = _masks_from_segmentation_map(
                segmentation_map.long(), mapping, ignore_index, do_reduce_labels, index
            )
            masks_list.append(masks)
            labels_list.append(labels)
        return masks_list, labels_list

    @staticmethod
    def _resize_and_pad_masks(
        masks: torch.Tensor,
        resized_size: tuple[int, int],
        padded_size: tuple[int, int],
        index: int,
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """`(N, H, W)` bool -> `(N, *padded_size)` float: PIL nearest resize (as detectron2), zero padding."""
        if tuple(masks.shape[-2:]) != tuple(image_size):
            raise ValueError(
                f"Image {index}: masks have size {tuple(masks.shape[-2:])} but the image is {tuple(image_size)}."
            )
        out = torch.zeros((masks.shape[0], *padded_size), dtype=torch.float32)
        # PIL's NEAREST uses fixed-point source coordinates that no torch mode reproduces exactly: use PIL itself.
        for mask_index, mask in enumerate(masks.to(torch.uint8).cpu().numpy()):
            resized = PIL.Image.fromarray(mask).resize(resized_size[::-1], PIL.Image.Resampling.NEAREST)
            out[mask_index, : resized_size[0], : resized_size[1]] = torch.from_numpy(np.array(resized))
        return out

    def _resized_size(self, height: int, width: int, size: SizeDict, do_resize: bool) -> tuple[int, int]:
        """`size` is `{"shortest_edge", "longest_edge"}` (detectron2's resize, as upstream) or `{"height", "width"}`
        (a fixed size, as the transformers example scripts pass)."""
        if not do_resize:
            return height, width
        if size.height and size.width:
            return size.height, size.width
        if not (size.shortest_edge and size.longest_edge):
            raise ValueError(
                f"`size` must contain 'shortest_edge' and 'longest_edge', or 'height' and 'width', got {size}."
            )
        return get_fastinst_output_image_size(height, width, size.shortest_edge, size.longest_edge)

    def instance_inference(
        self,
        outputs,
        threshold: float = 0.0,
        mask_threshold: float = 0.5,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        num_detections: int | None = None,
        image_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """
        The official `FastInst.instance_inference`, computed on the kept (query, class) pairs only.

        Per image: softmax over the K+1 classes, drop "no object", top-`num_detections` over the flattened Q*K class
        scores (query = index // K, label = index % K), drop pairs whose class score is below `threshold` (the final
        score is class score x mask score <= class score), then for the distinct kept queries only: bilinear
        upsampling (align_corners=False) of the mask logits to the padded input size (mask size x 8), crop to the
        resized image, bilinear resize to the target size, `mask = sigmoid > mask_threshold`,
        `score = class_score * sum(p * mask) / (sum(mask) + 1e-6)`, then keep `score >= threshold`. A processor
        with `duplicate_iou_threshold` set first drops duplicate pairs (see [`suppress_duplicates`]).

        Args:
            outputs: model output with `class_queries_logits` `(B, Q, K+1)` and `masks_queries_logits`
                `(B, Q, h, w)` (logits at stride 8 of the padded input), and optionally `image_sizes`.
            threshold: minimum final score. 0 keeps every top-k pair, as upstream.
            mask_threshold: probability above which a pixel belongs to the mask (upstream: 0.5).
            target_sizes: `(B, 2)` final `(height, width)` per image (usually the original image size).
            num_detections: top-k size; defaults to `self.num_detections` (upstream: 100).
            image_sizes: `(B, 2)` resized, unpadded `(height, width)` per image (the model input before padding).
                Taken from `outputs.image_sizes` when absent; otherwise recomputed from `target_sizes` with the
                detectron2 resize rule and `self.size` (valid when the target size is the original image size).
                Without both, masks are returned at the padded input size.

        Returns:
            `list[dict]`, one per image, sorted by descending `scores`, with `scores` `(N,)`, `class_scores` `(N,)`,
            `labels` `(N,)` long, `query_indices` `(N,)` long and `masks` `(N, H, W)` bool at the target size.
        """
        # in float32 whatever the model's dtype (thresholds on probabilities, mask areas)
        class_logits, mask_logits = outputs.class_queries_logits.float(), outputs.masks_queries_logits.float()
        check_logits(class_logits, mask_logits)
        num_detections = self.num_detections if num_detections is None else num_detections
        results = []
        for i, (resized_size, output_size) in enumerate(self._mask_sizes(outputs, target_sizes, image_sizes)):
            result = instance_inference_single(
                class_logits[i],
                mask_logits[i],
                resized_size,
                output_size,
                threshold,
                mask_threshold,
                num_detections,
                duplicate_iou_threshold=self.duplicate_iou_threshold,
            )
            del result["areas"], result["mask_indices"]
            results.append(result)
        return results

    def _mask_sizes(self, outputs, target_sizes, image_sizes) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per image `(resized_size, output_size)`, see [`resolve_mask_sizes`]."""
        mask_logits = outputs.masks_queries_logits
        return resolve_mask_sizes(
            mask_logits.shape[0],
            (mask_logits.shape[-2] * MASK_STRIDE, mask_logits.shape[-1] * MASK_STRIDE),
            target_sizes,
            getattr(outputs, "image_sizes", None) if image_sizes is None else image_sizes,
            lambda height, width: self._resized_size(height, width, self.size, self.do_resize),
        )

    def post_process_instance_segmentation(
        self,
        outputs,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool | None = False,
        return_binary_maps: bool | None = False,
        num_detections: int | None = None,
        image_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        return_packed_masks: bool = False,
    ) -> list[dict]:
        """
        Converts [`FastInstForInstanceSegmentation`] outputs into instance segmentation predictions, in the format of
        `Mask2FormerImageProcessor.post_process_instance_segmentation`. The instances are those of the official
        FastInst inference (see [`~FastInstImageProcessor.instance_inference`]) with a final score `>= threshold`
        and a non-empty mask.

        Args:
            outputs: model output with `class_queries_logits` `(B, Q, K+1)` and `masks_queries_logits` `(B, Q, h, w)`.
            threshold (`float`, defaults to 0.5): minimum final score (class score x mask score).
            mask_threshold (`float`, defaults to 0.5): probability threshold that binarises the masks.
            overlap_mask_area_threshold (`float`): accepted for Mask2Former compatibility; unused, because FastInst
                instances are independent masks (no panoptic merging).
            target_sizes (`(B, 2)`, *optional*): final `(height, width)` per image, normally the original size.
            return_coco_annotation (`bool`): return `segmentation` as a list with one run-length encoding per
                instance (transformers' `binary_mask_to_rle` format), in `segments_info` order.
            return_binary_maps (`bool`): return `segmentation` as the `(N, H, W)` binary masks (overlaps kept),
                in `segments_info` order; `(0, H, W)` when nothing is found.
            num_detections (`int`, *optional*): top-k size, defaults to `self.num_detections` (100).
            image_sizes (`(B, 2)`, *optional*): resized, unpadded `(height, width)` per image; see
                [`~FastInstImageProcessor.instance_inference`] for how it is inferred when absent.
            return_packed_masks (`bool`): return `segmentation` as a list with each instance's `(H, W)` bool mask
                bit-packed (`np.packbits` of the flattened mask), in `segments_info` order; each mask is packed as
                it is made, so many instances of a large image fit in memory.

        Returns:
            `list[dict]`, one per image:
            - **segmentation** -- `(H, W)` int tensor of segment ids (-1 = no instance); where instances overlap,
              the higher-scoring one is on top. Or RLEs / binary maps as requested above.
            - **segments_info** -- list of `{"id", "label_id", "was_fused" (always False), "score"}`, by descending
              score; `id` is the index in this list.
        """
        if sum(map(bool, (return_coco_annotation, return_binary_maps, return_packed_masks))) > 1:
            raise ValueError("Set at most one of return_coco_annotation, return_binary_maps and return_packed_masks.")
        # in float32 whatever the model's dtype (thresholds on probabilities, mask areas)
        class_logits, mask_logits = outputs.class_queries_logits.float(), outputs.masks_queries_logits.float()
        check_logits(class_logits, mask_logits)
        num_detections = self.num_detections if num_detections is None else num_detections
        sizes = self._mask_sizes(outputs, target_sizes, image_sizes)
        if return_packed_masks:
            args = (threshold, mask_threshold, num_detections, self.duplicate_iou_threshold)
            return [
                packed_instances_single(class_logits[i], mask_logits[i], *size, *args) for i, size in enumerate(sizes)
            ]
        return [
            post_process_instances_single(
                class_logits[i],
                mask_logits[i],
                resized_size,
                output_size,
                threshold,
                mask_threshold,
                num_detections,
                return_coco_annotation,
                return_binary_maps,
                self.duplicate_iou_threshold,
            )
            for i, (resized_size, output_size) in enumerate(sizes)
        ]

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
        image_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Converts [`FastInstForInstanceSegmentation`] outputs into semantic segmentation maps, in the format of
        `Mask2FormerImageProcessor.post_process_semantic_segmentation`, with the official FastInst
        `semantic_inference`: per pixel, the class `k` with the highest `sum_q class_prob[q, k] * mask_prob[q]`, the
        masks resized as the official inference resizes them (to the padded input size, cropped to the resized
        image, to the target size).

        Args:
            outputs: model output with `class_queries_logits` `(B, Q, K+1)` and `masks_queries_logits` `(B, Q, h, w)`.
            target_sizes (`(B, 2)`, *optional*): final `(height, width)` per image, normally the original size;
                without it, the maps are at the resized input size.
            return_segmentation_scores (`bool`): also return the `(K, H, W)` class scores.
            image_sizes (`(B, 2)`, *optional*): resized, unpadded `(height, width)` per image; see
                [`~FastInstImageProcessor.instance_inference`].

        Returns:
            `list[torch.Tensor]`: one `(H, W)` long map of class ids per image; with `return_segmentation_scores`,
            `SemanticSegmentationPostProcessorOutput`s with `segmentation` and `segmentation_scores`.
        """
        class_logits, mask_logits = outputs.class_queries_logits, outputs.masks_queries_logits
        check_logits(class_logits, mask_logits)
        results = []
        for i, sizes in enumerate(self._mask_sizes(outputs, target_sizes, image_sizes)):
            scores = semantic_scores_single(class_logits[i], mask_logits[i], *sizes)
            data = {"segmentation": scores.argmax(0), "segmentation_scores": scores}
            results.append(SemanticSegmentationPostProcessorOutput(data=data))
        return results if return_segmentation_scores else [result.segmentation for result in results]

    def post_process_panoptic_segmentation(
        self,
        outputs,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        image_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[dict]:
        """
        Converts [`FastInstForInstanceSegmentation`] outputs into panoptic segmentation predictions, in the format of
        `Mask2FormerImageProcessor.post_process_panoptic_segmentation`, with the official FastInst
        `panoptic_inference` (see [`panoptic_inference_single`]) on masks resized as the official inference resizes
        them. The defaults are the official test settings (`OBJECT_MASK_THRESHOLD` and `OVERLAP_THRESHOLD` 0.8).

        Args:
            outputs: model output with `class_queries_logits` `(B, Q, K+1)` and `masks_queries_logits` `(B, Q, h, w)`.
            threshold (`float`, defaults to 0.8): minimum class probability of a query's best class.
            mask_threshold (`float`, defaults to 0.5): probability from which a pixel belongs to a query's mask.
            overlap_mask_area_threshold (`float`, defaults to 0.8): a query whose mask keeps less than this fraction
                of its pixels after the competition gives no segment.
            label_ids_to_fuse (`set[int]`, *optional*): labels whose segments share a single id (e.g. "stuff"
                classes such as sky); none by default: the released FastInst models detect "thing" classes only.
            target_sizes (`(B, 2)`, *optional*): final `(height, width)` per image, normally the original size.
            image_sizes (`(B, 2)`, *optional*): resized, unpadded `(height, width)` per image; see
                [`~FastInstImageProcessor.instance_inference`].

        Returns:
            `list[dict]`, one per image:
            - **segmentation** -- `(H, W)` int32 tensor of segment ids, 0 where no segment is.
            - **segments_info** -- list of `{"id", "label_id", "was_fused", "score"}` (ids from 1, in query order;
              `score` is the class probability).
        """
        class_logits, mask_logits = outputs.class_queries_logits, outputs.masks_queries_logits
        check_logits(class_logits, mask_logits)
        label_ids_to_fuse = set() if label_ids_to_fuse is None else set(label_ids_to_fuse)
        settings = (threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse)
        return [
            panoptic_inference_single(class_logits[i], mask_logits[i], *sizes, *settings)
            for i, sizes in enumerate(self._mask_sizes(outputs, target_sizes, image_sizes))
        ]


class FastInstImageProcessor(FastInstImageProcessingMixin, TorchvisionBackend):
    r"""
    FastInst image processor (torchvision backend): the official test-time preprocessing and instance
    post-processing. Bilinear resizing of uint8 images uses torchvision's antialiased kernel, which follows PIL's
    filter up to rounding (max abs difference 1 gray level); use [`FastInstImageProcessorPil`] for an exact match of
    the official PIL resize.

    Returns `pixel_values` `(B, 3, H, W)` float32 (normalised, zero-padded bottom/right to a multiple of
    `size_divisor` and to the batch maximum) and `pixel_mask` `(B, H, W)` int64 (1 = real pixel). With
    `segmentation_maps` or `annotations`, also `mask_labels` (list of `(N_i, H, W)` float) and `class_labels`
    (list of `(N_i,)` long) at the `pixel_values` size.
    """

    def _fuse_mean_std_and_rescale_factor(
        self, do_normalize=None, image_mean=None, image_std=None, do_rescale=None, rescale_factor=None, device=None
    ) -> tuple:
        # Fuse in float64 so that the float32 constants equal upstream's 123.675 ... / 58.395 ... exactly
        # (the parent fuses in float32 and is off by one ulp, 2e-7 after normalisation).
        if do_rescale and do_normalize:
            image_mean = (torch.tensor(image_mean, dtype=torch.float64) / rescale_factor).to(device, torch.float32)
            image_std = (torch.tensor(image_std, dtype=torch.float64) / rescale_factor).to(device, torch.float32)
            do_rescale = False
        return image_mean, image_std, do_rescale

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
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pixel_values, pixel_mask = [], []
        for image, resized_size in zip(images, resized_sizes):
            if tuple(image.shape[-2:]) != resized_size:
                image = self.resize(image, SizeDict(height=resized_size[0], width=resized_size[1]), resample=resample)
            image = self.rescale_and_normalize(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            if not image.is_floating_point():
                image = image.float()
            pad = (0, padded_size[1] - resized_size[1], 0, padded_size[0] - resized_size[0])
            pixel_values.append(F.pad(image, pad, value=0.0))
            mask = torch.zeros(padded_size, dtype=torch.int64, device=image.device)
            mask[: resized_size[0], : resized_size[1]] = 1
            pixel_mask.append(mask)
        return pixel_values, pixel_mask


def image_processor_for_config(config) -> FastInstImageProcessor:
    """The image processor that matches a `FastInstConfig` (its test-time resize and number of detections)."""
    return FastInstImageProcessor(
        size={"shortest_edge": config.test_shortest_edge, "longest_edge": config.test_longest_edge},
        num_detections=config.num_detections,
    )


__all__ = ["FastInstImageProcessor", "image_processor_for_config"]
