"""FastInst training losses: Hungarian matchers, the prediction losses, the proposal loss and the GT-mask-guided
attention mask, numerically identical to the official implementation (junjiehe96/FastInst, `criterion.py`,
`matcher.py` and `FastInstDecoder.forward_prediction_heads`).

Every random draw goes through `torch.rand` (module attribute, looked up at call time), in the same order and with
the same shapes as upstream, so that tests can replay the official draws.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import is_scipy_available, requires_backends

from .configuration_fastinst import FastInstConfig

# scipy is only needed to train: inference (and `trust_remote_code` loading) works without it. A guarded module-level
# import, because transformers' remote-code check requires every import of a file, even one inside a function.
if is_scipy_available():
    from scipy.optimize import linear_sum_assignment

MatchingIndices = list[tuple[Tensor, Tensor]]


def point_sample(features: Tensor, point_coords: Tensor) -> Tensor:
    """Bilinearly sample `features` [N, C, H, W] at `point_coords` [N, P, 2] ((x, y) in [0, 1]) -> [N, C, P].

    Same convention as detectron2's `point_sample` with `align_corners=False`: (0, 0) is the top-left corner of the
    top-left pixel, not its centre.
    """
    return F.grid_sample(features, 2.0 * point_coords.unsqueeze(2) - 1.0, align_corners=False).squeeze(3)


def pair_wise_sigmoid_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy between every prediction and every target.

    Args:
        logits: [Q, P] mask logits at P points.
        labels: [N, P] binary targets at the same points.

    Returns:
        [Q, N] cost matrix.
    """
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (positive @ labels.T + negative @ (1 - labels).T) / logits.shape[1]


def pair_wise_dice(logits: Tensor, labels: Tensor) -> Tensor:
    """Dice loss (+1 smoothing) between every prediction [Q, P] (logits) and every target [N, P] -> [Q, N]."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ labels.T
    denominator = probs.sum(-1)[:, None] + labels.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_cross_entropy_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy of matched pairs [M, P]: mean over points, sum over masks, divided by `num_masks`."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Dice loss (+1 smoothing) of matched pairs [M, P], summed over masks, divided by `num_masks`."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sample_uncertain_points(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """PointRend's `get_uncertain_point_coords_with_randomness` with uncertainty `-|logit|`.

    Draws `oversample_ratio * num_points` uniform candidates, keeps the `importance_sample_ratio * num_points` most
    uncertain ones and appends uniform points up to `num_points`.

    Args:
        mask_logits: [M, 1, h, w] predicted mask logits.

    Returns:
        [M, num_points, 2] point coordinates (x, y) in [0, 1].
    """
    num_masks = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_masks, num_sampled, 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, point_coords).abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
    idx = idx + num_sampled * torch.arange(num_masks, dtype=torch.long, device=mask_logits.device)[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_masks, num_uncertain, 2)
    if num_random > 0:
        random_coords = torch.rand(num_masks, num_random, 2, device=mask_logits.device)
        point_coords = torch.cat([point_coords, random_coords], dim=1)
    return point_coords


def validate_targets(
    mask_labels: list[Tensor],
    class_labels: list[Tensor],
    batch_size: int,
    prediction_size: tuple[int, int],
    num_labels: int,
) -> None:
    """Check that the targets describe `batch_size` images, cover the same (padded) extent as the predictions, have
    binary masks and integer class ids in [0, num_labels) (id num_labels is "no object", larger ids do not exist)."""
    if len(mask_labels) != batch_size or len(class_labels) != batch_size:
        raise ValueError(
            f"expected one mask_labels and one class_labels entry per image ({batch_size}), got "
            f"{len(mask_labels)} and {len(class_labels)}"
        )
    mask_size = None
    for idx, (masks, labels) in enumerate(zip(mask_labels, class_labels)):
        if masks.ndim != 3 or labels.ndim != 1 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"image {idx}: mask_labels must be [N, H, W] and class_labels [N] with the same N, got "
                f"{tuple(masks.shape)} and {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"image {idx}: class_labels must be integer class ids, got dtype {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(
                f"image {idx}: class_labels must lie in [0, {num_labels}) (num_labels), got "
                f"{labels.min().item()}..{labels.max().item()}"
            )
        if masks.dtype != torch.bool and masks.numel() and not ((masks == 0) | (masks == 1)).all():
            raise ValueError(
                f"image {idx}: mask_labels must be binary (bool, or 0/1 values), got values in "
                f"[{masks.min().item()}, {masks.max().item()}] (dtype {masks.dtype})"
            )
        if mask_size is None:
            mask_size = tuple(masks.shape[-2:])
        elif tuple(masks.shape[-2:]) != mask_size:
            raise ValueError(
                f"all mask_labels must share the padded batch size, got {mask_size} and {tuple(masks.shape[-2:])}"
            )
    height, width = mask_size
    pred_height, pred_width = prediction_size
    # Points are sampled in normalised coordinates, so masks and predictions must span the same padded image.
    if height * pred_width != width * pred_height:
        raise ValueError(
            f"mask_labels of size {mask_size} do not cover the same extent as predictions of size "
            f"{tuple(prediction_size)}; pad the masks with zeros (bottom/right) to the padded pixel_values size"
        )


def _prediction_index(indices: MatchingIndices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch index, prediction index) of every matched pair, concatenated over the batch."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), src_idx.to(device)


def _hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment of a `[rows, cols]` cost matrix: (row indices, column indices), int64 on the CPU."""
    requires_backends(_hungarian_match, ["scipy"])
    rows, cols = linear_sum_assignment(cost.cpu())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def _matched_target_classes(indices: MatchingIndices, class_labels: list[Tensor]) -> Tensor:
    return torch.cat([labels[tgt.to(labels.device)] for labels, (_, tgt) in zip(class_labels, indices)])


class FastInstHungarianMatcher(nn.Module):
    """Bipartite matching between the predicted instances and the ground truth (upstream `HungarianMatcher`).

    The cost is `cost_mask * BCE + cost_class * (-p[class]) + cost_dice * dice + cost_location * (-inside)`, where
    the mask costs use `num_points` uniform random points shared by all pairs of an image and `inside` is whether
    the GT mask is > 0 at the query's IA-guided location (bilinear sample). The location cost makes a query match
    only an instance that covers the pixel it was selected from.
    """

    def __init__(self, cost_class: float, cost_mask: float, cost_dice: float, cost_location: float, num_points: int):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("cost_class, cost_mask and cost_dice cannot all be 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_location = cost_location
        self.num_points = num_points

    @torch.no_grad()
    def forward(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        query_locations: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
    ) -> MatchingIndices:
        """
        Args:
            class_logits: [B, Q, K+1] class logits (last column: no object).
            mask_logits: [B, Q, h, w] mask logits over the padded image.
            query_locations: [B, Q, 2] (x, y) in [0, 1] of each query's stride-16 proposal cell.
            mask_labels: B tensors [N_i, H, W] (bool or float), padded like the batch.
            class_labels: B int64 tensors [N_i].

        Returns:
            Per image, `(prediction indices, target indices)`, int64 on the CPU, sorted by prediction index.
        """
        batch_size, num_queries = class_logits.shape[:2]
        validate_targets(mask_labels, class_labels, batch_size, mask_logits.shape[-2:], class_logits.shape[-1] - 1)
        if query_locations.shape != (batch_size, num_queries, 2):
            raise ValueError(
                f"query_locations must be [{batch_size}, {num_queries}, 2], got {tuple(query_locations.shape)}"
            )
        indices = []
        for b in range(batch_size):
            target_masks = mask_labels[b].to(device=mask_logits.device, dtype=torch.float32)[None]
            probs = class_logits[b].float().softmax(-1)
            inside = point_sample(target_masks, query_locations[b][None].float())[0]  # [N, Q]
            cost_location = -(inside > 0).float().T
            cost_class = -probs[:, class_labels[b].to(probs.device)]

            point_coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
            target_points = point_sample(target_masks, point_coords)[0]
            pred_points = point_sample(mask_logits[b][None].float(), point_coords)[0]
            cost_mask = pair_wise_sigmoid_cross_entropy(pred_points, target_points)
            cost_dice = pair_wise_dice(pred_points, target_points)

            cost = (
                self.cost_mask * cost_mask
                + self.cost_class * cost_class
                + self.cost_dice * cost_dice
                + self.cost_location * cost_location
            )
            indices.append(_hungarian_match(cost))
        return indices


class FastInstProposalMatcher(nn.Module):
    """Bipartite matching between all stride-16 proposal cells and the ground truth, supervising the
    instance-activation (IA-guided query selection) classifier.

    Cost = `cost_class * (-p[class]) + cost_location * (-inside)`, where `inside` is whether any GT pixel falls in
    the cell (adaptive average pool > 0).
    """

    def __init__(self, cost_class: float, cost_location: float):
        super().__init__()
        self.cost_class = cost_class
        self.cost_location = cost_location

    @torch.no_grad()
    def forward(
        self, proposal_logits: Tensor, mask_labels: list[Tensor], class_labels: list[Tensor]
    ) -> MatchingIndices:
        """
        Args:
            proposal_logits: [B, K+1, h16, w16] proposal class logits.
            mask_labels: B tensors [N_i, H, W] (bool or float), padded like the batch.
            class_labels: B int64 tensors [N_i].

        Returns:
            Per image, `(flat cell indices into h16*w16, target indices)`, int64 on the CPU.
        """
        batch_size = proposal_logits.shape[0]
        proposal_size = proposal_logits.shape[-2:]
        validate_targets(mask_labels, class_labels, batch_size, proposal_size, proposal_logits.shape[1] - 1)
        indices = []
        for b in range(batch_size):
            probs = proposal_logits[b].flatten(1).T.float().softmax(-1)  # [hw, K+1]
            target_masks = mask_labels[b].to(device=probs.device, dtype=torch.float32)[None]
            inside = F.adaptive_avg_pool2d(target_masks, output_size=proposal_size)[0] > 0
            cost_location = -inside.flatten(1).T.float()
            cost_class = -probs[:, class_labels[b].to(probs.device)]
            cost = self.cost_class * cost_class + self.cost_location * cost_location
            indices.append(_hungarian_match(cost))
        return indices


def build_gt_attention_mask(
    matching_indices: MatchingIndices,
    mask_labels: list[Tensor],
    size: tuple[int, int],
    num_queries_total: int,
    device: torch.device | None = None,
) -> Tensor:
    """Attention mask of the GT-mask-guided decoder branch (upstream `forward_prediction_heads`, training only).

    A matched query may only attend inside its GT mask (nearest-resized to `size`); unmatched and auxiliary queries,
    and queries whose resized GT mask is empty, attend everywhere.

    Args:
        matching_indices: per image `(query indices, target indices)`, from the matcher on the last layer.
        mask_labels: B tensors [N_i, H, W], padded like the batch.
        size: `(h, w)` of the pixel features the queries attend to.
        num_queries_total: number of IA-guided plus auxiliary queries.
        device: where to build the mask (the model's device); defaults to the device of `mask_labels`.

    Returns:
        [B, 1, num_queries_total, h * w] bool, True = may not attend, the same for every attention head (broadcast).
        A bool tensor, so it carries no gradient.
    """
    if len(matching_indices) != len(mask_labels):
        raise ValueError(f"got {len(matching_indices)} matching_indices entries for {len(mask_labels)} images")
    device = mask_labels[0].device if device is None else device
    attn_mask = torch.zeros(len(mask_labels), num_queries_total, *size, dtype=torch.bool, device=device)
    for b, (query_idx, target_idx) in enumerate(matching_indices):
        if len(query_idx) == 0:
            continue
        target_masks = mask_labels[b][target_idx.to(mask_labels[b].device)].to(device, torch.float32)
        resized = F.interpolate(target_masks[None], size=size, mode="nearest")[0].bool()
        attn_mask[b, query_idx.to(device)] = ~resized
    attn_mask = attn_mask.flatten(2)
    # A row that masks everything would give NaN attention: let such a query attend everywhere instead.
    attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
    return attn_mask[:, None]


class FastInstLoss(nn.Module):
    """The FastInst training objective (upstream `SetCriterion` followed by the weighting in `FastInst.forward`).

    For every prediction set: `loss_ce` (cross-entropy, no-object weighted by `no_object_weight`), `loss_mask` and
    `loss_dice` (on `train_num_points` uncertainty-sampled points, normalised by the number of GT masks). Plus
    `loss_proposal`, the plain cross-entropy of the IA classifier over all stride-16 cells. All returned losses are
    already multiplied by their weights.
    """

    def __init__(self, config: FastInstConfig):
        super().__init__()
        self.num_labels = config.num_labels
        self.num_points = config.train_num_points
        self.oversample_ratio = config.oversample_ratio
        self.importance_sample_ratio = config.importance_sample_ratio
        self.use_auxiliary_loss = config.use_auxiliary_loss
        self.class_weight = config.class_weight
        self.mask_weight = config.mask_weight
        self.dice_weight = config.dice_weight
        self.proposal_weight = config.proposal_weight
        self.matcher = FastInstHungarianMatcher(
            cost_class=config.class_weight,
            cost_mask=config.mask_weight,
            cost_dice=config.dice_weight,
            cost_location=config.location_weight,
            num_points=config.train_num_points,
        )
        self.proposal_matcher = FastInstProposalMatcher(
            cost_class=config.class_weight, cost_location=config.location_weight
        )
        self.no_object_weight = config.no_object_weight

    def loss_labels(self, class_logits: Tensor, class_labels: list[Tensor], indices: MatchingIndices) -> Tensor:
        """Weighted cross-entropy over [B, Q, K+1] logits; unmatched queries are no-object."""
        target_classes = torch.full(
            class_logits.shape[:2], self.num_labels, dtype=torch.int64, device=class_logits.device
        )
        target_classes[_prediction_index(indices, class_logits.device)] = _matched_target_classes(
            indices, class_labels
        ).to(class_logits.device)
        # Built here rather than kept as a buffer: non-persistent buffers come back empty from `from_pretrained`.
        class_weights = torch.ones(self.num_labels + 1, device=class_logits.device)
        class_weights[-1] = self.no_object_weight
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, class_weights)

    def loss_masks(
        self, mask_logits: Tensor, mask_labels: list[Tensor], indices: MatchingIndices, num_masks: float
    ) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and dice of the matched [B, Q, h, w] mask logits against their GT masks."""
        # float32 like the sampled point coordinates, also when the whole model runs in half precision
        pred_masks = mask_logits[_prediction_index(indices, mask_logits.device)][:, None].float()
        target_masks = torch.cat([masks[tgt.to(masks.device)] for masks, (_, tgt) in zip(mask_labels, indices)]).to(
            pred_masks
        )[:, None]
        with torch.no_grad():
            point_coords = sample_uncertain_points(
                pred_masks, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_labels = point_sample(target_masks, point_coords).squeeze(1)
        point_logits = point_sample(pred_masks, point_coords).squeeze(1)
        return (
            sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    def loss_proposal(self, proposal_logits: Tensor, class_labels: list[Tensor], indices: MatchingIndices) -> Tensor:
        """Cross-entropy over all [B, K+1, h16, w16] cells; unmatched cells are no-object (not down-weighted)."""
        logits = proposal_logits.flatten(2).float()
        target_classes = torch.full(
            (logits.shape[0], logits.shape[2]), self.num_labels, dtype=torch.int64, device=logits.device
        )
        target_classes[_prediction_index(indices, logits.device)] = _matched_target_classes(indices, class_labels).to(
            logits.device
        )
        return F.cross_entropy(logits, target_classes)

    @staticmethod
    def get_num_masks(class_labels: list[Tensor], device: torch.device) -> float:
        """Number of GT masks per process (averaged over processes when distributed), at least 1."""
        num_masks = torch.as_tensor([float(sum(len(labels) for labels in class_labels))], device=device)
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            world_size = torch.distributed.get_world_size()
        return torch.clamp(num_masks / world_size, min=1).item()

    def forward(
        self,
        predictions: list[dict],
        proposal_logits: Tensor,
        query_locations: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
    ) -> dict[str, Tensor]:
        """
        Args:
            predictions: prediction sets in upstream order `[guided_0 .. guided_{L-1}, head_0 .. head_L]`; the last
                one is the final output. Each is a dict with `"class_queries_logits"` [B, Q, K+1],
                `"masks_queries_logits"` [B, Q, h, w] and optionally `"matching_indices"` (per image
                `(query idx, target idx)`; absent or None: matched here).
            proposal_logits: [B, K+1, h16, w16] IA classifier logits.
            query_locations: [B, Q, 2] (x, y) in [0, 1] of the selected proposal cells.
            mask_labels: B tensors [N_i, H, W] (bool or float) zero-padded to the padded pixel_values size.
            class_labels: B int64 tensors [N_i] in [0, num_labels).

        Returns:
            Weighted losses: `loss_ce`, `loss_mask`, `loss_dice` (final set), `loss_ce_k`, `loss_mask_k`,
            `loss_dice_k` for `predictions[k]`, k < len(predictions) - 1 (only with `use_auxiliary_loss`), and
            `loss_proposal`.
        """
        if not predictions:
            raise ValueError("predictions must hold at least the final prediction set")
        validate_targets(
            mask_labels, class_labels, proposal_logits.shape[0], proposal_logits.shape[-2:], self.num_labels
        )

        # Upstream order, which fixes the order of the random draws: proposal matching, then the final set,
        # then the auxiliary sets.
        proposal_indices = self.proposal_matcher(proposal_logits, mask_labels, class_labels)
        loss_proposal = self.loss_proposal(proposal_logits, class_labels, proposal_indices)

        num_masks = self.get_num_masks(class_labels, proposal_logits.device)
        prediction_sets = [(predictions[-1], "")]
        if self.use_auxiliary_loss:
            prediction_sets += [(prediction, f"_{idx}") for idx, prediction in enumerate(predictions[:-1])]

        losses = {}
        for prediction, suffix in prediction_sets:
            class_logits, mask_logits = prediction["class_queries_logits"], prediction["masks_queries_logits"]
            indices = prediction.get("matching_indices")
            if indices is None:
                indices = self.matcher(class_logits, mask_logits, query_locations, mask_labels, class_labels)
            elif len(indices) != class_logits.shape[0]:
                raise ValueError(f"matching_indices has {len(indices)} entries for {class_logits.shape[0]} images")
            loss_mask, loss_dice = self.loss_masks(mask_logits, mask_labels, indices, num_masks)
            losses[f"loss_ce{suffix}"] = self.loss_labels(class_logits, class_labels, indices) * self.class_weight
            losses[f"loss_mask{suffix}"] = loss_mask * self.mask_weight
            losses[f"loss_dice{suffix}"] = loss_dice * self.dice_weight
        losses["loss_proposal"] = loss_proposal * self.proposal_weight
        return losses


__all__ = [
    "FastInstHungarianMatcher",
    "FastInstProposalMatcher",
    "FastInstLoss",
    "build_gt_attention_mask",
]
