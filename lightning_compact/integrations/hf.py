"""CompAct in Hugging Face's ``transformers.Trainer`` (and the TRL trainers built on it).

A ``TrainerCallback`` drives the same :class:`~lightning_compact.controller.CompAct` that
Lightning's callback adapts: it converts the model's linear layers when training begins
(Parameters are reused, so the optimizer the Trainer built stays valid), sets each optimizer
step's projection from ``state.global_step`` (micro-batches of one accumulated step share
it, and a run resumed from a Trainer checkpoint derives the same ones), and restores plain
layers when training ends::

    from lightning_compact.integrations.hf import CompActTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[CompActTrainerCallback(rank=0.25)])          # any optimizer

For the paper's full method (compressed gradients and Adam moments), convert first and
hand the Trainer a :class:`~lightning_compact.optim.CompActAdamW`::

    compact = CompAct(rank=0.25, grad_mode="compressed")
    optimizer = compact_adamw(model, compact, lr=args.learning_rate, weight_decay=args.weight_decay)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None),
                      callbacks=[CompActTrainerCallback(compact=compact)])

Clipping (``max_grad_norm``) sees each weight's ``.grad``: in ``"compressed"`` mode the
compressed ``Ĝ`` (``E‖Ĝ‖² = ‖G‖²``, so a threshold keeps its meaning); in ``"decompressed"``
mode the full-size estimate ``Ĝ Pᵀ``, whose norm is about ``√(n/r)`` times the exact one,
so the same threshold clips harder there. ``projection="principal"`` keeps data-dependent
state that a Trainer checkpoint does not hold: it is refused here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lightning_compact.controller import CompAct
from lightning_compact.optim import CompActAdamW

__all__ = ["CompActTrainerCallback", "compact_adamw"]

logger = logging.getLogger(__name__)


def compact_adamw(model: nn.Module, compact: CompAct, *, lr: float = 1e-3, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> CompActAdamW:
    """Convert ``model`` with ``compact`` and return its :class:`CompActAdamW`, for ``Trainer(optimizers=(opt, None))``.

    Weight decay goes to parameters with two or more dimensions (weights, not biases or
    norm scales); each compressed weight's ``weight_delta`` takes its weight's place.
    """
    compact.convert(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    deltas = {id(layer.weight_delta) for layer in compact.compressed_layers.values()}
    params = [p for p in trainable if id(p) not in deltas]  # δ is put in its weight's place below
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = compact.optimizer(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps))
    if not isinstance(optimizer, CompActAdamW):  # decompressed mode: the plain AdamW is what trains
        optimizer = CompActAdamW.from_optimizer(optimizer)
    return optimizer


class CompActTrainerCallback(TrainerCallback):
    """``transformers.TrainerCallback`` that runs CompAct inside ``Trainer.train``.

    Args:
        rank: as :class:`~lightning_compact.controller.CompAct`'s; with ``**kwargs``, builds one
            in ``grad_mode="decompressed"`` (full-size gradients: any optimizer the Trainer builds).
        compact: a :class:`~lightning_compact.controller.CompAct` to drive instead (e.g. the
            one given to :func:`compact_adamw` in compressed mode).
        **kwargs: further :class:`~lightning_compact.controller.CompAct` arguments.

    Raises:
        ValueError: neither or both of ``rank`` and ``compact``; ``projection="principal"``.
    """

    def __init__(self, rank: int | float | None = None, *, compact: CompAct | None = None, **kwargs: Any) -> None:
        if (rank is None) == (compact is None):
            raise ValueError("CompActTrainerCallback: pass rank=... (and CompAct options) or compact=CompAct(...)")
        if compact is None:
            kwargs.setdefault("grad_mode", "decompressed")
            compact = CompAct(rank, **kwargs)
        elif kwargs:
            raise ValueError(f"CompActTrainerCallback(compact=...): options {sorted(kwargs)} belong to that CompAct")
        if compact.config.projection == "principal":
            raise ValueError(
                "CompActTrainerCallback: projection='principal' keeps its bases as training state, which a Trainer "
                "checkpoint does not hold; use projection='gaussian' or 'orthogonal' here"
            )
        self.compact = compact
        # Which layers the current (or last) training converted and skipped, kept after restore.
        self.report = compact.report

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("CompActTrainerCallback: the Trainer passed no model to on_train_begin")
        self.compact.convert(model)
        self.report = self.compact.report
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if self.compact.compressed_layers:
            if args.world_size > 1:
                raise ValueError(
                    "CompActTrainerCallback: grad_mode='compressed' under distributed training needs the model "
                    "converted before DDP wraps it, which the Trainer does itself; use grad_mode='decompressed'"
                )
            if inner is not None and not isinstance(inner, CompActAdamW) and self.compact.holds_converted(inner):
                raise ValueError(
                    f"CompActTrainerCallback: grad_mode='compressed' needs CompActAdamW, but the Trainer built "
                    f"{type(inner).__name__}. Build it with lightning_compact.integrations.hf.compact_adamw(model, "
                    "compact, lr=...) and pass Trainer(optimizers=(optimizer, None)), or use grad_mode='decompressed'."
                )
        if state.is_world_process_zero:
            logger.info(self.compact.format_table())
        self.compact.step(state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # Called at the first micro-batch of each optimizer step: its projection.
        self.compact.step(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and self.compact.layers:
            self.compact.restore(model)
