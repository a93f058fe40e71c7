"""Model CUDA's fused attention memory while estimating on (fake) CPU tensors.

Why a stand-in: fake CUDA tensors abort the process inside
``scaled_dot_product_attention`` on a CPU-only torch, so the estimator always runs on
the fake CPU device. But CUDA and CPU attention keep different tensors for the
backward. On CUDA, with 16-bit inputs and no explicit mask, SDPA runs FlashAttention-2
(32-bit inputs or a mask: the memory-efficient kernel); both save ``q``, ``k``, ``v``,
the output and a float32 log-sum-exp ``[batch, heads, seq]`` (memory-efficient pads
``seq`` to a multiple of 32), plus a few bytes of RNG state; neither keeps the
``[seq, seq]`` attention matrix. Their output is ``[batch, seq, heads, head_dim]`` in
memory, so ``out.transpose(1, 2).reshape(b, seq, -1)`` (the usual input of the output
projection) is a view of the same storage, which the stand-in preserves. The backward
of FlashAttention-2 also allocates a float32 accumulator for ``dq`` and a float32
``[batch, heads, seq]`` row statistic, freed when it returns. Under autocast SDPA runs
in the autocast dtype, so what is saved are the low-precision casts of ``q``, ``k`` and
``v`` (with float32 rotary embeddings, ``q`` and ``k`` arrive in float32 under
``bf16-mixed``); the stand-in casts them as autocast would.

:func:`cuda_attention_memory` swaps ``torch.nn.functional.scaled_dot_product_attention``
for a shape-only autograd Function with exactly those allocations, for the duration
of a ``with`` block. The values it returns are meaningless: use it under
``FakeTensorMode`` only (it refuses real tensors).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lightning_compact._torch_private import fake_tensor

__all__ = ["cuda_attention_memory"]

# The memory-efficient kernel pads the log-sum-exp's sequence dimension to this.
_EFFICIENT_LSE_PAD = 32
_ORIGINAL_SDPA = F.scaled_dot_product_attention


class _FusedAttentionShapes(torch.autograd.Function):
    """Allocates what CUDA's fused SDPA allocates and saves; computes nothing."""

    @staticmethod
    def forward(ctx, query, key, value, mask, flash: bool):  # type: ignore[override]
        b, h, seq = query.shape[0], query.shape[1], query.shape[2]
        # [b, seq, heads, d] in memory, [b, heads, seq, d] logically: as the kernels return it.
        out = query.new_empty(b, seq, h, value.shape[-1]).transpose(1, 2)
        lse_len = seq if flash else math.ceil(seq / _EFFICIENT_LSE_PAD) * _EFFICIENT_LSE_PAD
        lse = torch.empty(b, h, lse_len, dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse, mask)
        ctx.flash = flash
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        query, key, value, out, lse, mask = ctx.saved_tensors
        if ctx.flash:
            dq_accum = torch.empty(query.shape, dtype=torch.float32, device=query.device)
            row_stat = torch.empty_like(lse)
            del dq_accum, row_stat  # alive while the kernel runs, freed when it returns
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None, None


def _fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if not all(isinstance(t, fake_tensor()) for t in (query, key, value)):
        raise RuntimeError("cuda_attention_memory() models memory only; use it under FakeTensorMode")
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast runs SDPA in its lower precision, and the kernel saves those casts (the
        # float32 originals, e.g. rotary outputs, are freed). This mode intercepts the call
        # before autocast would see it, so cast here, as autocast would.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    flash = attn_mask is None and query.dtype in (torch.float16, torch.bfloat16)
    return _FusedAttentionShapes.apply(query, key, value, attn_mask, flash)


class _AttentionMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is _ORIGINAL_SDPA:
            return _fused_sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_attention_memory() -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` allocates like CUDA's fused kernels."""
    # The mode catches calls through any reference; the attribute is swapped as well because
    # activation checkpointing recomputes in the backward, where torch function modes are not
    # applied, and a recomputation must run the same ops as the forward did.
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with _AttentionMode():
            yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
