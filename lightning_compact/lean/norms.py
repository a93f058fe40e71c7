"""RMSNorm and LayerNorm that keep only their input for backward.

Hugging Face's ``LlamaRMSNorm`` (and this project's ``RMSNorm``) upcast to float32 and
autograd then keeps the float32 input *and* the float32 normalised tensor: two or
three activation-sized tensors per norm. Here the backward keeps the input in its own
dtype plus the per-row ``1/rms`` (one float per token) and recomputes the elementwise
normalisation; no matmul is involved, so nothing expensive is recomputed.

The forward performs exactly the reference's operations, so outputs are bitwise equal;
the backward mirrors its roundings (the gradient of the normalised tensor is rounded
to the input dtype, as the reference's cast back does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LeanLayerNorm", "LeanRMSNorm", "layer_norm", "rms_norm"]

# Device types whose autocast runs layer_norm in float32 (CUDA's fp32 list has it;
# CPU autocast leaves it in the input dtype, checked in the tests).
_AUTOCAST_FP32_LAYER_NORM = frozenset({"cuda"})


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        # Same ops as the reference: fp32 statistics (float64 stays float64), normalised
        # tensor cast back, weight applied last.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = (x32 * rstd).to(x.dtype)
        if weight is not None:
            out = weight * out
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        xhat32 = x.to(rstd.dtype) * rstd
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            xhat = xhat32.to(x.dtype)
            grad_weight = (grad_out.to(rstd.dtype) * xhat.to(rstd.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad_out * weight if weight is not None else grad_out
            # The reference casts the normalised tensor to x.dtype: its gradient is rounded there too.
            g = g.to(x.dtype).to(rstd.dtype)
            grad_x = (rstd * (g - xhat32 * (g * xhat32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``, saving only ``x`` and ``1/rms``.

    Equal to Hugging Face's ``LlamaRMSNorm`` (also Mistral's, Qwen2's and this project's
    ``RMSNorm``) in output and gradients; a float64 input is normalised in float64
    (those modules round it through float32).
    """
    return _RMSNorm.apply(x, weight, eps)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        normalized_shape: tuple[int, ...],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        upcast: bool,
    ) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xc, w, b = (x.float(), _f32(weight), _f32(bias)) if upcast else (x, weight, bias)
            out, mean, rstd = torch.ops.aten.native_layer_norm(xc, normalized_shape, w, b, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.upcast = normalized_shape, upcast
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        xc, w, b = (x.float(), _f32(weight), _f32(bias)) if ctx.upcast else (x, weight, bias)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(grad_out, xc, ctx.normalized_shape, mean, rstd, w, b, mask)
        # Under autocast the reference's casts (x, weight, bias to fp32) send gradients back in each source dtype.
        gx = gx.to(x.dtype) if gx is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gx, None, gw, gb, None, None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` that saves its input in its own dtype, never an upcast copy.

    ``F.layer_norm`` itself saves only its input and the row statistics; the gain is
    under CUDA autocast, which upcasts a low-precision input to float32 and saves that
    float32 copy (twice the bytes). Outputs and dtypes are those of ``F.layer_norm``.
    """
    upcast = x.device.type in _AUTOCAST_FP32_LAYER_NORM and torch.is_autocast_enabled(x.device.type)
    return _LayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps, upcast)


class LeanRMSNorm(nn.Module):
    """RMSNorm (Hugging Face LLaMA semantics) through :func:`rms_norm`.

    ``from_module`` takes over the Parameter of a ``LlamaRMSNorm``-like module, so
    optimizers and ``state_dict`` keys (``weight``) are unaffected.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    @classmethod
    def from_module(cls, module: nn.Module) -> LeanRMSNorm:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        new = cls(module.weight.shape[-1], eps).to("meta")
        new.weight = module.weight
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LeanLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` through :func:`layer_norm` (still an ``nn.LayerNorm`` for isinstance checks)."""

    @classmethod
    def from_module(cls, module: nn.LayerNorm) -> LeanLayerNorm:
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
