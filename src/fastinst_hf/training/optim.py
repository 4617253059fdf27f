"""The upstream optimiser and schedule: AdamW parameter groups, step/poly schedules with warm-up, data order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler

from ..data.recipe import UPSTREAM_LR_STEPS

REFERENCE_TOTAL_BATCH = 16
# detectron2's norm_module_types: their parameters get WEIGHT_DECAY_NORM = 0.
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def build_param_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups as detectron2's `get_default_optimizer_params` + FastInst's `build_optimizer`.

    A parameter of a module whose qualified name contains "backbone" gets `lr * backbone_lr_mult`; parameters owned
    by a normalisation layer (`NORM_TYPES`) or an `nn.Embedding` get no weight decay; everything else (biases, the
    bare `position_embedding` Parameter) gets `weight_decay`. Frozen parameters are left out. Returns up to four
    groups named "{backbone|head}/{decay|no_decay}" (empty ones dropped), each with its initial `lr`.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            no_decay = isinstance(module, (*NORM_TYPES, nn.Embedding))
            groups.setdefault(("backbone" in module_name, no_decay), []).append(parameter)
    return [
        {
            "name": f"{'backbone' if in_backbone else 'head'}/{'no_decay' if no_decay else 'decay'}",
            "params": params,
            "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        for (in_backbone, no_decay), params in sorted(groups.items())
    ]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    max_steps: int,
    warmup_steps: int = 0,
    lr_steps: Sequence[float] = UPSTREAM_LR_STEPS,
    gamma: float = 0.1,
    poly_power: float = 0.9,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-optimiser-step schedule with linear warm-up from 0 over `warmup_steps`.

    "poly": transformers' `get_scheduler("polynomial")` down to 0 with `poly_power`. "step": lr x `gamma` at each
    `round(fraction * max_steps)` of `lr_steps` (detectron2's WarmupMultiStepLR); transformers has no multi-step
    schedule, so this one is a LambdaLR.
    """
    from transformers import get_scheduler

    if schedule == "poly":
        return get_scheduler(
            "polynomial",
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=max_steps,
            scheduler_specific_kwargs={"power": poly_power, "lr_end": 0.0},
        )
    if schedule != "step":
        raise ValueError(f"schedule must be 'step' or 'poly', got {schedule!r}")
    milestones = sorted(round(fraction * max_steps) for fraction in lr_steps)

    def factor(step: int) -> float:
        warmup = min(1.0, step / warmup_steps) if warmup_steps else 1.0
        return warmup * gamma ** sum(step >= milestone for milestone in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of the dataset per epoch, from a generator seeded with `seed + epoch`.

    The order depends only on (seed, epoch), not on the global RNG, so a resumed run replays it exactly.
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items
