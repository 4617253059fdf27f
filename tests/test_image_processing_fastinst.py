"""Tests of FastInstImageProcessor / FastInstImageProcessorPil against the official FastInst fixtures."""

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FIXTURES, PIXEL_MEAN, PIXEL_STD, fixture_model_input, load_eval_fixture

from fastinst_hf import FastInstConfig
from fastinst_hf.image_processing_fastinst import FastInstImageProcessor, get_fastinst_output_image_size
from fastinst_hf.image_processing_pil_fastinst import FastInstImageProcessorPil

BACKENDS = (FastInstImageProcessor, FastInstImageProcessorPil)
# The fixtures were made with MIN_SIZE_TEST 256 / MAX_SIZE_TEST 400: 240x320 -> 256x341 -> padded 256x352.
FIXTURE_SIZE = {"shortest_edge": 256, "longest_edge": 400}
NUM_CLASSES = 80


@pytest.fixture(params=BACKENDS, ids=lambda cls: cls.__name__)
def processor_class(request):
    return request.param


def fixture_image(variant: str) -> np.ndarray:
    return np.load(FIXTURES / variant / "input_image_rgb_uint8.npy")


def unnormalise(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values * PIXEL_STD + PIXEL_MEAN


def detectron2_size(height, width, short, longest):
    """The rule as stated in the task: scale the short side, cap the long side, round with int(x + 0.5)."""
    scale = short / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


# ----------------------------------------------------------------------------------------------- preprocessing


def test_output_size_grid_matches_detectron2_rule():
    sides = [1, 2, 3, 7, 31, 100, 240, 320, 333, 480, 575, 576, 577, 640, 641, 777, 853, 1000, 1333, 3000]
    for short, longest in ((640, 853), (576, 777), (256, 400)):
        for height in sides:
            for width in sides:
                # detectron2 would produce a 0-pixel side (and fail in PIL) for e.g. 1x3000; we keep 1 pixel.
                expected = tuple(max(1, side) for side in detectron2_size(height, width, short, longest))
                assert get_fastinst_output_image_size(height, width, short, longest) == expected, (height, width)


@pytest.mark.parametrize(
    "shape, resized, padded",
    [((1, 1), (640, 640), (640, 640)), ((7, 3000), (2, 853), (32, 864)), ((3000, 7), (853, 2), (864, 32))],
)
def test_tiny_and_extreme_images(processor_class, shape, resized, padded):
    image = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    out = processor_class()(image, return_tensors="pt")
    assert tuple(out.pixel_values.shape) == (1, 3, *padded)
    assert tuple(out.pixel_mask.shape) == (1, *padded)
    assert out.pixel_mask[0].sum().item() == resized[0] * resized[1]
    assert out.pixel_mask[0, : resized[0], : resized[1]].all()
    assert (out.pixel_values[0][:, resized[0] :] == 0).all() and (out.pixel_values[0][:, :, resized[1] :] == 0).all()


def test_fixture_preprocessing_pil_backend_is_exact(variant):
    out = FastInstImageProcessorPil(size=FIXTURE_SIZE)(fixture_image(variant), return_tensors="pt")
    reference = load_eval_fixture(variant)["images_tensor"]
    assert torch.equal(out.pixel_values, reference)
    assert torch.equal(unnormalise(out.pixel_values)[0, :, :256, :341].round(), fixture_model_input(variant))
    assert out.pixel_mask[0].sum().item() == 256 * 341


def test_fixture_preprocessing_torchvision_backend_within_one_level(variant):
    out = FastInstImageProcessor(size=FIXTURE_SIZE)(fixture_image(variant), return_tensors="pt")
    resized = unnormalise(out.pixel_values)[0, :, :256, :341]
    # torchvision's antialiased uint8 bilinear follows PIL's filter but rounds differently: <= 1 gray level.
    assert (resized - fixture_model_input(variant)).abs().max().item() <= 1.0 + 1e-3
    assert (out.pixel_values[0, :, :, 341:] == 0).all()


def test_normalise_and_pad_equal_upstream_bitwise(processor_class, variant):
    """From the official resized model input (float 0-255), normalisation + padding equal `images_tensor` exactly."""
    out = processor_class(size=FIXTURE_SIZE)(fixture_model_input(variant), do_resize=False, return_tensors="pt")
    assert torch.equal(out.pixel_values, load_eval_fixture(variant)["images_tensor"])


def test_input_types_and_channel_conversions(processor_class):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(50, 70), dtype=np.uint8)
    processor = processor_class(size={"shortest_edge": 64, "longest_edge": 100})

    def pv(image):
        return processor(image, return_tensors="pt").pixel_values

    reference = pv(rgb)
    assert reference.shape == (1, 3, 64, 96)
    assert torch.equal(pv(PIL.Image.fromarray(rgb)), reference)
    assert torch.equal(pv(rgb.transpose(2, 0, 1).copy()), reference)
    assert torch.equal(pv(torch.from_numpy(rgb).permute(2, 0, 1)), reference)
    # RGBA: alpha is dropped (as PIL's convert("RGB") in detectron2's read_image), not blended.
    rgba = np.concatenate([rgb, np.zeros((50, 70, 1), np.uint8)], axis=-1)
    assert torch.equal(pv(rgba), reference)
    assert torch.equal(pv(PIL.Image.fromarray(rgba, mode="RGBA")), reference)
    # Grayscale: three equal channels.
    gray_rgb = pv(np.repeat(gray[..., None], 3, axis=-1))
    assert torch.equal(pv(gray), gray_rgb)
    assert torch.equal(pv(PIL.Image.fromarray(gray)), gray_rgb)
    # 16-bit: round(x / 257), exact for 8-bit data stored as 16 bits.
    assert torch.equal(pv(rgb.astype(np.uint16) * 257), reference)
    assert torch.equal(pv(PIL.Image.fromarray(gray.astype(np.uint16) * 257)), gray_rgb)


def test_input_errors_name_the_image(processor_class):
    processor = processor_class()
    good = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match=r"Image 1: expected dtype uint8, uint16 or float.*int32"):
        processor([good, np.zeros((10, 10, 3), np.int32)])
    # Mode "I" beyond the 16-bit range (within it, it is read as a 16-bit image).
    with pytest.raises(ValueError, match=r"Image 0: PIL mode 'I'"):
        processor(PIL.Image.fromarray(np.full((10, 10), 70000, np.int32), mode="I"))


def test_batch_of_different_sizes(processor_class):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((60, 80, 3), (90, 40, 3))]
    processor = processor_class(size={"shortest_edge": 64, "longest_edge": 128})
    out = processor(images, return_tensors="pt")
    # 60x80 -> 64x85; 90x40 -> 128x57 (long side capped); padded to max then to multiples of 32.
    assert tuple(out.pixel_values.shape) == (2, 3, 128, 96)
    for index, (height, width) in enumerate([(64, 85), (128, 57)]):
        single = processor(images[index], return_tensors="pt")
        assert out.pixel_mask[index].sum().item() == height * width
        assert torch.equal(out.pixel_values[index, :, :height, :width], single.pixel_values[0, :, :height, :width])
        assert (out.pixel_values[index, :, height:] == 0).all() and (out.pixel_values[index, :, :, width:] == 0).all()


def test_backends_agree_within_one_gray_level():
    image = np.random.default_rng(3).integers(0, 256, size=(123, 77, 3), dtype=np.uint8)
    outs = [cls(size={"shortest_edge": 200, "longest_edge": 300})(image, return_tensors="pt") for cls in BACKENDS]
    assert torch.equal(outs[0].pixel_mask, outs[1].pixel_mask)
    assert (unnormalise(outs[0].pixel_values) - unnormalise(outs[1].pixel_values)).abs().max().item() <= 1.0 + 1e-3


# ------------------------------------------------------------------------------------------------ training targets


def box_masks(height, width):
    masks = np.zeros((2, height, width), bool)
    masks[0, 10:30, 5:25] = True
    masks[1, 20:, 40:] = True
    return masks


def test_annotations_give_mask_labels_at_padded_size(processor_class):
    image = np.zeros((60, 80, 3), np.uint8)
    processor = processor_class(size={"shortest_edge": 120, "longest_edge": 200})
    out = processor(image, annotations=[{"masks": box_masks(60, 80), "labels": [3, 7]}], return_tensors="pt")
    assert out.pixel_values.shape == (1, 3, 128, 160)
    (mask_labels,), (class_labels,) = out["mask_labels"], out["class_labels"]
    assert mask_labels.dtype == torch.float32 and mask_labels.shape == (2, 128, 160)
    assert class_labels.dtype == torch.long and class_labels.tolist() == [3, 7]
    # Exact 2x upscaling with nearest: the boxes double; padding is 0.
    expected = torch.from_numpy(box_masks(60, 80)).repeat_interleave(2, 1).repeat_interleave(2, 2).float()
    assert torch.equal(mask_labels[:, :120, :160], expected)
    assert mask_labels[:, 120:].sum() == 0


def test_mask_labels_use_pil_nearest_like_detectron2(processor_class):
    masks = np.random.default_rng(5).random((3, 240, 320)) > 0.5
    out = processor_class(size=FIXTURE_SIZE)(
        np.zeros((240, 320, 3), np.uint8), annotations=[{"masks": masks, "labels": [0, 1, 2]}]
    )
    expected = np.stack(
        [np.array(PIL.Image.fromarray(m.astype(np.uint8)).resize((341, 256), PIL.Image.NEAREST)) for m in masks]
    )
    assert out["mask_labels"][0].shape == (3, 256, 352)
    assert torch.equal(out["mask_labels"][0][:, :, :341], torch.from_numpy(expected).float())


def test_segmentation_maps_reduce_labels(processor_class):
    segmentation_map = np.zeros((60, 80), np.int64)  # 0 = background, becomes ignore_index
    segmentation_map[10:30, 5:25] = 4
    segmentation_map[20:, 40:] = 8
    out = processor_class(size={"shortest_edge": 60, "longest_edge": 100})(
        np.zeros((60, 80, 3), np.uint8), segmentation_maps=segmentation_map, do_reduce_labels=True, ignore_index=255
    )
    assert out["class_labels"][0].tolist() == [3, 7]
    assert torch.equal(out["mask_labels"][0][:, :60, :80], torch.from_numpy(box_masks(60, 80)).float())


def test_segmentation_maps_with_instance_to_semantic_mapping(processor_class):
    segmentation_map = np.zeros((60, 80), np.int64)
    segmentation_map[10:30, 5:25] = 1
    segmentation_map[20:, 40:] = 2
    processor = processor_class(size={"shortest_edge": 120, "longest_edge": 200})
    out = processor(
        np.zeros((60, 80, 3), np.uint8),
        segmentation_maps=[segmentation_map],
        instance_id_to_semantic_id={1: 3, 2: 7},
        ignore_index=0,
        return_tensors="pt",
    )
    from_annotations = processor(
        np.zeros((60, 80, 3), np.uint8), annotations=[{"masks": box_masks(60, 80), "labels": [3, 7]}]
    )
    assert out["class_labels"][0].tolist() == [3, 7]
    assert torch.equal(out["mask_labels"][0], from_annotations["mask_labels"][0])


def test_target_errors_name_the_image(processor_class):
    processor = processor_class()
    images = [np.zeros((10, 10, 3), np.uint8), np.zeros((12, 10, 3), np.uint8)]
    annotations = [{"masks": np.zeros((1, 10, 10), bool), "labels": [0]} for _ in range(2)]
    with pytest.raises(ValueError, match=r"Image 1: masks have size \(10, 10\) but the image is \(12, 10\)"):
        processor(images, annotations=annotations)
    with pytest.raises(ValueError, match=r"Annotation 0: expected 'masks' of shape \(N, H, W\)"):
        processor(images[0], annotations=[{"masks": np.zeros((2, 10, 10), bool), "labels": [0]}])


# ------------------------------------------------------------------------------------------------ post-processing


def fixture_outputs(variant: str):
    fixture = load_eval_fixture(variant)
    outputs = SimpleNamespace(class_queries_logits=fixture["pred_logits"], masks_queries_logits=fixture["pred_masks"])
    return fixture, outputs


def aligned_upstream(fixture, result):
    """Rows of `result` and of the official instances, both sorted by flat index query * K + class."""
    flat = result["query_indices"] * NUM_CLASSES + result["labels"]
    ours = torch.argsort(flat)
    theirs = torch.argsort(fixture["instances.flat_topk_indices"])
    return flat, ours, theirs


@pytest.mark.parametrize("image_sizes", [None, [(256, 341)]], ids=["resized-from-target", "image_sizes"])
def test_instance_inference_matches_official(processor_class, variant, image_sizes):
    fixture, outputs = fixture_outputs(variant)
    processor = processor_class(size=FIXTURE_SIZE)
    (result,) = processor.instance_inference(
        outputs, threshold=0.0, target_sizes=[(240, 320)], num_detections=100, image_sizes=image_sizes
    )
    flat, ours, theirs = aligned_upstream(fixture, result)
    assert set(flat.tolist()) == set(fixture["instances.flat_topk_indices"].tolist())
    torch.testing.assert_close(result["scores"][ours], fixture["instances.scores"][theirs], rtol=1e-5, atol=0)
    torch.testing.assert_close(
        result["class_scores"][ours], fixture["instances.class_scores"][theirs], rtol=1e-5, atol=0
    )
    masks, reference = result["masks"][ours], fixture["instances.pred_masks"][theirs]
    assert masks.shape == reference.shape == (100, 240, 320)
    iou = (masks & reference).flatten(1).sum(1) / (masks | reference).flatten(1).sum(1)
    assert iou.min().item() >= 0.999
    assert torch.all(result["scores"][:-1] >= result["scores"][1:])


def test_threshold_equals_filtering_the_full_result(variant):
    """Thresholding the class scores before upsampling must not change the kept set or its values."""
    fixture, outputs = fixture_outputs(variant)
    processor = FastInstImageProcessor(size=FIXTURE_SIZE)
    (full,) = processor.instance_inference(outputs, threshold=0.0, target_sizes=[(240, 320)])
    # Thresholds equal to the 10th and 50th best scores also exercise the `>=` boundary.
    for threshold in (full["scores"][9].item(), full["scores"][49].item()):
        (kept,) = processor.instance_inference(outputs, threshold=threshold, target_sizes=[(240, 320)])
        expected = full["scores"] >= threshold
        for key in ("scores", "class_scores", "labels", "query_indices", "masks"):
            assert torch.equal(kept[key], full[key][expected]), key


def test_post_process_instance_segmentation_structure(variant):
    fixture, outputs = fixture_outputs(variant)
    processor = FastInstImageProcessor(size=FIXTURE_SIZE)
    (instances,) = processor.instance_inference(outputs, threshold=0.0, target_sizes=[(240, 320)])
    (result,) = processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=[(240, 320)])
    segmentation, segments_info = result["segmentation"], result["segments_info"]
    non_empty = instances["masks"].flatten(1).any(1)
    masks = instances["masks"][non_empty]
    assert segmentation.shape == (240, 320) and segmentation.dtype == torch.int32
    assert [s["id"] for s in segments_info] == list(range(len(masks)))
    assert {"id", "label_id", "was_fused", "score"} == set(segments_info[0])
    assert [s["label_id"] for s in segments_info] == instances["labels"][non_empty].tolist()
    scores = [s["score"] for s in segments_info]
    assert scores == sorted(scores, reverse=True)
    # High scores on top: every pixel shows the best-scoring (lowest id) instance covering it, -1 where none.
    covering = torch.where(masks, torch.arange(len(masks))[:, None, None], len(masks)).min(0).values
    assert torch.equal(segmentation.long(), torch.where(covering == len(masks), -1, covering))

    (binary,) = processor.post_process_instance_segmentation(
        outputs, threshold=0.0, target_sizes=[(240, 320)], return_binary_maps=True
    )
    assert torch.equal(binary["segmentation"], masks)
    (coco,) = processor.post_process_instance_segmentation(
        outputs, threshold=0.0, target_sizes=[(240, 320)], return_coco_annotation=True
    )
    assert len(coco["segmentation"]) == len(masks) and all(isinstance(rle, list) for rle in coco["segmentation"])
    with pytest.raises(ValueError, match="Set at most one of return_coco_annotation, return_binary_maps"):
        processor.post_process_instance_segmentation(outputs, return_binary_maps=True, return_coco_annotation=True)


def test_post_process_nothing_found_and_sizes_from_outputs(variant):
    fixture, outputs = fixture_outputs(variant)
    processor = FastInstImageProcessor(size=FIXTURE_SIZE)
    (empty,) = processor.post_process_instance_segmentation(outputs, threshold=1.01, target_sizes=[(240, 320)])
    assert empty["segments_info"] == [] and (empty["segmentation"] == -1).all()
    (binary,) = processor.post_process_instance_segmentation(
        outputs, threshold=1.01, target_sizes=[(240, 320)], return_binary_maps=True
    )
    assert binary["segmentation"].shape == (0, 240, 320)
    # Without target sizes the masks come back at the resized (unpadded) size when it is known.
    outputs.image_sizes = torch.tensor([[256, 341]])
    (resized,) = processor.post_process_instance_segmentation(outputs, threshold=0.0)
    assert resized["segmentation"].shape == (256, 341)
    del outputs.image_sizes
    (padded,) = processor.post_process_instance_segmentation(outputs, threshold=0.0)
    assert padded["segmentation"].shape == (256, 352)


def test_post_process_errors():
    processor = FastInstImageProcessor()
    outputs = SimpleNamespace(class_queries_logits=torch.zeros(1, 4, 3), masks_queries_logits=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"Got 2 `target_sizes` for a batch of 1"):
        processor.post_process_instance_segmentation(outputs, target_sizes=[(10, 10), (10, 10)])
    with pytest.raises(ValueError, match=r"Image 0: resized size \(100, 64\) exceeds the padded input size \(64, 64\)"):
        processor.post_process_instance_segmentation(outputs, image_sizes=[(100, 64)])
    with pytest.raises(ValueError, match=r"\(B, Q, K\+1\).*\(1, 4\)"):
        processor.post_process_instance_segmentation(
            SimpleNamespace(class_queries_logits=torch.zeros(1, 4), masks_queries_logits=torch.zeros(1, 4, 8, 8))
        )


# ---------------------------------------------------------------------------------------------- serialisation


def test_save_and_load_round_trip(processor_class, tmp_path):
    processor = processor_class(size={"shortest_edge": 576, "longest_edge": 777}, num_detections=50)
    processor.save_pretrained(tmp_path)
    loaded = processor_class.from_pretrained(tmp_path)

    # auto_map names the remote-code classes: the saved file lists both backends (checked in the Auto tests).
    def settings(p):
        return {k: v for k, v in p.to_dict().items() if k != "auto_map"}

    assert settings(loaded) == settings(processor)
    assert loaded.size.shortest_edge == 576 and loaded.size.longest_edge == 777 and loaded.num_detections == 50
    image = np.random.default_rng(4).integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    expected = processor(image, return_tensors="pt").pixel_values
    assert torch.equal(loaded(image, return_tensors="pt").pixel_values, expected)


def test_auto_image_processor(tmp_path):
    from transformers import AutoImageProcessor

    AutoImageProcessor.register(
        FastInstConfig,
        image_processor_classes={"torchvision": FastInstImageProcessor, "pil": FastInstImageProcessorPil},
        exist_ok=True,
    )
    FastInstConfig().save_pretrained(tmp_path)
    FastInstImageProcessor(size={"shortest_edge": 576, "longest_edge": 777}).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is FastInstImageProcessor
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(pil) is FastInstImageProcessorPil and pil.size.shortest_edge == 576


def test_float_images_in_unit_range_are_flagged(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    processor = FastInstImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    with caplog.at_level("WARNING"):
        processor(torch.rand(3, 20, 30), return_tensors="pt")
    assert "values in [0, 1]" in caplog.text
    hf_logging.disable_propagation()
