"""SwiGLU and GELU that keep only their inputs for backward.

``F.silu(gate) * up`` keeps ``gate``, ``silu(gate)`` and ``up``: the middle one is
recomputed here from ``gate`` (elementwise), a third less to store per MLP.
``F.gelu`` already keeps only its input; the win for GELU is swapping Python-composed
GELUs such as transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``: ``0.5 * x *
(1 + tanh(...))`` keeps about six activation-sized tensors) for the native kernel,
which computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeanGELU", "LeanSwiGLUMLP", "gelu", "swiglu"]


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        # The reference's own backward ops, in its dtypes: bitwise-equal gradients.
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad_out * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, saving only ``gate`` and ``up``."""
    return _SwiGLU.apply(gate, up)


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad_out, x, approximate=ctx.approximate), None


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate)`` (``"none"``: erf; ``"tanh"``: GPT-2's ``gelu_new``), saving only ``x``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu(approximate={approximate!r}): must be 'none' or 'tanh'")
    return _GELU.apply(x, approximate)


class LeanGELU(nn.Module):
    """GELU module through :func:`gelu`; replaces ``nn.GELU`` and transformers' GELU activations."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu(input, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class LeanSwiGLUMLP(nn.Module):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))`` over the linears of an existing MLP.

    The three linears stay child modules under their names, so ``state_dict`` keys,
    optimizers and CompAct's conversion (which may swap them before or after) see the
    same layers.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    @classmethod
    def from_module(cls, module: nn.Module) -> LeanSwiGLUMLP:
        return cls(module.gate_proj, module.up_proj, module.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
