"""``LeanActivations``: memory-lean norms, MLP activations and loss for an unmodified LightningModule."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_compact.lean.swap import LeanReport, apply_lean

__all__ = ["LeanActivations"]


class LeanActivations(Callback):
    r"""Swap recognised modules of the LightningModule for ops that save less for backward.

    At ``setup`` (and again at ``on_fit_start``, for modules made in ``configure_model``)
    :func:`~lightning_compact.lean.apply_lean` runs on the LightningModule: RMSNorm and
    LayerNorm keep only their input, SwiGLU MLPs and GELUs only their inputs, and causal
    LMs (this project's LLaMA; transformers LLaMA, Mistral, Qwen2, GPT-2) compute the
    training loss from the hidden states in chunks, never holding the ``[tokens, vocab]``
    float32 logits. No matmul is recomputed, and losses and gradients are those of the
    unswapped model up to float rounding. Parameters are kept, so optimizers, DDP and
    checkpoints are unaffected; combine freely with
    :class:`~lightning_compact.CompActCallback` (which compresses the linears' inputs).

    With ``loss=True`` a causal LM's *training* forward (labels given, gradients on)
    returns the loss without logits (``logits=None`` for transformers models); a
    ``training_step`` that needs the logits should pass ``loss=False``.

    A table of what was swapped is printed once on rank zero.

    Args:
        norms: lean RMSNorm / LayerNorm.
        mlp: lean SwiGLU MLPs and GELU activations.
        loss: chunked lm_head + cross-entropy for recognised causal LMs.
        module_filter_fn: ``(module, name) -> bool``; only modules it accepts are swapped.
        chunk_size: tokens per chunk of the loss (default: chunk logits about the size of
            the hidden states).

    Example::

        trainer = Trainer(callbacks=[LeanActivations(), CompActCallback(rank=0.25)])
    """

    def __init__(
        self,
        norms: bool = True,
        mlp: bool = True,
        loss: bool = True,
        module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"LeanActivations(chunk_size={chunk_size!r}): must be a positive int or None")
        self.norms, self.mlp, self.loss = norms, mlp, loss
        self.module_filter_fn = module_filter_fn
        self.chunk_size = chunk_size
        self.report = LeanReport()
        self._table_printed = False

    def _apply(self, pl_module: pl.LightningModule) -> None:
        apply_lean(
            pl_module, norms=self.norms, mlp=self.mlp, loss=self.loss,
            module_filter_fn=self.module_filter_fn, chunk_size=self.chunk_size, report=self.report,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._apply(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Modules created in configure_model exist only now; apply_lean skips what it already swapped.
        self._apply(pl_module)
        if not self._table_printed:
            rank_zero_info(self.report.table())
            self._table_printed = True
