"""Parity of the FastInst losses and matchers with the official implementation, plus edge cases."""

import pytest
import torch
import torch.nn.functional as F
from conftest import load_train_fixture

from fastinst_hf.configuration_fastinst import FastInstConfig
from fastinst_hf.loss_fastinst import (
    FastInstHungarianMatcher,
    FastInstLoss,
    FastInstProposalMatcher,
    build_gt_attention_mask,
)

PADDED_SIZE = (256, 352)


def make_config(**kwargs) -> FastInstConfig:
    return FastInstConfig(hidden_dim=64, pixel_decoder_channels=64, mask_dim=64, num_attention_heads=4, **kwargs)


def padded_targets(fixture: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """GT masks zero-padded bottom/right to the padded input size, as upstream `prepare_targets`."""
    masks = fixture["gt_masks"]
    padded = torch.zeros(masks.shape[0], *PADDED_SIZE, dtype=masks.dtype)
    padded[:, : masks.shape[1], : masks.shape[2]] = masks
    return [padded], [fixture["gt_labels"]]


def fixture_predictions(fixture: dict) -> list[dict]:
    """Predictor outputs in upstream order: the aux outputs, then the final one."""
    outputs = fixture["predictor_outputs"]
    entries = outputs["aux_outputs"] + [outputs]
    return [
        {
            "class_queries_logits": entry["pred_logits"],
            "masks_queries_logits": entry["pred_masks"],
            "matching_indices": entry.get("pred_matching_indices"),
        }
        for entry in entries
    ]


def replay_rand(monkeypatch, draws: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make `torch.rand` return the stored draws in order (checking shapes); returns the remaining draws."""
    remaining = list(draws)

    def fake_rand(*size, **kwargs):
        assert remaining, f"unexpected extra torch.rand{size}"
        draw = remaining.pop(0)
        assert tuple(draw.shape) == tuple(size)
        return draw.clone()

    monkeypatch.setattr(torch, "rand", fake_rand)
    return remaining


def record_calls(module: torch.nn.Module, kind: str, calls: list) -> None:
    module.register_forward_hook(lambda _module, _args, output: calls.append({"kind": kind, "indices": output}))


def assert_same_indices(actual, expected):
    assert len(actual) == len(expected)
    for (pred, tgt), (pred_ref, tgt_ref) in zip(actual, expected):
        assert pred.dtype == tgt.dtype == torch.int64
        assert torch.equal(pred, pred_ref) and torch.equal(tgt, tgt_ref)


def test_decoder_matcher_call_parity(variant, monkeypatch):
    """The decoder's own matcher call (matcher_calls[0]) on the final head, with the first draw."""
    fixture = load_train_fixture(variant)
    outputs = fixture["predictor_outputs"]
    mask_labels, class_labels = padded_targets(fixture)
    remaining = replay_rand(monkeypatch, fixture["torch_rand_calls"][:1])
    matcher = FastInstHungarianMatcher(
        cost_class=2.0, cost_mask=5.0, cost_dice=5.0, cost_location=1000.0, num_points=12544
    )
    indices = matcher(
        outputs["pred_logits"], outputs["pred_masks"], outputs["query_locations"], mask_labels, class_labels
    )
    assert not remaining
    assert fixture["matcher_calls"][0]["kind"] == "mask"
    assert_same_indices(indices, fixture["matcher_calls"][0]["indices"])
    for entry in outputs["aux_outputs"]:
        if "pred_matching_indices" in entry:
            assert_same_indices(entry["pred_matching_indices"], fixture["matcher_calls"][0]["indices"])


def test_proposal_matcher_parity(variant):
    fixture = load_train_fixture(variant)
    mask_labels, class_labels = padded_targets(fixture)
    matcher = FastInstProposalMatcher(cost_class=2.0, cost_location=1000.0)
    indices = matcher(fixture["predictor_outputs"]["proposal_cls_logits"], mask_labels, class_labels)
    assert fixture["matcher_calls"][1]["kind"] == "proposal"
    assert_same_indices(indices, fixture["matcher_calls"][1]["indices"])


def test_loss_parity(variant, monkeypatch):
    fixture = load_train_fixture(variant)
    outputs = fixture["predictor_outputs"]
    mask_labels, class_labels = padded_targets(fixture)
    loss_fn = FastInstLoss(make_config(decoder_layers=int(variant[1])))
    calls = []
    record_calls(loss_fn.matcher, "mask", calls)
    record_calls(loss_fn.proposal_matcher, "proposal", calls)
    remaining = replay_rand(monkeypatch, fixture["torch_rand_calls"][1:])

    losses = loss_fn(
        fixture_predictions(fixture),
        outputs["proposal_cls_logits"],
        outputs["query_locations"],
        mask_labels,
        class_labels,
    )

    assert not remaining, f"{len(remaining)} draws not consumed"
    assert list(losses) == list(fixture["losses"])
    for key, expected in fixture["losses"].items():
        tolerance = 1e-5 if key.startswith(("loss_ce", "loss_proposal")) else 1e-4
        rel_err = ((losses[key] - expected).abs() / expected.abs()).item()
        assert rel_err <= tolerance, f"{key}: {losses[key].item()} vs {expected.item()} (rel {rel_err:.2e})"
    expected_calls = fixture["matcher_calls"][1:]
    assert [call["kind"] for call in calls] == [call["kind"] for call in expected_calls]
    for call, expected in zip(calls, expected_calls):
        assert_same_indices(call["indices"], expected["indices"])


def test_without_auxiliary_loss(monkeypatch):
    """Only the final set and the proposal loss; the values equal the full computation's."""
    fixture = load_train_fixture("d1_r50slim_small")
    outputs = fixture["predictor_outputs"]
    mask_labels, class_labels = padded_targets(fixture)
    # Draws: final matcher, final mask losses (the aux sets are skipped).
    remaining = replay_rand(monkeypatch, fixture["torch_rand_calls"][1:4])
    losses = FastInstLoss(make_config(use_auxiliary_loss=False))(
        fixture_predictions(fixture),
        outputs["proposal_cls_logits"],
        outputs["query_locations"],
        mask_labels,
        class_labels,
    )
    assert not remaining
    assert list(losses) == ["loss_ce", "loss_mask", "loss_dice", "loss_proposal"]
    for key, value in losses.items():
        torch.testing.assert_close(value, fixture["losses"][key], rtol=1e-4, atol=0)


def brute_force_gt_attention_mask(matching_indices, mask_labels, size, num_queries_total):
    height, width = size
    rows = []
    for b, masks in enumerate(mask_labels):
        mask = torch.zeros(num_queries_total, height * width, dtype=torch.bool)
        in_height, in_width = masks.shape[-2:]
        for query, target in zip(*matching_indices[b]):
            for y in range(height):
                for x in range(width):
                    # PyTorch "nearest": source index floor(dst * in / out).
                    source = masks[target, y * in_height // height, x * in_width // width]
                    mask[query, y * width + x] = not bool(source)
            if mask[query].all():
                mask[query] = False
        rows.append(mask)
    return torch.stack(rows)[:, None]


def test_build_gt_attention_mask():
    generator = torch.Generator().manual_seed(0)
    mask_labels = [torch.rand(3, 32, 48, generator=generator) > 0.6, torch.zeros(2, 32, 48, dtype=torch.bool)]
    mask_labels[0][1] = True  # resized to all True: ~mask is all True and must be reset
    mask_labels[1][0, :16, :8] = True
    matching_indices = [
        (torch.tensor([1, 4, 6]), torch.tensor([2, 1, 0])),
        (torch.tensor([0, 3]), torch.tensor([1, 0])),  # target 1 is empty: ~mask all True, reset
    ]
    size, num_queries_total = (8, 12), 10
    attn_mask = build_gt_attention_mask(matching_indices, mask_labels, size, num_queries_total)
    expected = brute_force_gt_attention_mask(matching_indices, mask_labels, size, num_queries_total)
    assert attn_mask.dtype == torch.bool and attn_mask.shape == (2, 1, num_queries_total, 8 * 12)
    assert torch.equal(attn_mask, expected)
    assert not attn_mask[0, :, 4].any() and not attn_mask[1, :, 0].any()
    assert attn_mask[1, :, 3].any()


def test_build_gt_attention_mask_empty_targets():
    mask_labels = [torch.zeros(0, 32, 48, dtype=torch.bool), torch.zeros(0, 32, 48, dtype=torch.bool)]
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    attn_mask = build_gt_attention_mask([empty, empty], mask_labels, (4, 6), 5)
    assert attn_mask.shape == (2, 1, 5, 24) and not attn_mask.any()


def random_inputs(num_targets: list[int], seed: int = 0, requires_grad: bool = False):
    """Random predictions (2 decoder layers: 5 prediction sets) and targets at padded size 64x96."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, num_queries, num_classes = len(num_targets), 10, 80

    def randn(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_(requires_grad)

    predictions = [
        {
            "class_queries_logits": randn(batch_size, num_queries, num_classes + 1),
            "masks_queries_logits": randn(batch_size, num_queries, 8, 12),
            "matching_indices": None,
        }
        for _ in range(5)
    ]
    proposal_logits = randn(batch_size, num_classes + 1, 4, 6)
    query_locations = torch.rand(batch_size, num_queries, 2, generator=generator)
    mask_labels = [torch.rand(n, 64, 96, generator=generator) > 0.5 for n in num_targets]
    class_labels = [torch.randint(0, num_classes, (n,), generator=generator) for n in num_targets]
    return predictions, proposal_logits, query_locations, mask_labels, class_labels


def small_loss(**kwargs) -> FastInstLoss:
    return FastInstLoss(make_config(train_num_points=64, **kwargs))


def test_image_without_targets():
    predictions, proposal_logits, query_locations, mask_labels, class_labels = random_inputs([0])
    loss_fn = small_loss()
    indices = loss_fn.matcher(
        predictions[-1]["class_queries_logits"],
        predictions[-1]["masks_queries_logits"],
        query_locations,
        mask_labels,
        class_labels,
    )
    assert [tuple(t.shape) for t in indices[0]] == [(0,), (0,)]
    proposal_indices = loss_fn.proposal_matcher(proposal_logits, mask_labels, class_labels)
    assert [tuple(t.shape) for t in proposal_indices[0]] == [(0,), (0,)]
    losses = loss_fn(predictions, proposal_logits, query_locations, mask_labels, class_labels)
    assert len(losses) == 3 * 5 + 1
    # Everything is no-object; mask losses are 0; num_masks is clamped to 1.
    expected_ce = F.cross_entropy(predictions[-1]["class_queries_logits"].transpose(1, 2), torch.full((1, 10), 80))
    torch.testing.assert_close(losses["loss_ce"], 2.0 * expected_ce)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    expected_proposal = F.cross_entropy(proposal_logits.flatten(2), torch.full((1, 24), 80))
    torch.testing.assert_close(losses["loss_proposal"], 20.0 * expected_proposal)


def test_batch_with_different_target_counts():
    predictions, proposal_logits, query_locations, mask_labels, class_labels = random_inputs([3, 1])
    loss_fn = small_loss()
    for indices in (
        loss_fn.matcher(
            predictions[0]["class_queries_logits"],
            predictions[0]["masks_queries_logits"],
            query_locations,
            mask_labels,
            class_labels,
        ),
        loss_fn.proposal_matcher(proposal_logits, mask_labels, class_labels),
    ):
        assert [len(pred) for pred, _ in indices] == [3, 1]
        assert [sorted(tgt.tolist()) for _, tgt in indices] == [[0, 1, 2], [0]]
    losses = loss_fn(predictions, proposal_logits, query_locations, mask_labels, class_labels)
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())


def test_gradients_flow():
    inputs = random_inputs([2, 0], requires_grad=True)
    predictions, proposal_logits, query_locations, mask_labels, class_labels = inputs
    losses = small_loss()(predictions, proposal_logits, query_locations, mask_labels, class_labels)
    sum(losses.values()).backward()
    for tensor in [proposal_logits] + [
        p[key] for p in predictions for key in ("class_queries_logits", "masks_queries_logits")
    ]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_invalid_inputs():
    predictions, proposal_logits, query_locations, mask_labels, class_labels = random_inputs([2, 1])
    loss_fn = small_loss()
    with pytest.raises(ValueError, match="one mask_labels and one class_labels entry per image"):
        loss_fn(predictions, proposal_logits, query_locations, mask_labels[:1], class_labels)
    with pytest.raises(ValueError, match="same N"):
        loss_fn(predictions, proposal_logits, query_locations, mask_labels, [class_labels[0][:1], class_labels[1]])
    with pytest.raises(ValueError, match="same extent"):
        unpadded = [masks[:, :, :90] for masks in mask_labels]
        loss_fn(predictions, proposal_logits, query_locations, unpadded, class_labels)
    with pytest.raises(ValueError, match="padded batch size"):
        mixed_sizes = [mask_labels[0], mask_labels[1][:, :32, :48]]
        loss_fn(predictions, proposal_logits, query_locations, mixed_sizes, class_labels)
    with pytest.raises(ValueError, match="query_locations"):
        loss_fn.matcher(
            predictions[0]["class_queries_logits"],
            predictions[0]["masks_queries_logits"],
            query_locations[:, :3],
            mask_labels,
            class_labels,
        )
    with pytest.raises(ValueError, match="matching_indices"):
        build_gt_attention_mask([], mask_labels, (8, 12), 12)
