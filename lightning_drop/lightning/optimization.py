"""The optimizer and learning-rate schedule of `DropModule`: its settings checked up front, then built.

A drop or LoRA wrap mid-fit rebuilds them (`callbacks._common.rebuild_optimizers`); `step_offset` is the step
they were rebuilt at, so the schedule continues where it was instead of restarting its warmup.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import UserError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("constant", "cosine", "linear")


def check_settings(optimizer: str, scheduler: str, lr: float, weight_decay: float, warmup_steps: int,
                   max_steps: int | None, min_lr_ratio: float) -> None:
    """Refuse a setting that would fail (or train nonsense) only once the fit has started."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{optimizer}'; choose from {', '.join(OPTIMIZERS)}")
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{scheduler}'; choose from {', '.join(SCHEDULERS)}")
    if not lr > 0:
        raise UserError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0, got {weight_decay}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise UserError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise UserError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def build_optimizer(parameters: Iterable[nn.Parameter], hp: Any) -> torch.optim.Optimizer:
    """`hp.optimizer` over the trainable parameters; no weight decay on biases and norm weights (1-d)."""
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise UserError("no trainable parameters (everything is frozen)")
    groups = [g for g in ({"params": decay, "weight_decay": hp.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
    return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[hp.optimizer](groups, lr=hp.lr, betas=tuple(hp.betas))


def lr_factor(kind: str, warmup: int, total: int, floor: float, offset: int) -> Callable[[int], float]:
    """Multiplier of the base lr at each step: linear warmup, then constant, cosine or linear decay to `floor`."""

    def factor(step: int) -> float:
        s = step + offset
        if s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * shape

    return factor


def configure(parameters: Iterable[nn.Parameter], hp: Any, estimated_steps: float | None, step_offset: int) -> Any:
    """What `LightningModule.configure_optimizers` returns for these settings: the optimizer alone, or with its
    per-step scheduler. The decay ends at `hp.max_steps`, else at `estimated_steps` (the trainer's estimate)."""
    opt = build_optimizer(parameters, hp)
    if hp.scheduler == "constant" and hp.warmup_steps == 0:
        return opt
    total = hp.max_steps
    if total is None:
        total = estimated_steps if estimated_steps is not None else 1000
        total = int(total) if math.isfinite(total) else 1000
    factor = lr_factor(hp.scheduler, hp.warmup_steps, total, hp.min_lr_ratio, step_offset)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
