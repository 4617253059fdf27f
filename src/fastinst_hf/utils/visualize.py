"""Draw instance masks over an image: semi-transparent colour fill, contour, and a "label score" tag per instance.

Sizes follow the image: the font height and the contour width grow with the shorter image side, so an overlay reads
the same at 256 and at 8000 pixels. Each tag sits on its instance (at the mask pixel farthest from the mask border)
and no two tags overlap; when the best spot is taken, the next-best pixel of the mask is tried, then spots around it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import distance_transform_edt

from .packed_masks import PackedMasks

# Font height = shorter image side / FONT_DIVISOR (at least MIN_FONT_SIZE); contour width likewise.
FONT_DIVISOR = 24
MIN_FONT_SIZE = 11
LINE_DIVISOR = 200
# Tag positions are searched on the mask downscaled to at most this many pixels per side (fast on huge images).
ANCHOR_GRID = 256
# Mask pixels tried per tag, from the farthest from the border inwards-out, before searching around the best one.
MAX_CANDIDATES = 200


@dataclass
class Tag:
    """A tag of one instance: its text and its box `(x0, y0, x1, y1)` in image pixels (x1, y1 exclusive)."""

    index: int
    text: str
    box: tuple[int, int, int, int]


def instance_colours(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct, saturated RGB colours (hues spaced by the golden ratio, so neighbours differ strongly)."""
    return [palette_colour(index) for index in range(count)]


def palette_colour(index: int) -> tuple[int, int, int]:
    """Colour number `index` of the golden-ratio hue sequence (a track keeps its colour: its id is the index)."""
    hue = (0.11 + index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (relative luminance, ITU-R BT.709 weights)."""
    luminance = 0.2126 * fill[0] + 0.7152 * fill[1] + 0.0722 * fill[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def overlay_sizes(height: int, width: int) -> tuple[int, int]:
    """(font size, contour width) in pixels for an image of that size."""
    short_side = min(height, width)
    return max(MIN_FONT_SIZE, round(short_side / FONT_DIVISOR)), max(2, round(short_side / LINE_DIVISOR))


def mask_contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of `mask` within `width` pixels of its boundary (the mask minus its `width`-step 4-neighbour erosion)."""
    eroded = mask.copy()
    for _ in range(width):
        # Outside the image counts as background, so masks touching the border get a contour there too.
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~eroded


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    """Row and column slices of the bounding box of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def tag_candidates(mask: np.ndarray) -> np.ndarray:
    """Up to MAX_CANDIDATES mask pixels `(x, y)` [K, 2], farthest from the mask border first.

    The distance transform runs on the bounding-box crop subsampled to at most ANCHOR_GRID pixels per side; when the
    mask has more pixels than MAX_CANDIDATES, evenly spaced ranks are kept so that the candidates spread over it.
    """
    rows, cols = _bbox(mask)
    step = max(1, -(-max(rows.stop - rows.start, cols.stop - cols.start) // ANCHOR_GRID))
    crop = np.pad(mask[rows, cols][::step, ::step], 1)  # padding: the bounding-box edge is a border too
    distance = distance_transform_edt(crop)[1:-1, 1:-1]
    ys, xs = np.nonzero(distance)
    order = np.argsort(-distance[ys, xs], kind="stable")
    order = order[np.linspace(0, len(order) - 1, min(len(order), MAX_CANDIDATES)).round().astype(int)]
    return np.stack([cols.start + xs[order] * step + step // 2, rows.start + ys[order] * step + step // 2], axis=1)


def _centred_box(x: int, y: int, size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A `size` (w, h) box centred on (x, y), shifted to lie inside `image_size` (w, h) where it fits."""
    w, h = size
    x0 = min(max(x - w // 2, 0), max(image_size[0] - w, 0))
    y0 = min(max(y - h // 2, 0), max(image_size[1] - h, 0))
    return x0, y0, x0 + w, y0 + h


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed)


def _free_box(candidates: np.ndarray, size, image_size, placed) -> tuple[int, int, int, int]:
    """The first box centred on a candidate that overlaps no placed box; else the nearest free box around the best
    candidate, searched ring by ring in steps of the box size; else (a full image) the box on the best candidate."""
    for x, y in candidates:
        box = _centred_box(int(x), int(y), size, image_size)
        if not _overlaps(box, placed):
            return box
    x, y = (int(v) for v in candidates[0])
    rings = max(image_size[0] // size[0], image_size[1] // size[1]) + 1
    for ring in range(1, rings + 1):
        for dy in range(-ring, ring + 1):
            for dx in range(-ring, ring + 1):
                if max(abs(dx), abs(dy)) == ring:
                    box = _centred_box(x + dx * size[0], y + dy * size[1], size, image_size)
                    if not _overlaps(box, placed):
                        return box
    return _centred_box(x, y, size, image_size)


def layout_tags(
    masks: np.ndarray,
    texts: Sequence[str],
    scores: Sequence[float],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> list[Tag]:
    """Place one tag per non-empty mask, most confident first, so that it lies on its mask and on no other tag.

    Args:
        masks: `(N, H, W)` bool masks.
        texts: `(N,)` tag texts.
        scores: `(N,)` scores; higher-scoring instances get the first pick of positions.
        font: the font the texts are drawn with (gives the box sizes).

    Returns:
        The tags in placement order; a box is the text box plus a padding of a fifth of the font height.
    """
    image_size = (masks.shape[2], masks.shape[1])
    placed: list[Tag] = []
    for index in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        mask = masks[index]
        if not mask.any():
            continue
        left, top, right, bottom = font.getbbox(texts[index])
        pad = max(2, (bottom - top) // 5)
        size = (right - left + 2 * pad, bottom - top + 2 * pad)
        box = _free_box(tag_candidates(mask), size, image_size, [tag.box for tag in placed])
        placed.append(Tag(int(index), texts[index], box))
    return placed


def _paint_masks(canvas: np.ndarray, masks: np.ndarray, scores, colours, alpha: float, line_width: int) -> None:
    """Fill and outline every mask on the uint8 canvas [H, W, 3] in place, lowest score first (best on top).

    Each fill is blended in float32 over the mask's pixels only and truncated back to uint8 (as the whole picture
    used to be once, at the end): a float canvas of a large image would cost 4x the image.
    """
    for index in np.argsort(np.asarray(scores, dtype=np.float64), kind="stable"):
        mask = masks[index]
        if not mask.any():
            continue
        # Work on the bounding box only: on large images the masks are small compared with the canvas.
        rows, cols = _bbox(mask)
        mask, region = mask[rows, cols], canvas[rows, cols]
        colour = np.asarray(colours[index], dtype=np.float32)
        region[mask] = (1 - alpha) * region[mask].astype(np.float32) + alpha * colour
        region[mask_contour(mask, line_width)] = colour


def draw_instances(
    image: Image.Image,
    masks: np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float],
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.45,
    track_ids: Sequence[int | None] | None = None,
) -> Image.Image:
    """Return an RGB copy of `image` with every instance drawn on it.

    Args:
        image: the original image (any PIL mode; converted to RGB).
        masks: `(N, H, W)` bool masks at the image size (an array, a tensor, or `PackedMasks`).
        labels: `(N,)` class ids, named through `id2label` (the id itself when absent).
        scores: `(N,)` scores; instances are painted from the lowest to the highest score so that the most confident
            one is on top where masks overlap.
        alpha: opacity of the mask fill.
        track_ids: `(N,)` track ids (None: untracked): each track gets the colour of its id and a "#id" tag prefix.
    """
    canvas = np.array(image.convert("RGB"))
    if not isinstance(masks, PackedMasks):  # packed masks stay packed: they are unpacked one at a time
        masks = np.asarray(masks, dtype=bool)
    if len(masks.shape) != 3 or tuple(masks.shape[1:]) != canvas.shape[:2]:
        raise ValueError(f"masks must be (N, {canvas.shape[0]}, {canvas.shape[1]}), got {masks.shape}")
    font_size, line_width = overlay_sizes(*canvas.shape[:2])
    colours = instance_colours(len(masks))
    if track_ids is not None:
        colours = [colour if tid is None else palette_colour(tid) for colour, tid in zip(colours, track_ids)]
    _paint_masks(canvas, masks, scores, colours, alpha, line_width)
    result = Image.fromarray(canvas)

    font = ImageFont.load_default(size=font_size)
    names = id2label or {}
    texts = [f"{names.get(int(label), str(label))} {float(score):.2f}" for label, score in zip(labels, scores)]
    if track_ids is not None:
        texts = [text if tid is None else f"#{tid} {text}" for text, tid in zip(texts, track_ids)]
    draw = ImageDraw.Draw(result)
    for tag in layout_tags(masks, texts, scores, font):
        fill = colours[tag.index]
        draw.rectangle((tag.box[0], tag.box[1], tag.box[2] - 1, tag.box[3] - 1), fill=fill)
        draw.text(
            ((tag.box[0] + tag.box[2]) / 2, (tag.box[1] + tag.box[3]) / 2), tag.text, text_colour(fill), font, "mm"
        )
    return result
