"""Bit-packed instance masks, and `predict` giving exactly the processor's instances through them."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.conversion.official import save_converted
from fastinst_hf.image_processing_fastinst import image_processor_for_config
from fastinst_hf.inference.predictor import Predictor
from fastinst_hf.utils.packed_masks import PackedMasks


def test_packed_masks_round_trip_at_one_bit_per_pixel():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 37, 53)) > 0.5  # 37 x 53 is not a multiple of 8: the last byte is partial
    packed = PackedMasks(iter(masks), (37, 53))
    assert packed.shape == (3, 37, 53) and len(packed) == 3
    assert all(np.array_equal(a, b) for a, b in zip(packed, masks))
    assert np.array_equal(np.asarray(packed), masks) and packed[1].dtype == bool
    assert sum(p.nbytes for p in packed._packed) == 3 * -(-37 * 53 // 8)


@pytest.mark.parametrize("duplicate_iou_threshold", [None, 0.3])
def test_predict_returns_the_processors_instances(duplicate_iou_threshold, tmp_path):
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    processor = image_processor_for_config(model.config)
    processor.duplicate_iou_threshold = duplicate_iou_threshold
    save_converted(model, tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    result = Predictor(tmp_path / "model", device="cpu", threshold=0.0, runtime="eager").predict_image(image)
    masks, labels, scores = result.masks, result.labels, result.scores
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    expected = processor.post_process_instance_segmentation(
        outputs, threshold=0.0, target_sizes=[(70, 90)], return_binary_maps=True
    )[0]
    assert isinstance(masks, PackedMasks) and len(masks) == len(expected["segments_info"]) > 0
    assert np.array_equal(np.asarray(masks), expected["segmentation"].numpy())
    assert labels == [info["label_id"] for info in expected["segments_info"]]
    assert scores == pytest.approx([info["score"] for info in expected["segments_info"]], abs=1e-6)
