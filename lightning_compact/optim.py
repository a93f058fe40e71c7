"""``CompActAdamW``: AdamW whose moments live in CompAct's compressed gradient space.

For a weight in compressed-gradient mode (``nn.Linear`` layout ``W: [m, n]``, see
:meth:`~lightning_compact.layers.CompActLinear.set_compress_grad`) the gradient is
``Ĝ = G P`` (``[m, r]``, kept in ``weight.compressed_grad``), and so are both moments::

    M ← β₁ M + (1 − β₁) Ĝ            V ← β₂ V + (1 − β₂) Ĝ²
    N = M̂ / (√V̂ + ε)                  (M̂, V̂: bias-corrected)
    W ← W (1 − lr·λ) − lr·α · N Pᵀ     (λ: weight decay, applied to the full W)

with ``P`` rebuilt from the seed the gradient was computed with. The decompression
``N Pᵀ`` is fused into the in-place update (``addmm_``), so no ``[m, n]`` gradient or
moment ever exists. When the projection is resampled the moments are carried over as
they are (the paper does the same). Every other parameter gets plain AdamW.

The state is only tensors and numbers (``step``, ``exp_avg``, ``exp_avg_sq`` per
parameter; ``scale`` per group), so checkpoints load with ``torch.load(weights_only=True)``.

This module knows nothing of Lightning; the callback uses :meth:`CompActAdamW.from_optimizer`
and :func:`rebind_lr_scheduler` to swap it in for a user's Adam/AdamW.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_compact.functional import CompressedGrad
from lightning_compact.layers import compressed_grad_of

__all__ = [
    "DEFAULT_SCALE",
    "CompActAdamW",
    "clip_grad_norm_",
    "clip_grad_value_",
    "rebind_lr_scheduler",
    "unsupported_reason",
]

# α, the scale of the decompressed update. With P ~ N(0, 1/r) the entries of N Pᵀ have
# the magnitude of a full-rank Adam step, so α = 1 keeps the meaning of a learning rate
# tuned for plain AdamW. The paper instead raises lr and shrinks α: 0.25 for pretraining
# (at lr 0.01), and for RoBERTa fine-tuning α = 2 at r = 8 and α = 4 at r = 4.
DEFAULT_SCALE: float = 1.0

# Flags of torch's Adam/AdamW that change nothing in CompActAdamW's arithmetic and are
# dropped when a torch optimizer's groups are carried over.
_TORCH_ONLY_KEYS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def _tensors_with_grad(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Every gradient the parameters hold: ``.grad`` and compressed ``Ĝ`` alike."""
    grads = []
    for p in params:
        if p.grad is not None:
            grads.append(p.grad)
        sink = compressed_grad_of(p)
        if sink is not None and sink.value is not None:
            grads.append(sink.value)
    return grads


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also counts and scales compressed gradients.

    The norm is taken over every ``.grad`` and every compressed ``Ĝ`` (not its
    decompression ``Ĝ Pᵀ``): ``Ĝ`` is what the optimizer consumes, and since
    ``E[P Pᵀ] = I`` its squared norm is an unbiased estimate of the true gradient's,
    ``E‖G P‖² = ‖G‖²``, so a threshold tuned without CompAct keeps its meaning. The
    decompressed gradient's norm would be inflated by the projection noise,
    ``E‖G P Pᵀ‖² ≈ (1 + (n+1)/r)·‖G‖²``, and clip far more often.

    Returns:
        The total norm before clipping (a 0-d tensor).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = _tensors_with_grad(params)
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    # Same coefficient as torch's: no division by zero, never scaled up.
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total


@torch.no_grad()
def clip_grad_value_(parameters: Iterable[torch.Tensor] | torch.Tensor, clip_value: float) -> None:
    """Clamp every ``.grad`` and compressed ``Ĝ`` to ``[-clip_value, clip_value]``.

    For a compressed weight this bounds the entries of ``Ĝ``, not of the full gradient
    (the two differ: an entry of ``Ĝ`` mixes ``n`` entries of ``G``).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for g in _tensors_with_grad(params):
        g.clamp_(-clip_value, clip_value)


class CompActAdamW(Optimizer):
    """AdamW with compressed moments for weights in compressed-gradient mode.

    Parameters whose weight carries a compressed gradient (set up by
    :class:`~lightning_compact.layers.CompActLinear` in ``compress_grad`` mode) keep
    ``exp_avg``/``exp_avg_sq`` of shape ``[out_features, rank]`` and are updated with
    ``W ← W(1 − lr·λ) − lr·α·N Pᵀ``; all others follow ``torch.optim.AdamW`` exactly
    (same operations in the same order). Works with any LR scheduler; ``lr``, ``betas``,
    ``eps``, ``weight_decay`` and ``scale`` can differ per parameter group.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate (a float).
        betas: ``(β₁, β₂)``.
        eps: added to ``√V̂``.
        weight_decay: decoupled weight decay λ, applied to the full weight.
        scale: α, multiplies the decompressed update of compressed weights only.
            Default :data:`DEFAULT_SCALE` (1.0: a plain-AdamW learning rate keeps its
            meaning). The paper uses 0.25 for pretraining at lr 0.01, and 2 (r = 8) or
            4 (r = 4) for fine-tuning.

    Example::

        convert_to_compact(model, config=CompActConfig(rank=0.25, compress_grad=True))
        opt = CompActAdamW(model.parameters(), lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        scale: float = DEFAULT_SCALE,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"Invalid scale (α): {scale}; must be a positive number")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, scale=float(scale))
        super().__init__(params, defaults)

    @classmethod
    def from_optimizer(cls, optimizer: Optimizer, *, scale: float = DEFAULT_SCALE) -> CompActAdamW:
        """A ``CompActAdamW`` with ``optimizer``'s parameter groups and hyperparameters.

        Group entries other than torch's Adam flags (e.g. a scheduler's ``initial_lr``,
        or user keys) are carried over; groups without a ``scale`` get ``scale``.

        Raises:
            ValueError: when ``optimizer`` has no compressed counterpart (see
                :func:`unsupported_reason`).
        """
        reason = unsupported_reason(optimizer)
        if reason is not None:
            raise ValueError(reason)
        groups = []
        for group in optimizer.param_groups:
            group = {k: v for k, v in group.items() if k not in _TORCH_ONLY_KEYS}
            group["params"] = list(group["params"])
            group.setdefault("scale", float(scale))
            groups.append(group)
        d = optimizer.defaults
        return cls(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"], scale=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step; compressed weights are updated from their compressed gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, sinks = [], [], []
            for p in group["params"]:
                sink = compressed_grad_of(p)
                if sink is not None and sink.value is not None:
                    if p.grad is not None:
                        raise RuntimeError(
                            "a compressed weight also received a full-size .grad (is it used outside its "
                            "CompActLinear, e.g. tied to another layer?); exclude that layer from CompAct"
                        )
                    grad, compressed_by = sink.value, sink
                elif p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("CompActAdamW does not support sparse gradients")
                    grad, compressed_by = p.grad, None
                else:
                    continue
                params.append(p)
                grads.append(grad)
                sinks.append(compressed_by)
            if params:
                self._update_group(group, params, grads, sinks)
        return loss

    def _state_for(self, p: torch.Tensor, grad: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        if state["exp_avg"].shape != grad.shape:
            raise RuntimeError(
                f"optimizer moments of shape {tuple(state['exp_avg'].shape)} meet a gradient of shape "
                f"{tuple(grad.shape)}: the parameter switched between compressed and full-size gradients, "
                "or its rank changed"
            )
        return state

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        sinks: list[CompressedGrad | None],
    ) -> None:
        # Multi-tensor (foreach) kernels: one launch per operation for the whole group, not
        # one per parameter, since small per-parameter launches made the step host-bound.
        # Each operation and its order are those of torch's single-tensor AdamW, so
        # uncompressed parameters get bit-identical results.
        lr, (beta1, beta2), eps, weight_decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        states = [self._state_for(p, g) for p, g in zip(params, grads)]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        steps = []
        for st in states:
            st["step"] += 1
            steps.append(st["step"].item())
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        step_sizes = [lr / (1 - beta1**step) for step in steps]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2**step) ** 0.5 for step in steps])
        torch._foreach_add_(denoms, eps)

        full = [i for i, sink in enumerate(sinks) if sink is None]
        if full:
            torch._foreach_addcdiv_(
                [params[i] for i in full],
                [exp_avgs[i] for i in full],
                [denoms[i] for i in full],
                [-step_sizes[i] for i in full],
            )
        compressed = [i for i, sink in enumerate(sinks) if sink is not None]
        if compressed:
            updates = torch._foreach_div([exp_avgs[i] for i in compressed], [denoms[i] for i in compressed])
            for i, update in zip(compressed, updates):
                p = params[i]
                proj = sinks[i].projection_matrix(device=p.device, dtype=p.dtype)  # [n, r], the gradient's own P
                # W −= lr·α/bc1 · (M / denom) Pᵀ, decompressed inside the matmul: no [m, n] temporary.
                p.addmm_(update, proj.t(), alpha=-step_sizes[i] * group["scale"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or free) every ``.grad`` and every compressed gradient."""
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                sink = compressed_grad_of(p)
                if sink is not None:
                    sink.zero_(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip all this optimizer's gradients, compressed ones included, by their joint norm.

        See :func:`clip_grad_norm_` for which norm is used and why.
        """
        return clip_grad_norm_([p for g in self.param_groups for p in g["params"]], max_norm, norm_type)

    def clip_grad_value_(self, clip_value: float) -> None:
        """Clamp all this optimizer's gradients, compressed ones included (see :func:`clip_grad_value_`)."""
        clip_grad_value_([p for g in self.param_groups for p in g["params"]], clip_value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then check that each moment has the shape this parameter's gradient mode needs."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                moments = self.state.get(p, {}).get("exp_avg")
                if moments is None:
                    continue
                sink = compressed_grad_of(p)
                expected = (p.shape[0], sink.rank) if sink is not None else tuple(p.shape)
                if tuple(moments.shape) != expected:
                    raise ValueError(
                        f"The checkpoint's optimizer moments have shape {tuple(moments.shape)} where this run needs "
                        f"{expected}: it was saved with another CompAct mode or rank. Resume with the same settings."
                    )


def unsupported_reason(optimizer: Optimizer) -> str | None:
    """Why ``optimizer`` cannot be replaced by an equivalent ``CompActAdamW``, or ``None`` if it can."""
    kind = type(optimizer)
    if kind not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{kind.__name__} has no compressed counterpart (only torch.optim.Adam and AdamW do)"
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize", "differentiable", "capturable"):
            if group.get(flag):
                return f"{kind.__name__}({flag}=True) is not supported by CompActAdamW"
        decoupled = kind is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        if group["weight_decay"] and not decoupled:
            return (
                "Adam's weight_decay is an L2 term added to the gradient, which has no compressed form; "
                "use AdamW (decoupled weight decay)"
            )
    return None


def _track_step_calls(optimizer: Optimizer) -> None:
    """Mark ``optimizer.step`` the way a torch LR scheduler does at construction.

    A scheduler checks on its first step that its optimizer's ``step`` carries this
    mark and has been called, and warns otherwise.
    """
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    opt_ref, step = weakref.ref(optimizer), type(optimizer).step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def rebind_lr_scheduler(scheduler: Any, old: Optimizer, new: Optimizer) -> None:
    """Point ``scheduler`` (and the schedulers it chains) from ``old`` to ``new``.

    ``new`` must hold ``old``'s param groups with their current ``lr`` and
    ``initial_lr``, so ``base_lrs``, ``last_epoch`` and ``get_last_lr()`` stay valid.
    """
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        if hasattr(old.step, "_wrapped_by_lr_sched"):
            _track_step_calls(new)
            new._opt_called = getattr(old, "_opt_called", False)  # type: ignore[attr-defined]
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        rebind_lr_scheduler(child, old, new)

