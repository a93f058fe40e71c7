"""AdamW with linear warmup and a cosine (or linear) decay to a floor: the paper's schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["adamw_with_schedule", "lr_lambda", "total_training_steps"]

Decay = Literal["cosine", "linear", "constant"]


def lr_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float, decay: Decay = "cosine") -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Linear warmup from ``1/warmup_steps`` to 1 over ``warmup_steps``, then ``decay`` from
    1 to ``min_lr_ratio`` at ``total_steps`` (held there after).
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return factor


def total_training_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps of the run, for the schedule.

    Raises:
        ValueError: the length is unknown (a streamed dataset without ``trainer.max_steps``).
    """
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError(
            "The learning-rate schedule needs the run length: set `trainer.max_steps` "
            "(a streamed dataset has no length)."
        )
    return int(steps)


def adamw_with_schedule(
    module: pl.LightningModule,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_ratio: float,
    min_lr_ratio: float,
    decay: Decay,
) -> dict[str, Any]:
    """``configure_optimizers`` output: plain ``torch.optim.AdamW`` plus a per-step scheduler.

    Plain AdamW on purpose: ``CompActCallback`` recognises it and can swap in the
    compressed-state optimizer. Biases and norm weights (1-D) get no weight decay.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay > 0:
        groups: Any = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    total = total_training_steps(module.trainer)
    warmup = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup, min_lr_ratio, decay))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
