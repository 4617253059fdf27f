"""Post-processing: our run-length encoding, chunked masks, the bounded-memory two-pass path, and the semantic and
panoptic outputs against the official formulas on the recorded official logits."""

import collections
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_eval_fixture
from torch.nn import functional as F

from fastinst_hf import FastInstImageProcessorPil
from fastinst_hf import image_processing_fastinst as processing
from fastinst_hf import mask_resizing_fastinst as mask_resizing
from fastinst_hf.image_processing_fastinst import FastInstImageProcessor, binary_mask_to_rle


def random_outputs(seed: int = 0, queries: int = 12, classes: int = 3) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        class_queries_logits=3 * torch.randn(1, queries, classes + 1, generator=generator),
        masks_queries_logits=2 * torch.randn(1, queries, 6, 8, generator=generator),
    )


def test_binary_mask_to_rle_matches_transformers_format():
    from transformers.models.mask2former.image_processing_mask2former import binary_mask_to_rle as reference

    rng = np.random.default_rng(0)
    masks = [rng.random((5, 7)) > 0.5, np.ones((3, 4), bool), np.zeros((3, 4), bool), np.eye(4, dtype=bool)]
    for mask in masks:
        assert binary_mask_to_rle(torch.from_numpy(mask)) == [int(v) for v in reference(mask)]
    assert binary_mask_to_rle(torch.tensor([[0, 1, 1], [1, 0, 1]])) == [2, 3, 6, 1]


def test_chunk_size_does_not_change_the_masks():
    logits = 2 * torch.randn(7, 6, 8, generator=torch.Generator().manual_seed(1))
    runs = [
        list(mask_resizing.iter_binary_masks(logits, (40, 60), (50, 70), 0.5, chunk_pixels=pixels))
        for pixels in (1, 3 * 64 * 70, 10**9)
    ]
    assert [len(run) for run in runs] == [7, 3, 1]
    for run in runs[:2]:
        for key in (1, 2, 3):
            assert torch.equal(torch.cat([chunk[key] for chunk in run]), runs[2][0][key])


@pytest.mark.parametrize("kind", ["map", "rle"])
def test_two_pass_post_processing_equals_the_single_pass(monkeypatch, kind):
    outputs, processor = random_outputs(), FastInstImageProcessor()
    kwargs = dict(threshold=0.0, target_sizes=[(37, 53)], image_sizes=[(44, 60)], return_coco_annotation=kind == "rle")
    (single,) = processor.post_process_instance_segmentation(outputs, **kwargs)
    monkeypatch.setattr(processing, "MAX_MASK_BYTES", 0)
    (streamed,) = processor.post_process_instance_segmentation(outputs, **kwargs)
    assert streamed["segments_info"] == single["segments_info"] and len(single["segments_info"]) > 5
    if kind == "map":
        assert torch.equal(streamed["segmentation"], single["segmentation"])
    else:
        assert streamed["segmentation"] == single["segmentation"]


def blob_logits(queries: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Stride-8 mask logits with one Gaussian blob per query (positive inside, about -6 elsewhere) plus noise."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.arange(size[0]).view(1, -1, 1).float()
    xs = torch.arange(size[1]).view(1, 1, -1).float()
    centres = torch.rand(queries, 2, generator=generator) * torch.tensor(size)
    sigmas = 1 + 3 * torch.rand(queries, 1, 1, generator=generator)
    distance2 = (ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2
    noise = 0.5 * torch.randn(queries, *size, generator=generator)
    return 12 * torch.exp(-distance2 / (2 * sigmas**2)) - 6 + noise


@pytest.mark.parametrize(
    "logit_size, resized, output",
    [((12, 16), (96, 128), (96, 128)), ((12, 16), (90, 128), (75, 107)), ((9, 10), (72, 77), (300, 321))],
)
def test_tiled_masks_equal_the_dense_resizing(monkeypatch, logit_size, resized, output):
    """The tiled CPU path gives torch's masks bit for bit (and its scores up to float rounding)."""
    if mask_resizing._exact_axes(logit_size, resized, output) is None:
        pytest.skip("this torch build's bilinear rounding is not reproduced; the dense path runs instead")
    monkeypatch.setattr(mask_resizing, "PROBE_BREAK_EVEN", 0)  # probe these small sizes too
    monkeypatch.setattr(mask_resizing, "_PROBED", collections.OrderedDict())
    logits = blob_logits(9, logit_size)
    probs = mask_resizing.resize_mask_logits(logits, resized, output).sigmoid()
    masks = probs > 0.5
    ((_, tiled, scores, areas),) = mask_resizing.iter_binary_masks(logits, resized, output, 0.5)
    assert mask_resizing._PROBED[(logit_size, resized, output)] is not None
    assert torch.equal(tiled, masks) and masks.any() and not masks.all()
    assert torch.equal(areas, masks.flatten(1).sum(1))
    expected = (probs * masks).flatten(1).sum(1) / (areas + 1e-6)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)


def test_the_probe_runs_only_where_it_pays_off_and_is_remembered(monkeypatch):
    monkeypatch.setattr(mask_resizing, "_PROBED", collections.OrderedDict())
    calls = []
    monkeypatch.setattr(mask_resizing, "_exact_axes", lambda *sizes: calls.append(sizes) or None)
    sizes = ((60, 80), (480, 640), (480, 640))  # 307200 padded + 307200 output pixels per dense mask
    few = 2 + mask_resizing.PROBE_BREAK_EVEN // (2 * 480 * 640)  # (masks - 2) x pixels just below break-even
    assert mask_resizing._probed_axes(sizes, few) is None and calls == []  # dense, nothing remembered
    assert mask_resizing._probed_axes(sizes, few + 1) is None and calls == [sizes]
    assert mask_resizing._probed_axes(sizes, 1) is None and calls == [sizes]  # remembered, not probed again
    for k in range(mask_resizing.PROBED_SIZES):
        mask_resizing._probed_axes(((60, 80), (480, 640), (480, 641 + k)), 100)
    assert sizes not in mask_resizing._PROBED and len(mask_resizing._PROBED) == mask_resizing.PROBED_SIZES


def test_paint_masks_equals_painting_one_mask_at_a_time():
    generator = torch.Generator().manual_seed(0)
    for count in (0, 1, 7, 255, 300):
        masks = torch.rand(max(count // 2, 1), 9, 11, generator=generator) > 0.7
        # Segments by descending score; masks shared by several segments (a query kept with several labels).
        indices = torch.randint(0, len(masks), (count,), generator=generator)
        lowest_first = ((index, masks[indices[index]]) for index in range(count - 1, -1, -1))
        expected = processing.paint_segmentation(lowest_first, (9, 11))
        assert torch.equal(processing.paint_masks(masks.clone(), indices, (9, 11)), expected)


def duplicate_outputs() -> SimpleNamespace:
    """Four queries: 0 and 1 mask the same square as class 0 (1 ranked lower), 2 the same square as class 1,
    3 another square as class 0; query 4 is "no object"."""
    square, other = torch.full((8, 8), -6.0), torch.full((8, 8), -6.0)
    square[1:5, 1:5], other[4:8, 4:8] = 6.0, 6.0
    masks = torch.stack([square, square.clone(), square.clone(), other, other.clone()])
    classes = torch.full((5, 3), -6.0)
    classes[0, 0], classes[1, 0], classes[2, 1], classes[3, 0], classes[4, 2] = 6.0, 4.0, 5.0, 3.0, 6.0
    return SimpleNamespace(class_queries_logits=classes[None], masks_queries_logits=masks[None])


def test_suppress_duplicates_drops_lower_ranked_same_class_overlaps_only():
    outputs = duplicate_outputs()
    queries, labels = torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 0, 0])
    class_scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    masks = outputs.masks_queries_logits[0]
    keep = processing.suppress_duplicates(masks, queries, labels, class_scores, 0.8)
    assert keep.tolist() == [True, True, False, True]
    # The higher estimated final score wins, whatever the order of the pairs.
    reordered = processing.suppress_duplicates(masks, queries, labels, torch.tensor([0.7, 0.8, 0.9, 0.6]), 0.8)
    assert reordered.tolist() == [False, True, True, True]
    assert processing.suppress_duplicates(masks, queries, labels, class_scores, 1.0).all()


def test_processor_duplicate_iou_threshold_is_off_by_default_and_round_trips(tmp_path):
    outputs = duplicate_outputs()
    default = FastInstImageProcessor(num_detections=10)
    suppressing = FastInstImageProcessor(num_detections=10, duplicate_iou_threshold=0.8)
    kwargs = {"threshold": 0.5, "target_sizes": [(64, 64)], "image_sizes": [(64, 64)]}
    found = [p.post_process_instance_segmentation(outputs, **kwargs)[0] for p in (default, suppressing)]
    queries = [p.instance_inference(outputs, **kwargs)[0]["query_indices"].tolist() for p in (default, suppressing)]
    assert sorted(queries[0]) == [0, 1, 2, 3] and sorted(queries[1]) == [0, 2, 3]
    assert len(found[0]["segments_info"]) == 4 and len(found[1]["segments_info"]) == 3
    suppressing.save_pretrained(tmp_path)
    assert FastInstImageProcessor.from_pretrained(tmp_path).duplicate_iou_threshold == 0.8


# ----------------------------------------------------------------------------- semantic and panoptic (official formulas)
# The official `FastInst.forward` (eval) upsamples the mask logits to the padded input, detectron2's
# `sem_seg_postprocess` crops the resized image and resizes to the output size; then `semantic_inference` /
# `panoptic_inference` (junjiehe96/FastInst, fastinst/fastinst.py). Written out here as plainly as upstream does.
FIXTURE_RESIZED, FIXTURE_OUTPUT = (256, 341), (240, 320)


def official_mask_probs(fixture) -> torch.Tensor:
    padded = fixture["images_tensor"].shape[-2:]
    masks = F.interpolate(fixture["pred_masks"], size=padded, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : FIXTURE_RESIZED[0], : FIXTURE_RESIZED[1]]
    masks = F.interpolate(masks[None], size=FIXTURE_OUTPUT, mode="bilinear", align_corners=False)[0]
    return masks.sigmoid()


def official_semantic(fixture) -> torch.Tensor:
    mask_cls = F.softmax(fixture["pred_logits"][0], dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", mask_cls, official_mask_probs(fixture))


def official_panoptic(fixture, object_mask_threshold, overlap_threshold, stuff_classes=()):
    mask_cls = fixture["pred_logits"][0]
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_pred = official_mask_probs(fixture)
    keep = labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
    panoptic_seg = torch.zeros(cur_masks.shape[-2:], dtype=torch.int32)
    segments_info, current_segment_id = [], 0
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    cur_mask_ids = cur_prob_masks.argmax(0)
    stuff_memory_list = {}
    for k in range(cur_classes.shape[0]):
        pred_class = cur_classes[k].item()
        isthing = pred_class not in stuff_classes
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if int(pred_class) in stuff_memory_list:
                    panoptic_seg[mask] = stuff_memory_list[int(pred_class)]
                    continue
                stuff_memory_list[int(pred_class)] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "isthing": bool(isthing), "category_id": int(pred_class)})
    return panoptic_seg, segments_info


def fixture_outputs(variant):
    fixture = load_eval_fixture(variant)
    outputs = SimpleNamespace(class_queries_logits=fixture["pred_logits"], masks_queries_logits=fixture["pred_masks"])
    return fixture, outputs


SIZES = {"target_sizes": [FIXTURE_OUTPUT], "image_sizes": [FIXTURE_RESIZED]}


def test_semantic_segmentation_equals_the_official_semantic_inference(variant):
    fixture, outputs = fixture_outputs(variant)
    processor = FastInstImageProcessor()
    (result,) = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True, **SIZES)
    reference = official_semantic(fixture)
    torch.testing.assert_close(result.segmentation_scores, reference, rtol=1e-6, atol=1e-7)
    assert torch.equal(result.segmentation, reference.argmax(0))
    assert result.segmentation.shape == FIXTURE_OUTPUT and result.segmentation_scores.shape == (80, *FIXTURE_OUTPUT)
    (plain,) = processor.post_process_semantic_segmentation(outputs, **SIZES)
    assert torch.equal(plain, result.segmentation)


@pytest.mark.parametrize("threshold, overlap", [(0.8, 0.8), (0.1, 0.8), (0.0, 0.0)])
def test_panoptic_segmentation_equals_the_official_panoptic_inference(variant, threshold, overlap):
    fixture, outputs = fixture_outputs(variant)
    kwargs = {"threshold": threshold, "overlap_mask_area_threshold": overlap}
    (result,) = FastInstImageProcessor().post_process_panoptic_segmentation(outputs, **kwargs, **SIZES)
    segmentation, segments = official_panoptic(fixture, threshold, overlap)
    assert torch.equal(result["segmentation"], segmentation)
    assert [(s["id"], s["label_id"]) for s in result["segments_info"]] == [
        (s["id"], s["category_id"]) for s in segments
    ]
    assert not any(s["was_fused"] for s in result["segments_info"])
    # The official test setting (0.8) keeps none of these random-weight fixture queries; lower ones keep several.
    assert (len(segments) == 0) == (threshold == 0.8)


def test_panoptic_label_ids_to_fuse_merge_like_the_official_stuff_classes(variant):
    fixture, outputs = fixture_outputs(variant)
    kwargs = {"threshold": 0.0, "overlap_mask_area_threshold": 0.0, **SIZES}
    (unfused,) = FastInstImageProcessor().post_process_panoptic_segmentation(outputs, **kwargs)
    counts = np.bincount([s["label_id"] for s in unfused["segments_info"]])
    repeated = {int(label) for label in np.flatnonzero(counts > 1)}
    assert repeated, "the fixture needs a label with several segments"
    (fused,) = FastInstImageProcessor().post_process_panoptic_segmentation(
        outputs, label_ids_to_fuse=repeated, **kwargs
    )
    segmentation, segments = official_panoptic(fixture, 0.0, 0.0, stuff_classes=repeated)
    assert torch.equal(fused["segmentation"], segmentation)
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in fused["segments_info"]] == [
        (s["id"], s["category_id"], not s["isthing"]) for s in segments
    ]
    assert len(fused["segments_info"]) < len(unfused["segments_info"])
    score_of = {s["id"]: s["score"] for s in fused["segments_info"]}
    class_probs = fixture["pred_logits"][0].softmax(-1).max(-1).values
    assert all(any(abs(p - score) < 1e-6 for p in class_probs.tolist()) for score in score_of.values())


def test_both_backends_give_the_same_semantic_and_panoptic_results():
    outputs = random_outputs()
    results = [
        (
            p.post_process_semantic_segmentation(outputs)[0],
            p.post_process_panoptic_segmentation(outputs, threshold=0.3, overlap_mask_area_threshold=0.0),
        )
        for p in (FastInstImageProcessor(), FastInstImageProcessorPil())
    ]
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1][0]["segments_info"] == results[1][1][0]["segments_info"] != []
    assert torch.equal(results[0][1][0]["segmentation"], results[1][1][0]["segmentation"])


def test_semantic_and_panoptic_sizes_follow_the_instance_rules():
    outputs = random_outputs()
    processor = FastInstImageProcessor()
    # Without sizes: the padded input size (mask logits x 8), as the instance post-processing.
    (semantic,) = processor.post_process_semantic_segmentation(outputs)
    (panoptic,) = processor.post_process_panoptic_segmentation(outputs, threshold=0.0)
    assert semantic.shape == panoptic["segmentation"].shape == (48, 64)
    (semantic,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(37, 53)], image_sizes=[(44, 60)])
    assert semantic.shape == (37, 53) and semantic.dtype == torch.long
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_panoptic_segmentation(outputs, target_sizes=[(1, 1), (2, 2)])
