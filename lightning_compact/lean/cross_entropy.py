"""lm_head + cross-entropy in chunks of tokens: the ``[tokens, vocab]`` logits never exist whole.

The plain path (``lm_head(h)``, ``.float()``, ``F.cross_entropy``) keeps the float32
log-probabilities for backward and, in backward, a float32 gradient of the same size:
for LLaMA-350M at 32 x 256 tokens and a 32000 vocabulary that is 1 GiB each. Here, as
in liger-kernel, the forward goes through the tokens ``chunk_size`` at a time, computes
each chunk's loss *and* its gradients w.r.t. the hidden states and the weight (softmax
minus one-hot, two matmuls), and keeps only those gradients (``[tokens, hidden]`` and
``[vocab, hidden]``) for backward, which just scales them. No matmul is recomputed.

On CUDA, ``backend="auto"`` hands the work to liger-kernel's fused Triton kernel or to
cut-cross-entropy when one is installed (``pip install lightning-compact[lean]``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "chunked_linear_cross_entropy", "default_chunk_size"]

Backend = Literal["auto", "torch", "liger", "cce"]


# On CPU, each chunk adds its [vocab, hidden] share of dW with a matmul of inner size
# `chunk`, which is memory-bound for small chunks: at 1024 x 256 hidden x 8000 vocab,
# 32-token chunks made the loss 6.5x slower than the plain path, 256 tokens 1.9x,
# 1024 tokens 1.0x (benchmarks/RESULTS.md §6).
CPU_MIN_CHUNK = 1024


def default_chunk_size(tokens: int, hidden: int, vocab: int, min_chunk: int = 1) -> int:
    """liger-kernel's rule: chunks whose logits are about the size of the hidden states
    (a power of two), and at least ``min_chunk`` tokens."""
    chunk = max(1, math.ceil(tokens / max(1, math.ceil(vocab / hidden))))
    return max(1 << (chunk - 1).bit_length(), min_chunk)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # What F.linear would run in: the autocast dtype where autocast is on, else the input's.
    device = hidden.device.type
    if hidden.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
        reduction: str,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax, loss and dW accumulate here
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)  # transient: freed when forward returns
            b = bias.to(compute_dtype) if bias is not None else None
            valid = targets != ignore_index
            # 0/0 = nan when every target is ignored, as F.cross_entropy gives.
            scale = 1.0 / valid.sum().to(acc) if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
            loss = torch.zeros((), dtype=acc, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                h = hidden[start:end].to(compute_dtype)
                logits = F.linear(h, w, b).to(acc)
                v = valid[start:end]
                t = torch.where(v, targets[start:end], 0).unsqueeze(1)
                lse = torch.logsumexp(logits, dim=-1)
                loss = loss + ((lse - logits.gather(1, t).squeeze(1)) * v).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(sum of row losses)/d logits = softmax - one_hot, zero on ignored rows; built in place.
                g = logits.sub_(lse.unsqueeze(1)).exp_()
                g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))
                g.mul_((v * scale).unsqueeze(1))
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(compute_dtype)
                if need_h:
                    grad_h[start:end] = g @ w
                if need_w:
                    if acc == compute_dtype:
                        grad_w.addmm_(g.t(), h)  # in place: no [vocab, hidden] temporary per chunk
                    else:
                        grad_w += g.t() @ h
            loss = loss * scale
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_loss).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _resolve_backend(backend: Backend, hidden: torch.Tensor) -> str:
    if backend not in ("auto", "torch", "liger", "cce"):
        raise ValueError(f"backend={backend!r}: must be 'auto', 'torch', 'liger' or 'cce'")
    if backend != "auto":
        return backend
    if hidden.is_cuda:
        if _available("liger_kernel"):
            return "liger"
        if _available("cut_cross_entropy"):
            return "cce"
    return "torch"


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    backend: Backend = "torch",
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` without the full logits.

    Args:
        hidden: ``[..., hidden]`` inputs of the output head.
        weight: ``[vocab, hidden]`` head weight (``lm_head.weight``).
        targets: class indices shaped like ``hidden.shape[:-1]``; ``ignore_index`` entries
            do not count (the mean is over the others, as ``F.cross_entropy`` takes it).
        bias: optional ``[vocab]`` head bias.
        chunk_size: tokens per chunk; default :func:`default_chunk_size` (at least
            :data:`CPU_MIN_CHUNK` tokens on CPU).
        reduction: ``"mean"`` or ``"sum"``.
        backend: ``"torch"`` (this module; any device), ``"liger"`` / ``"cce"`` (the CUDA
            kernels of liger-kernel / cut-cross-entropy), ``"auto"`` (one of those on CUDA
            when installed, else ``"torch"``).

    Returns:
        The float32 scalar loss (float64 for float64 inputs). Under autocast the matmuls run in the autocast dtype, as
        ``lm_head`` would; the softmax and the loss are float32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'sum'")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden {tuple(hidden.shape)}")
    resolved = _resolve_backend(backend, hidden)
    if resolved == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, weight, t, bias=bias, ignore_index=ignore_index, reduction=reduction)
    if resolved == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(h, weight, t, bias=bias, ignore_index=ignore_index, reduction=reduction)
    min_chunk = CPU_MIN_CHUNK if h.device.type == "cpu" else 1
    chunk = chunk_size or default_chunk_size(h.shape[0], h.shape[1], weight.shape[0], min_chunk)
    if not torch.is_grad_enabled():
        # needs_input_grad ignores no_grad: detach so evaluation computes no gradients.
        h, weight, bias = h.detach(), weight.detach(), bias.detach() if bias is not None else None
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, t, ignore_index, chunk, reduction, _compute_dtype(hidden))


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Next-token loss from the last hidden states ``[batch, seq, hidden]`` and ``labels [batch, seq]``.

    Position ``t`` predicts ``labels[:, t + 1]``; the last position has no target. The
    labels are shifted (padded with ``ignore_index``), not the hidden states, so no
    ``[tokens, hidden]`` copy is made. Equal to this project's ``LlamaForCausalLM`` loss
    and to transformers' ``ForCausalLMLoss`` (with ``num_items_in_batch``: the sum
    divided by it, as transformers does under gradient accumulation).
    """
    shifted = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = chunked_linear_cross_entropy(
        hidden, weight, shifted, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size,
        reduction=reduction, backend=backend,
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss
