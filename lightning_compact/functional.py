"""``compact_linear``: a linear map that saves ``x·P`` instead of ``x`` for the backward pass.

Forward is exactly ``F.linear``. Backward:

* ``∂L/∂x = ∂L/∂o · W`` and ``∂L/∂b = Σ ∂L/∂o`` are exact (they never needed ``x``);
* the weight gradient ``Gᵀ = (∂L/∂o)ᵀ x`` (``[m, n]`` in ``nn.Linear``'s layout) is
  computed in the compressed space, ``Ĝ = (∂L/∂o)ᵀ (x P)`` (``[m, r]``), and then
  decompressed to ``Ĝ Pᵀ``. Since ``E[P Pᵀ] = I`` the result is unbiased.

``P`` is rebuilt from ``seed`` in the backward (see :mod:`lightning_compact.projection`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from lightning_compact.projection import Projection, make_projection

__all__ = ["compact_linear", "observe_compressed_inputs"]

# Called as ``observer(input, compressed)`` for every compact_linear forward that saves
# a compressed input; memory reports use it to know what the plain layer would have saved.
_OBSERVERS: list[Callable[[torch.Tensor, torch.Tensor], None]] = []


@contextlib.contextmanager
def observe_compressed_inputs(observer: Callable[[torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, call ``observer(input, input @ P)`` on each compressing forward."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


class _CompActLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, rank: int, seed: int, projection: Projection):  # type: ignore[override]
        output = F.linear(input, weight, bias)
        needs_input_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        in_features = weight.shape[1]
        compressed = None
        if needs_weight_grad:
            proj = make_projection(in_features, rank, seed, projection=projection, device=input.device, dtype=input.dtype)
            compressed = input.reshape(-1, in_features) @ proj
            for observer in _OBSERVERS:
                observer(input, compressed)
        # Save only what each gradient needs: W for ∂L/∂x, x·P for ∂L/∂W.
        ctx.save_for_backward(compressed, weight if needs_input_grad else None)
        ctx.input_shape = input.shape
        ctx.has_bias = bias is not None
        ctx.rank, ctx.seed, ctx.projection = rank, seed, projection
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        compressed, weight = ctx.saved_tensors
        out_features = grad_output.shape[-1]
        grad_2d = grad_output.reshape(-1, out_features)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Autocast is off in a custom backward: match dtypes explicitly (e.g. bf16 grad, fp32 W).
            grad_input = (grad_2d @ weight.to(grad_2d.dtype)).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            in_features = ctx.input_shape[-1]
            proj = make_projection(
                in_features, ctx.rank, ctx.seed, projection=ctx.projection, device=compressed.device, dtype=compressed.dtype
            )
            grad_compressed = grad_2d.to(compressed.dtype).t() @ compressed  # Ĝ: [m, r]
            grad_weight = grad_compressed @ proj.t()  # [m, n]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None


def compact_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    rank: int,
    seed: int,
    projection: Projection = "gaussian",
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` that keeps only ``input @ P`` (rank ``rank``) for the backward.

    Args:
        input: ``[..., in_features]``.
        weight: ``[out_features, in_features]``.
        bias: ``[out_features]`` or ``None``.
        rank: r, columns of the projection (``>= 1``).
        seed: selects ``P``; the backward rebuilds the same ``P`` from it.
        projection: ``"gaussian"`` or ``"rademacher"``.

    Returns:
        The same output as ``F.linear``. ``weight.grad`` receives an unbiased estimate
        of the true weight gradient; input and bias gradients are exact. If ``weight``
        does not require grad nothing is computed or saved for it.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        # Mirror autocast's rule for F.linear (run in the lower precision), then keep
        # autocast out of the Function so forward and backward see the same dtypes.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _CompActLinearFunction.apply(input, weight, bias, rank, seed, projection)
    return _CompActLinearFunction.apply(input, weight, bias, rank, seed, projection)
