"""Draw instance masks over an image: semi-transparent colour fill, contour, and a "label score" tag per instance."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def instance_colours(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct, saturated RGB colours (hues spaced by the golden ratio, so neighbours differ strongly)."""
    colours = []
    for index in range(count):
        hue = (0.11 + index * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def mask_contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of `mask` within `width` pixels of its boundary (the mask minus its `width`-step 4-neighbour erosion)."""
    eroded = mask.copy()
    for _ in range(width):
        # Outside the image counts as background, so masks touching the border get a contour there too.
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~eroded


def _label_anchor(mask: np.ndarray) -> tuple[int, int]:
    """Top-left corner of the mask's bounding box (x, y)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min())


def draw_instances(
    image: Image.Image,
    masks: np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float],
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.45,
) -> Image.Image:
    """Return an RGB copy of `image` with every instance drawn on it.

    Args:
        image: the original image (any PIL mode; converted to RGB).
        masks: `(N, H, W)` bool masks at the image size.
        labels: `(N,)` class ids, named through `id2label` (the id itself when absent).
        scores: `(N,)` scores; instances are painted from the lowest to the highest score so that the most confident
            one is on top where masks overlap.
        alpha: opacity of the mask fill.
    """
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != canvas.shape[:2]:
        raise ValueError(f"masks must be (N, {canvas.shape[0]}, {canvas.shape[1]}), got {masks.shape}")
    colours = instance_colours(len(masks))
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    for index in order:
        colour = np.asarray(colours[index], dtype=np.float32)
        mask = masks[index]
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        canvas[mask_contour(mask)] = colour
    result = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))

    # Tags go on last so that no later fill covers them; the most confident tag is drawn last (on top).
    draw = ImageDraw.Draw(result)
    font = ImageFont.load_default()
    for index in order:
        if not masks[index].any():
            continue
        label = int(labels[index])
        name = id2label.get(label, str(label)) if id2label is not None else str(label)
        text = f"{name} {float(scores[index]):.2f}"
        x, y = _label_anchor(masks[index])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        # Keep the tag inside the image.
        x = min(max(x, 0), max(result.width - text_w - 4, 0))
        y = min(max(y, 0), max(result.height - text_h - 4, 0))
        draw.rectangle((x, y, x + text_w + 3, y + text_h + 3), fill=colours[index])
        draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0), font=font)
    return result
