"""Overlays: tags on their instances and apart from each other, sizes that follow the image, readable text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from fastinst_hf import FastInstForInstanceSegmentation, FastInstImageProcessor
from fastinst_hf.inference.resolve import DEFAULT_MODEL_DIR, DEMO_IMAGE_DIR
from fastinst_hf.utils.visualize import draw_instances, layout_tags, mask_contour, overlay_sizes, text_colour

DEFAULT_THRESHOLD = 0.5  # `fastinst-hf predict --threshold`


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _assert_tags_apart_and_on_their_masks(masks: np.ndarray, tags) -> None:
    height, width = masks.shape[1:]
    for position, tag in enumerate(tags):
        x0, y0, x1, y1 = tag.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, f"{tag} leaves the {width}x{height} image"
        assert masks[tag.index, (y0 + y1) // 2, (x0 + x1) // 2], f"{tag} is not centred on its instance"
        for other in tags[position + 1 :]:
            assert not _boxes_overlap(tag.box, other.box), f"{tag} overlaps {other}"


@pytest.fixture(scope="module")
def demo_predictions():
    """(image, masks, labels, scores) of the embedded model on each bundled demo image, at the predict threshold."""
    torch.set_num_threads(1)
    model = FastInstForInstanceSegmentation.from_pretrained(DEFAULT_MODEL_DIR).eval()
    processor = FastInstImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    predictions = []
    for path in sorted(DEMO_IMAGE_DIR.glob("*.png")):
        image = Image.open(path).convert("RGB")
        with torch.inference_mode():
            outputs = model(**processor(images=[image], return_tensors="pt"))
        result = processor.post_process_instance_segmentation(
            outputs, threshold=DEFAULT_THRESHOLD, target_sizes=[(image.height, image.width)], return_binary_maps=True
        )[0]
        masks = result["segmentation"].numpy().astype(bool)
        infos = result["segments_info"]
        predictions.append((image, masks, [i["label_id"] for i in infos], [i["score"] for i in infos]))
    assert len(predictions) == 3
    return predictions


def test_demo_overlay_tags_sit_on_their_instances_without_overlapping(demo_predictions):
    id2label = FastInstForInstanceSegmentation.config_class.from_pretrained(DEFAULT_MODEL_DIR).id2label
    assert all("_" not in name for name in id2label.values()), f"class names carry an id suffix: {id2label}"
    for image, masks, labels, scores in demo_predictions:
        assert len(masks) > 0
        font = ImageFont.load_default(size=overlay_sizes(image.height, image.width)[0])
        texts = [f"{id2label[label]} {score:.2f}" for label, score in zip(labels, scores)]
        _assert_tags_apart_and_on_their_masks(masks, layout_tags(masks, texts, scores, font))
        overlay = draw_instances(image, masks, labels, scores, id2label)
        assert overlay.size == image.size and not np.array_equal(np.asarray(overlay), np.asarray(image))


def test_demo_overlay_text_height_and_contour_width_scale_with_the_image(demo_predictions):
    image, masks, labels, scores = demo_predictions[0]
    heights, contour_widths = [], []
    for factor in (1, 8):
        big = np.repeat(np.repeat(masks, factor, axis=1), factor, axis=2)
        font_size, line_width = overlay_sizes(*big.shape[1:])
        tags = layout_tags(big, ["rectangle 0.99"] * len(big), scores, ImageFont.load_default(size=font_size))
        _assert_tags_apart_and_on_their_masks(big, tags)
        heights.append(tags[0].box[3] - tags[0].box[1])
        contour = mask_contour(big[0], line_width)
        contour_widths.append(contour.sum() / mask_contour(big[0], 1).sum())
    assert 6 <= heights[1] / heights[0] <= 10, f"tag heights {heights} at 1x and 8x"
    assert contour_widths[1] >= 4 * contour_widths[0], f"contour widths {contour_widths} at 1x and 8x"


def test_crowded_identical_masks_still_get_separate_tags():
    masks = np.zeros((6, 120, 160), dtype=bool)
    masks[:, 40:80, 50:110] = True  # six stacked duplicates: only one best spot
    font = ImageFont.load_default(size=11)
    tags = layout_tags(masks, [f"ellipse 0.{k}" for k in range(6)], [0.9 - k / 10 for k in range(6)], font)
    assert [tag.index for tag in tags] == list(range(6))  # the most confident picks first
    for position, tag in enumerate(tags):
        assert all(not _boxes_overlap(tag.box, other.box) for other in tags[position + 1 :])
    assert masks[0, (tags[0].box[1] + tags[0].box[3]) // 2, (tags[0].box[0] + tags[0].box[2]) // 2]


def test_tag_text_contrasts_with_its_fill():
    assert text_colour((255, 230, 40)) == (0, 0, 0)
    assert text_colour((40, 40, 200)) == (255, 255, 255)


def test_empty_masks_get_no_tag():
    masks = np.zeros((2, 30, 30), dtype=bool)
    masks[1, 5:25, 5:25] = True
    tags = layout_tags(masks, ["a 0.9", "b 0.8"], [0.9, 0.8], ImageFont.load_default(size=11))
    assert [tag.index for tag in tags] == [1]
