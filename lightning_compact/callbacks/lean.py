"""``LeanActivations``: memory-lean norms, MLP activations and loss for an unmodified LightningModule."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_compact.checkpointing import (
    apply_checkpointing,
    checkpointed_modules,
    is_block,
    parse_granularity,
    restore_checkpointing,
)
from lightning_compact.lean.swap import LeanReport, LeanSwap, apply_lean

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

    With ``checkpointing`` the transformer blocks (this project's LLaMA; transformers
    decoder layers, ``GPT2Block``, BERT/RoBERTa layers) also run under activation
    checkpointing (:func:`~lightning_compact.checkpointing.apply_checkpointing`):
    ``"selective"`` keeps the outputs of matmuls and attention (CompAct's ``x·P``
    included) and recomputes norms, activations, adds and rotary in the backward;
    ``"blocks"`` keeps only each block's input and recomputes the whole block (the least
    memory, one more forward of the blocks); ``"blocks:0.5"`` does that for the first half
    of the blocks only (any fraction after the colon: a dial between the two). CompAct's
    projections are the same in the recomputation; losses and gradients are unchanged.
    This is the one swap undone at ``teardown``.

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
        checkpointing: ``None`` (off), ``"selective"`` or ``"blocks"``, optionally with
            ``":F"``, the fraction of the blocks checkpointed (``"blocks:0.5"``). Blocks are
            chosen by ``module_filter_fn`` too when it is given.

    Example::

        trainer = Trainer(callbacks=[LeanActivations(), CompActCallback(rank=0.25)])
        trainer = Trainer(callbacks=[LeanActivations(checkpointing="blocks"), CompActCallback(rank=0.25)])
    """

    def __init__(
        self,
        norms: bool = True,
        mlp: bool = True,
        loss: bool = True,
        module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
        chunk_size: int | None = None,
        checkpointing: str | None = None,
    ) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"LeanActivations(chunk_size={chunk_size!r}): must be a positive int or None")
        if checkpointing is not None:
            try:
                parse_granularity(checkpointing)
            except ValueError as err:
                raise ValueError(f"LeanActivations(checkpointing={checkpointing!r}): None, or {err}") from None
        self.norms, self.mlp, self.loss = norms, mlp, loss
        self.checkpointing = checkpointing
        self.module_filter_fn = module_filter_fn
        self.chunk_size = chunk_size
        self.report = LeanReport()
        self._table_printed = False

    def _apply(self, pl_module: pl.LightningModule) -> None:
        apply_lean(
            pl_module, norms=self.norms, mlp=self.mlp, loss=self.loss,
            module_filter_fn=self.module_filter_fn, chunk_size=self.chunk_size, report=self.report,
        )
        if self.checkpointing is None:
            return
        filter_fn = self.module_filter_fn
        apply_checkpointing(
            pl_module, self.checkpointing,
            module_filter_fn=None if filter_fn is None else (lambda m, n: is_block(m) and filter_fn(m, n)),
        )
        # Listed once per block, however many times setup runs.
        listed = {e.name for e in self.report.entries if e.op.startswith("checkpoint(")}
        for name, module, granularity in checkpointed_modules(pl_module):
            if name not in listed:
                self.report.entries.append(LeanSwap(name, type(module).__name__, f"checkpoint({granularity})"))

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

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The other swaps are kept (they change no result); the wrappers go, so the module
        # leaves the Trainer as plain as it came (the next setup wraps it again).
        if self.checkpointing is not None:
            restore_checkpointing(pl_module)
