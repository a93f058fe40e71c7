"""``CompActAdamW``: AdamW whose moments live in CompAct's compressed gradient space.

For a layer in compressed gradient mode (``nn.Linear`` layout ``W: [m, n]``, see
:meth:`~lightning_compact.layers.CompActLinear.set_grad_mode`) the compressed gradient
``Ĝ = G P`` (``[m, r]``) is the ordinary ``.grad`` of the layer's ``weight_delta``
Parameter ``δ``, and both moments have ``δ``'s shape::

    M ← β₁ M + (1 − β₁) Ĝ            V ← β₂ V + (1 − β₂) Ĝ²
    N = M̂ / (√V̂ + ε)                  (M̂, V̂: bias-corrected)
    W ← W (1 − lr·λ) − lr·α · N Pᵀ     (λ: weight decay, applied to the full W)

with the layer's current ``P``. The decompression ``N Pᵀ`` is fused into the in-place
update (``addmm_``), so no ``[m, n]`` gradient or moment ever exists; ``δ`` itself stays
zero. The hyperparameters are those of ``δ``'s parameter group. When the projection is
resampled the moments are carried over as they are (the paper does the same), unless
``moment_carry=True`` (beyond the paper, off by default): then at the first step of a new
window the first moment is moved into the new basis, ``M ← M (P_oldᵀP_old)⁻¹ P_oldᵀ P_new``
(the least-squares full-size ``M (P_oldᵀP_old)⁻¹ P_oldᵀ`` compressed with the new ``P``),
and the second moment keeps its basis-invariant part, each row's mean. Every other
parameter gets plain AdamW.

That is the paper's rule, ``update_rule="adam"``. Beyond the paper, and the default since 0.3
(``"channel"``; see :data:`DEFAULT_UPDATE_RULE` for the evidence), a group's rule may instead
use the moments only for a scale, as APOLLO (arXiv 2412.05270) does, and step along the
compressed gradient itself::

    "channel":  U_i = s_i Ĝ_i,  s_i = ‖N_i‖ / ‖Ĝ_i‖  (one scale per output channel i)
    "tensor":   U   = s Ĝ,      s   = ‖N‖_F / ‖Ĝ‖_F  (one per weight, APOLLO-Mini-like)
    W ← W (1 − lr·λ) − lr·α · U Pᵀ

Both norms are r-space quantities and ``U Pᵀ`` is decompressed inside the same fused
update, so these rules allocate nothing of size ``[m, n]`` either. Since ``‖U_i‖ = ‖N_i‖``
and ``Pᵀ`` acts alike on both, a row moves by as much as under the Adam rule: the same
``lr`` and α keep their meaning. APOLLO's norm-growth limiter (from Fira) comes with them:
``‖U_t‖_F ≤ γ ‖U_{t−1}‖_F`` with γ = 1.01, one float per weight (``update_norm`` in its
state). It acts on the r-space norm (``‖U Pᵀ‖ ≈ √(n/r)·‖U‖`` whatever ``U``, so that
ratio is the decompressed one's, up to ``P``'s fluctuation), which for both rules is
``‖N‖_F``: no ``[m, n]`` norm is computed. Why keep it: on the quickstart-sized model
(150 steps, one seed, benchmarks/results/update_rules/) ``"channel"``'s best loss with it
(2.088 at lr 8e-3) beat its best without (2.130 at lr 4e-3); it acts much like a lower
early learning rate, so these rules want about 2x the Adam rule's lr. Under FSDP2 the
per-row norms are local to a row shard; the tensor-wise norms and the limiter's ``‖N‖_F``
are summed over the shards (one all-reduce of at most two scalars per weight and step).

Because ``Ĝ`` is a ``.grad``, torch's ``clip_grad_norm_`` (and Lightning's clipping)
already count it: ``E‖G P‖² = ‖G‖²``, so a threshold tuned without CompAct keeps its
meaning (the decompressed ``‖Ĝ Pᵀ‖`` would carry ~``(n+1)/r`` times more energy).

The state is only tensors and numbers (``step``, ``exp_avg``, ``exp_avg_sq`` per
parameter, ``update_norm`` for the ``"channel"``/``"tensor"`` rules, plus with ``moment_carry`` the int32 hash keys ``projection_keys`` of the
``P`` the moments are in; ``scale`` per group), so checkpoints load with
``torch.load(weights_only=True)``.

This module knows nothing of Lightning; :class:`~lightning_compact.controller.CompAct`
uses :meth:`CompActAdamW.from_optimizer` and :func:`rebind_lr_scheduler` to swap it in
for a user's Adam/AdamW.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lightning_compact.distributed import DTensor, add_decompressed_unguarded_, is_dtensor, local_shard
from lightning_compact.layers import CompActLinear, delta_owner, live_deltas
from lightning_compact.projection import build_projection, seed_keys

__all__ = [
    "DEFAULT_SCALE",
    "DEFAULT_UPDATE_RULE",
    "PENDING_BASIS",
    "UPDATE_RULES",
    "CompActAdamW",
    "compress_moments_",
    "decompress_moments_",
    "put_deltas_in_place_of_weights",
    "put_weights_back",
    "rebind_lr_scheduler",
    "unsupported_reason",
]

# α, the scale of the decompressed update. With P ~ N(0, 1/r) the entries of N Pᵀ have
# the magnitude of a full-rank Adam step, so α = 1 keeps the meaning of a learning rate
# tuned for plain AdamW. The paper instead raises lr and shrinks α: 0.25 for pretraining
# (at lr 0.01), and for RoBERTa fine-tuning α = 2 at r = 8 and α = 4 at r = 4.
DEFAULT_SCALE: float = 1.0

# How the r-space Adam direction N becomes the update of a compressed weight (see CompActAdamW):
# "adam" (the paper's): N Pᵀ. "channel" (APOLLO-style, beyond the paper): Ĝ Pᵀ with each row
# rescaled to the norm of N's row. "tensor" (APOLLO-Mini-like): one such scale for the whole tensor.
# The default is "channel": with the attention output converted too, it is the only variant that
# came within 1% of GaLore (and ahead of APOLLO) on benchmarks/cpu/peers.py at r = n/4 and n/8, 3 seeds
# each, and it removed the quickstart's stalled seeds (benchmarks/RESULTS.md, "Quality against the peers").
UPDATE_RULES: tuple[str, ...] = ("adam", "channel", "tensor")
DEFAULT_UPDATE_RULE: str = "channel"

# Flags of torch's Adam/AdamW that change nothing in CompActAdamW's arithmetic and are
# dropped when a torch optimizer's groups are carried over.
_TORCH_ONLY_KEYS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


class CompActAdamW(Optimizer):
    """AdamW with compressed moments for weights in compressed-gradient mode.

    The ``weight_delta`` of a :class:`~lightning_compact.layers.CompActLinear` in
    compressed mode keeps ``exp_avg``/``exp_avg_sq`` of shape ``[out_features, rank]``,
    and its layer's weight is updated with ``W ← W(1 − lr·λ) − lr·α·N Pᵀ`` (the weight
    itself may be in the optimizer too: it has no ``.grad`` and is skipped). All other
    parameters follow ``torch.optim.AdamW`` exactly
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
        update_rule: the group default of how compressed weights step (see :data:`UPDATE_RULES`
            and the module docstring): ``"channel"`` (default: ``Ĝ Pᵀ`` with each output
            channel rescaled to ``‖N_i‖/‖Ĝ_i‖``, APOLLO-style), ``"adam"`` (the paper's
            ``N Pᵀ``) or ``"tensor"`` (one scale ``‖N‖/‖Ĝ‖`` per weight). The first and last
            are beyond the paper and add APOLLO's norm-growth limiter (γ = 1.01) and one float
            per weight of state. Parameters outside CompAct follow AdamW whatever the rule.
        moment_carry: beyond the paper, off by default (the paper keeps the moments as
            they are when ``P`` is resampled). When on, at the first step after a
            resample each compressed first moment is moved into the new basis,
            ``M ← M (P_oldᵀP_old)⁻¹ P_oldᵀ P_new``, and each row of the second moment is
            set to its mean (its basis-invariant part); ``P_old`` is rebuilt from the
            hash keys kept in the state (an ``n × r²`` product and an ``r × r`` solve
            per layer and window, in float64). ``CompActCallback(moment_carry=True)`` and
            ``CompAct(moment_carry=True)`` turn it on in the optimizer they swap in.

    Example::

        convert_to_compact(model, config=CompActConfig(rank=0.25, grad_mode="compressed"))
        opt = CompActAdamW(model.parameters(), lr=1e-3)  # model.parameters() holds each δ
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
        moment_carry: bool = False,
        update_rule: str = DEFAULT_UPDATE_RULE,
    ) -> None:
        _check_update_rule(update_rule)
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
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, scale=float(scale), update_rule=update_rule
        )
        super().__init__(params, defaults)
        self.moment_carry = bool(moment_carry)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its ``update_rule`` (given or the default) is validated."""
        super().add_param_group(param_group)
        _check_update_rule(self.param_groups[-1]["update_rule"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict takes the groups' settings from the checkpoint; one saved before
        # update_rule existed gets this optimizer's default (torch does the same for new flags).
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("update_rule", self.defaults.get("update_rule", DEFAULT_UPDATE_RULE))

    @classmethod
    def from_optimizer(
        cls,
        optimizer: Optimizer,
        *,
        scale: float = DEFAULT_SCALE,
        layers: Iterable[CompActLinear] = (),
        moment_carry: bool = False,
        update_rule: str = DEFAULT_UPDATE_RULE,
    ) -> CompActAdamW:
        """A ``CompActAdamW`` with ``optimizer``'s parameter groups and hyperparameters.

        Group entries other than torch's Adam flags (e.g. a scheduler's ``initial_lr``,
        or user keys) are carried over; groups without a ``scale`` get ``scale``. Each of
        ``layers`` in compressed mode has its ``weight_delta`` take its weight's place
        (see :func:`put_deltas_in_place_of_weights`). ``moment_carry`` is the constructor's;
        groups without an ``update_rule`` get ``update_rule`` (see :data:`UPDATE_RULES`).

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
            groups.append(group)
        put_deltas_in_place_of_weights(groups, layers)
        _check_update_rule(update_rule)
        for group in groups:
            group.setdefault("scale", float(scale))
            group.setdefault("update_rule", update_rule)
        d = optimizer.defaults
        return cls(
            groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"], scale=scale,
            moment_carry=moment_carry, update_rule=update_rule,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step; compressed layers' weights are updated from their ``δ.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, targets, layers = [], [], [], []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("CompActAdamW does not support sparse gradients")
                layer = delta_owner(p)
                target = p
                if layer is not None:
                    target = layer.weight
                    if target.grad is not None:
                        raise RuntimeError(
                            f"{layer.layer_name}: its weight received a full-size .grad besides the compressed one (is "
                            "it used outside its CompActLinear, e.g. tied to an embedding?); exclude that layer from CompAct"
                        )
                elif PENDING_BASIS in self.state.get(p, ()):
                    decompress_moments_(self.state[p], p)  # a weight restored after CompAct (see put_weights_back)
                elif p.numel() > 1 and 0 in p.stride():
                    # A broadcast zero: a weight_delta whose layer is gone (torch's in-place ops would fail
                    # with "more than one element ... refers to a single memory location").
                    raise RuntimeError(
                        f"A parameter of shape {tuple(p.shape)} is a CompAct weight_delta whose layer no longer "
                        "exists (the model it belonged to was deleted or replaced, e.g. by a copy): build the "
                        "optimizer from the parameters of the model you train (CompAct.optimizer, or "
                        "CompActCallback, does this)"
                    )
                params.append(p)
                grads.append(grad)
                targets.append(target)
                layers.append(layer)
            if params and self.moment_carry:
                self._carry_moments(params, layers)
            if params:
                self._update_group(group, params, grads, targets, layers)
        return loss

    def _carry_moments(self, params: list[torch.Tensor], layers: list[CompActLinear | None]) -> None:
        """``moment_carry``: move the compressed moments into the current window's basis.

        Each ``δ``'s state keeps the hash keys of the ``P`` its moments were made with
        (``projection_keys``, int32 ``[2]`` on the host, so the check costs no device
        sync); when they differ from the keys of the layer's current seed (a resample,
        or a resume into a new window), ``P_old`` is rebuilt from them and
        ``M ← M (P_oldᵀP_old)⁻¹ P_oldᵀ P_new``, ``V ← rowmean(V)``. Rows are independent,
        so row shards (``to_local()``) are transformed alone. A state without keys (the
        first step, or a checkpoint saved without ``moment_carry``) only records them.
        """
        transforms: dict[tuple[Any, ...], torch.Tensor] = {}  # siblings sharing one P share the r x r matrix
        for p, layer in zip(params, layers):
            if layer is None:
                continue
            state = self._state_for(p)
            current = seed_keys(layer.seed)
            old = state.get("projection_keys")
            if old is not None and tuple(old.tolist()) != current:
                key = (tuple(old.tolist()), current, layer.in_features, layer.rank, layer.projection)
                if key not in transforms:
                    device = layer.projection_keys.device
                    transforms[key] = _basis_change(
                        layer.in_features, layer.rank, old.to(device), torch.tensor(current, dtype=torch.int32,
                        device=device), layer.projection,
                    )
                t = transforms[key]
                m, v = local_shard(state["exp_avg"]), local_shard(state["exp_avg_sq"])
                m.copy_((m.to(t.dtype) @ t.to(m.device)).to(m.dtype))
                v.copy_(v.mean(dim=-1, keepdim=True).expand_as(v))
            state["projection_keys"] = torch.tensor(current, dtype=torch.int32)

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        targets: list[torch.Tensor],
        layers: list[CompActLinear | None],
    ) -> None:
        # Multi-tensor (foreach) kernels: one launch per operation for the whole group, not
        # one per parameter, since small per-parameter launches made the step host-bound.
        # Each operation and its order are those of torch's single-tensor AdamW, so
        # uncompressed parameters get bit-identical results.
        lr, (beta1, beta2), eps, weight_decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        states = [self._state_for(p) for p in params]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        step_counts = [st["step"] for st in states]
        torch._foreach_add_(step_counts, 1.0)
        steps = [count.item() for count in step_counts]  # host tensors: no device sync
        if weight_decay != 0:
            torch._foreach_mul_(targets, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        step_sizes = [lr / (1 - beta1**step) for step in steps]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2**step) ** 0.5 for step in steps])
        torch._foreach_add_(denoms, eps)

        full = [i for i, layer in enumerate(layers) if layer is None]
        if full:
            torch._foreach_addcdiv_(
                [targets[i] for i in full],
                [exp_avgs[i] for i in full],
                [denoms[i] for i in full],
                [-step_sizes[i] for i in full],
            )
        compressed = [i for i, layer in enumerate(layers) if layer is not None]
        if compressed:
            rule = group["update_rule"]
            updates = list(torch._foreach_div([exp_avgs[i] for i in compressed], [denoms[i] for i in compressed]))
            pending: Iterable[tuple[int, torch.Tensor]] = enumerate(updates)
            if rule != "adam":
                # Ĝ rescaled (per row or per tensor) to the norm of M / denom = bc1·N; the
                # coefficient lr·α/bc1 below then makes each rescaled row's norm lr·α·‖N_i‖.
                # A chunk of layers at a time, each applied as it comes (see _rescaled_gradients).
                pending = _rescaled_gradients(
                    updates, [grads[i] for i in compressed], rule, [states[i] for i in compressed],
                    [1 - beta1 ** steps[i] for i in compressed],
                    self.__dict__.setdefault("_row_owners", {}),  # not in __getstate__: rebuilt after a pickle
                )
            scale = group["scale"]
            for k, update in pending:
                i = compressed[k]
                w = layers[i].linear_weight()  # [out, in], a view where the Parameter is stored transposed
                proj = layers[i].projection_matrix(dtype=w.dtype)  # [n, r], the P the gradient was made with
                # W −= lr·α/bc1 · U Pᵀ, decompressed inside the matmul: no [m, n] temporary.
                add_decompressed_unguarded_(w, update, proj, alpha=-step_sizes[i] * scale)  # step() is no_grad already

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then check that each moment has its parameter's shape (same mode and rank as when saved).

        Group entries the checkpoint lacks (``scale``, ``update_rule``: a checkpoint of torch's
        AdamW, resumed with CompAct) keep this optimizer's values.
        """
        before = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for mine, group in zip(before, self.param_groups):
            for key, value in mine.items():
                group.setdefault(key, value)
        for index, p in enumerate(p for group in self.param_groups for p in group["params"]):
            state = self.state.get(p, {})
            moments = state.get("exp_avg")
            if moments is None or moments.shape == p.shape or PENDING_BASIS in state:
                continue
            layer = delta_owner(p)
            what = f"the compressed gradient of {layer.layer_name!r}" if layer is not None else "a parameter"
            raise ValueError(
                f"The checkpoint's optimizer state for parameter #{index} ({what}, shape {tuple(p.shape)}) has moments "
                f"of shape {tuple(moments.shape)}: the checkpoint was saved with another CompAct rank, or its optimizer "
                "listed the parameters in another order. Resume with the rank it was saved with; a switch between "
                "CompAct and plain training is converted by CompActCallback (or CompAct.convert_optimizer_state)."
            )


def _check_update_rule(update_rule: object) -> None:
    if update_rule not in UPDATE_RULES:
        raise ValueError(
            f"update_rule={update_rule!r}: must be one of {UPDATE_RULES} ('adam' is the paper's update N Pᵀ; "
            "'channel' and 'tensor' rescale Ĝ Pᵀ per output channel or per tensor, APOLLO-style)"
        )


# APOLLO's norm-growth limiter (from Fira): the r-space update's norm may grow by at most this
# factor per step (None: off). See CompActAdamW's docstring for what it acts on.
_NORM_GROWTH_LIMIT: float | None = 1.01


# The all-reduce of the norms below. memory.sharded swaps in a staged one while it measures a
# real gloo step (see untracked_gloo_all_reduce), so that no tracked buffer is freed on gloo's thread.
def _all_reduce(tensor: torch.Tensor, group: Any = None) -> None:
    dist.all_reduce(tensor, group=group)


def _sum_over_shards(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum ``local`` (per-shard partial sums of ``like``'s entries) over the mesh dims that shard ``like``."""
    if is_dtensor(like):
        for dim, placement in enumerate(like.placements):
            if placement.is_shard():
                _all_reduce(local, group=like.device_mesh.get_group(dim))
    return local


def _rescaled_gradient(
    update: torch.Tensor, grad: torch.Tensor, rule: str, state: dict[str, Any], bias_correction1: float
) -> torch.Tensor:
    """``Ĝ`` with each row (``"channel"``) or the whole tensor (``"tensor"``) rescaled to ``update``'s norm.

    Row shards (FSDP2's ``Shard(0)``) hold whole rows, so per-row norms are local; the
    tensor-wise norms (and the limiter's) are summed over the shards, two scalars in one
    all-reduce. Norms are taken in at least float32; the result has ``grad``'s dtype and layout.
    """
    u, g = local_shard(update), local_shard(grad)
    work = torch.promote_types(g.dtype, torch.float32)
    if rule == "channel":
        if is_dtensor(grad) and any(p.is_shard() and p.dim != 0 for p in grad.placements):
            raise ValueError(
                f"update_rule='channel' needs whole rows of each compressed gradient on a rank, got placements "
                f"{grad.placements}; shard the layer by rows (fully_shard's default) or use update_rule='tensor'"
            )
        u_norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True, dtype=work)
        g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True, dtype=work)
        squares = None
    else:
        squares = _sum_over_shards(
            torch.stack([u.to(work).square().sum(), g.to(work).square().sum()]), like=grad
        )
        u_norm, g_norm = squares.sqrt().unbind()
    # A zero row of Ĝ stays zero (its scale is irrelevant, and 0/0 must not become NaN).
    factor = torch.where(g_norm > 0, u_norm / g_norm.clamp_min(torch.finfo(work).tiny), 0.0)
    if _NORM_GROWTH_LIMIT is not None:
        # ‖N‖_F of this step, in r-space (‖U‖_F = ‖M/denom‖_F by construction, both rules).
        if squares is None:
            squares = _sum_over_shards(u.to(work).square().sum().reshape(1), like=grad)
        norm = squares[0].sqrt() / bias_correction1
        previous = state.get("update_norm")
        if previous is not None:
            limiter = (norm / (_NORM_GROWTH_LIMIT * previous.to(norm.device, norm.dtype))).clamp_min(1.0)  # in `work`, as batched
            factor = factor / limiter
            norm = norm / limiter
        state["update_norm"] = norm.to(u.dtype)  # the parameter's dtype: what load_state_dict casts it to
    out = (g.to(work) * factor).to(g.dtype)
    if is_dtensor(grad):
        out = DTensor.from_local(
            out, grad.device_mesh, grad.placements, run_check=False, shape=grad.shape, stride=grad.stride()
        )
    return out


# Plain (unsharded) gradients are rescaled a chunk of layers at a time (see _rescaled_gradients):
# at most this many elements of Ĝ per chunk, which bounds the two [rows, r] copies it makes.
_CHUNK_ELEMENTS = 1 << 24


def _rescaled_gradients(
    updates: list[torch.Tensor | None],
    grads: list[torch.Tensor],
    rule: str,
    states: list[dict[str, Any]],
    bias_corrections1: list[float],
    owners: dict[tuple[Any, ...], torch.Tensor] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`_rescaled_gradient` for each layer of a group, with a few ops per chunk of layers instead of per layer.

    Yields ``(k, rescaled Ĝ_k)``, a chunk at a time, and drops ``updates[k]`` once it is used
    (the list is consumed): a caller that applies each update as it comes holds at most one
    chunk's temporaries beside the updates not yet rescaled, as the per-layer loop did.
    The same formulas in the same order (so the same values, up to the summation order of a
    norm). At small micro-batches the per-layer version was a fifth of a step's host time.
    Plain tensors with the same ``r``, dtype and device are batched: row norms on the
    concatenated rows, a layer's sums gathered by a row-owner index; sharded ones (``DTensor``)
    go one by one, since their norms may need an all-reduce. ``owners``: a cache of the
    row-owner indices per chunk layout (the optimizer's own; built on the gradients' device).
    """
    owners = {} if owners is None else owners
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for k, (update, grad) in enumerate(zip(updates, grads)):
        if is_dtensor(grad) or is_dtensor(update) or grad.dim() != 2:
            out = _rescaled_gradient(update, grad, rule, states[k], bias_corrections1[k])
            updates[k] = None
            yield k, out
        else:
            buckets.setdefault((grad.shape[-1], grad.dtype, update.dtype, grad.device), []).append(k)
    for members in buckets.values():
        chunk: list[int] = []
        size = 0
        for k in members + [-1]:
            if k < 0 or (chunk and size + grads[k].numel() > _CHUNK_ELEMENTS):
                scaled = _rescale_chunk(
                    [updates[j] for j in chunk], [grads[j] for j in chunk], rule, [states[j] for j in chunk],
                    [bias_corrections1[j] for j in chunk], owners,
                )
                for j in chunk:
                    updates[j] = None
                yield from zip(chunk, scaled)
                del scaled
                chunk, size = [], 0
            if k >= 0:
                chunk.append(k)
                size += grads[k].numel()


def _rescale_chunk(
    us: list[torch.Tensor],
    gs: list[torch.Tensor],
    rule: str,
    states: list[dict[str, Any]],
    bcs: list[float],
    owners: dict[tuple[Any, ...], torch.Tensor],
) -> list[torch.Tensor]:
    """The batched body of :func:`_rescaled_gradients`: plain 2-D tensors sharing ``r``, dtype and device.

    Works on the concatenated rows (``[Σm, r]``), a layer's tensor-wise sums gathered by an
    index of row owners: a fixed number of ops whatever the number of layers (a list op on
    CPU costs a dispatch per tensor).
    """
    work = torch.promote_types(gs[0].dtype, torch.float32)
    tiny = torch.finfo(work).tiny
    device = gs[0].device
    rows = tuple(g.shape[0] for g in gs)
    owner = owners.get((rows, device))  # [Σm]: the layer of each row
    if owner is None:
        # output_size: no data-dependent shape (the estimator runs this step on fake tensors).
        owner = torch.arange(len(rows), device=device).repeat_interleave(
            torch.tensor(rows, device=device), output_size=sum(rows)
        )
        owners[(rows, device)] = owner
    u_row = torch.linalg.vector_norm(torch.cat(us), dim=-1, dtype=work)
    g_all = torch.cat(gs)
    g_row = torch.linalg.vector_norm(g_all, dim=-1, dtype=work)
    u_sq = torch.zeros(len(gs), dtype=work, device=device).index_add_(0, owner, u_row.square())  # ‖U_k‖²_F
    if rule == "channel":
        factor = torch.where(g_row > 0, u_row / g_row.clamp_min(tiny), 0.0)
    else:
        g_sq = torch.zeros(len(gs), dtype=work, device=device).index_add_(0, owner, g_row.square())
        factor = torch.where(g_sq > 0, (u_sq / g_sq.clamp_min(tiny)).sqrt(), 0.0).index_select(0, owner)
    if _NORM_GROWTH_LIMIT is not None:
        norm = u_sq.sqrt()  # ‖U‖_F = bc1·‖N‖_F
        norm = norm / (bcs[0] if len(set(bcs)) == 1 else torch.tensor(bcs, dtype=work, device=device))
        previous = [state.get("update_norm") for state in states]
        if any(p is not None for p in previous):
            # A layer without a previous norm (its first step) is not limited: its bound is +inf.
            unbounded = torch.tensor(float("inf"), dtype=work, device=device)
            bound = torch.stack([unbounded if p is None else p.to(device, work) for p in previous])
            limiter = (norm / (_NORM_GROWTH_LIMIT * bound)).clamp_min(1.0)
            factor = factor / limiter.index_select(0, owner)
            norm = norm / limiter
        # One [L] tensor a chunk, each state holding its element (the parameter's dtype, as
        # load_state_dict casts it): no per-layer copy.
        for state, value in zip(states, norm.to(us[0].dtype).unbind()):
            state["update_norm"] = value
    scaled = g_all * factor.unsqueeze(-1)
    return list(scaled.to(gs[0].dtype).split(rows))


def put_deltas_in_place_of_weights(groups: list[dict[str, Any]], layers: Iterable[CompActLinear]) -> None:
    """In parameter groups (edited in place), let each compressed layer's ``weight_delta`` take its weight's place.

    The weight of a layer in compressed mode gets no ``.grad`` and has no moments of its
    own (:class:`CompActAdamW` updates it through ``δ``), so it is not held at all: a
    held parameter that needs gradients but never has state is what
    ``torch.distributed.checkpoint`` refuses to load (Lightning's ``ModelParallelStrategy``).
    ``δ`` goes where its weight was (same group, same position), wherever ``δ`` itself was
    listed: the weight's group holds the hyperparameters (weight decay, lr) meant for it,
    and the state keeps the plain optimizer's order. (A group split by name, e.g.
    ``n.endswith("weight")``, would otherwise put ``...weight_delta`` among the no-decay
    parameters.) A ``δ`` listed without its weight stays where it is.
    """
    deltas = {id(layer.weight): layer.weight_delta for layer in layers if layer.weight_delta is not None}
    moved = {id(deltas[id(p)]) for group in groups for p in group["params"] if id(p) in deltas}
    for group in groups:
        params = []
        for p in group["params"]:
            if id(p) in deltas:
                params.append(deltas[id(p)])
            elif id(p) not in moved:  # a δ listed on its own yields to its weight's place
                params.append(p)
        group["params"] = params


# The state key of a weight whose moments are still compressed (put back by
# put_weights_back): the P ([n, r]) they are in, decompressed at the weight's next step.
PENDING_BASIS = "compact_projection"


def _approximation_warning(what: str) -> None:
    warnings.warn(
        f"lightning_compact: {what}; the first moment is converted exactly (M·Pᵀ from compressed, M·P to compressed), "
        "the second only approximately (each row keeps its total: compressed V[i,k] ≈ Σ_j V[i,j]/r, full "
        "V[i,j] ≈ Σ_k V[i,k]/n), so the first steps after the switch are not those of an uninterrupted run.",
        stacklevel=3,
    )


@torch.no_grad()
def decompress_moments_(state: dict[str, Any], weight: torch.Tensor, proj: torch.Tensor | None = None) -> None:
    """Turn a compressed Adam state (``[m, r]`` moments) into the state of the full weight, in place.

    ``M ← M Pᵀ`` is exact (the EMA of ``Ĝ Pᵀ``, the unbiased gradient estimate); the second
    moment has no exact decompression: each row's total is kept, ``V[i, j] ← Σ_k V[i, k] / n``
    (since ``E Σ_k Ĝ[i, k]² = ‖G[i]‖²``). ``proj`` defaults to the state's pending ``P``. A
    weight stored ``[n, m]`` (``Conv1D``) gets the transposed moments.
    """
    proj = state.pop(PENDING_BASIS) if proj is None else proj
    state.pop("projection_keys", None)  # moment_carry's record of the compressed basis
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if is_dtensor(weight) or is_dtensor(m):  # row shards of a sharded run: start over (rare: CompAct was switched off)
        state.clear()
        return
    n = proj.shape[0]
    full_m = m.to(proj.dtype) @ proj.t()
    full_v = (v.sum(dim=-1, keepdim=True) / n).expand_as(full_m)
    if tuple(weight.shape) != tuple(full_m.shape):
        full_m, full_v = full_m.t(), full_v.t()
    state["exp_avg"] = full_m.to(weight.dtype).contiguous()
    state["exp_avg_sq"] = full_v.to(weight.dtype).contiguous()
    _approximation_warning("Adam moments kept compressed by CompAct were decompressed to full size")


@torch.no_grad()
def compress_moments_(state: dict[str, Any], delta: torch.Tensor, proj: torch.Tensor) -> None:
    """Turn a full weight's Adam state (``[m, n]``, or ``[n, m]``) into compressed ``[m, r]`` moments, in place.

    ``M ← M P`` is exact (the EMA of ``G P = Ĝ``); ``V[i, k] ← Σ_j V[i, j] / r`` keeps each
    row's expected total (``E Ĝ[i, k]² = ‖G[i]‖² / r``).
    """
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if m.shape[-1] != proj.shape[0]:  # stored [in, out] (Conv1D)
        m, v = m.t(), v.t()
    r = proj.shape[1]
    state["exp_avg"] = (m.to(proj.dtype) @ proj).to(delta.dtype).contiguous()
    state["exp_avg_sq"] = (v.sum(dim=-1, keepdim=True) / r).expand(-1, r).to(delta.dtype).contiguous()
    _approximation_warning("full-size Adam moments were compressed for CompAct")


def put_weights_back(optimizer: Optimizer, layers: Iterable[CompActLinear]) -> int:
    """Undo :func:`put_deltas_in_place_of_weights` before ``layers`` are restored to plain layers.

    Each ``δ`` of ``optimizer`` gives its place (group and position) back to its weight, so a
    later step updates the restored weight from its ``.grad``. The moments follow, still
    compressed, with the ``P`` they are in; :class:`CompActAdamW` decompresses them at the
    weight's next step (:func:`decompress_moments_`), so nothing full-size is allocated
    unless the optimizer is used again. Returns how many were put back.
    """
    by_delta = {id(layer.weight_delta): layer for layer in layers if layer.weight_delta is not None}
    moved = 0
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            layer = by_delta.get(id(p))
            if layer is None:
                params.append(p)
                continue
            params.append(layer.weight)
            moved += 1
            state = optimizer.state.pop(p, None)
            if state and "exp_avg" in state:
                state[PENDING_BASIS] = layer.projection_matrix(dtype=torch.float32).detach().clone()
                optimizer.state[layer.weight] = state
        group["params"] = params
    return moved


def _basis_change(in_features: int, rank: int, old_keys: torch.Tensor, new_keys: torch.Tensor, projection: str) -> torch.Tensor:
    """``(P_oldᵀP_old)⁻¹ P_oldᵀ P_new`` (``[r, r]``, float64 where the device has it)."""
    work = torch.float32 if new_keys.device.type == "mps" else torch.float64
    p_old = build_projection(in_features, rank, old_keys, projection=projection, dtype=work)
    p_new = build_projection(in_features, rank, new_keys, projection=projection, dtype=work)
    return torch.linalg.solve(p_old.t() @ p_old, p_old.t() @ p_new)


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


def _refuse_foreign_deltas(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """A global step pre-hook: an optimizer other than CompActAdamW about to apply a compressed gradient.

    torch's Adam would write its update into ``δ`` (a broadcast zero: "more than one
    element of the written-to tensor refers to a single memory location"), and the weight
    itself, which has no ``.grad`` in compressed mode, would never move. A no-op unless
    some layer owns a ``weight_delta``, and skipped for a step given a closure (Lightning's):
    the hook runs before the closure's backward and ``decompress_grads_``, so the ``.grad``
    it would see is stale.
    """
    closure = kwargs.get("closure") or next((a for a in args if callable(a)), None)  # args may hold the optimizer
    if isinstance(optimizer, CompActAdamW) or not live_deltas() or closure is not None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = delta_owner(p) if p.grad is not None else None
            if layer is not None:
                raise RuntimeError(
                    f"{type(optimizer).__name__} got the compressed gradient of layer {layer.layer_name!r} (its weight_delta, "
                    "grad_mode='compressed'), which only CompActAdamW can apply. Use `opt = compact.optimizer(opt)` "
                    "(CompAct; CompActCallback does it for you) or `CompActAdamW(model.parameters())`, call "
                    "`compact.decompress_grads_()` before each step, or convert with grad_mode='decompressed'."
                )


register_optimizer_step_pre_hook(_refuse_foreign_deltas)
