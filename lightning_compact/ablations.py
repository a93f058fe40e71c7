"""Prototype ablations beyond the paper (issue 10); not part of the public API.

Kept in one module so the core can change under it; everything here works from the
outside of the core (a ``CompActAdamW`` subclass, a callback, a wrapper around
``make_projection``). Three ideas:

* **Moment carry** (:class:`CarryCompActAdamW`). The paper keeps Adam's compressed
  moments unchanged when the projection is resampled, so for the next ~1/(1 − β₁)
  steps the old first moment, whose columns belong to the old basis, is decompressed
  with the new one (a random direction). Here, when a weight's seed changes, the
  first moment is carried into the new basis:

  - ``carry="lstsq"``: ``M ← M (P_oldᵀ P_old)⁻¹ P_oldᵀ P_new`` (least-squares
    reconstruction in the old subspace, projected onto the new one; for an
    orthogonalised projection this is ``M Q_oldᵀ Q_new``);
  - ``carry="raw"``: ``M ← M P_oldᵀ P_new`` (the issue's formula; its magnitude grows
    by about √(n/r), since ``P_old P_oldᵀ`` has eigenvalues ≈ n/r on its range);
  - ``carry="reset"``: ``M ← 0``;

  all r x r products (``P_oldᵀ P_new`` is ``[r_old, r_new]``), no ``[m, n]`` temporary.
  The second moment cannot be rotated; its basis-invariant part, each row's mean
  (``E[Ĝ²]`` of a row is ``‖G_row‖²/r`` in any Gaussian basis), is kept:
  ``V ← mean_j V[:, j]`` broadcast to the new columns. The same code handles a rank
  change (``r_old ≠ r_new``).

* **Orthogonalised projection** (``projection="orthogonal"``): ``P = √(n/r)·Q`` with
  ``Q`` the orthonormal factor (signs fixed by ``R``'s diagonal) of the seeded Gaussian
  ``[n, r]`` matrix, so ``PᵀP = (n/r) I`` and ``E[P Pᵀ] = I`` still holds.
  :func:`install_orthogonal_projection` wraps ``make_projection`` where the core uses it.

* **Rank schedule** (``rank_schedule=((fraction, rank), ...)``): until ``fraction`` of
  the run the layers use ``rank`` (a fraction of ``in_features``), afterwards the
  callback's rank; switches happen at resample boundaries, and the moments follow
  through the carry (``lstsq`` unless another carry is chosen).
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch

import lightning_compact.functional as _functional
from lightning_compact.layers import CompActLinear, compressed_grad_of, resolve_rank
from lightning_compact.optim import CompActAdamW, rebind_lr_scheduler
from lightning_compact.projection import make_projection as _core_make_projection

__all__ = [
    "AblationCallback",
    "CarryCompActAdamW",
    "ablation_module",
    "install_orthogonal_projection",
    "orthogonal_projection",
    "transfer_moments",
]

CARRIES = ("none", "lstsq", "raw", "reset")


@functools.lru_cache(maxsize=256)
def _orthogonal_cached(in_features: int, rank: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    gauss = _core_make_projection(in_features, rank, seed, projection="gaussian", device=device, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)  # reduced: q [n, r]
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return (q * (in_features / rank) ** 0.5).to(dtype)


def orthogonal_projection(in_features: int, rank: int, seed: int, *, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``√(n/r)·Q`` from the seeded Gaussian; ``E[P Pᵀ] = I`` and ``PᵀP = (n/r)·I``."""
    if rank > in_features:
        raise ValueError(f"an orthogonal projection needs rank <= in_features, got {rank} > {in_features}")
    device = str(torch.device(device) if device is not None else torch.device("cpu"))
    return _orthogonal_cached(in_features, rank, seed, device, dtype)


def _make_projection(in_features: int, rank: int, seed: int, *, projection: str = "gaussian", device: Any = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if projection == "orthogonal":
        return orthogonal_projection(in_features, rank, seed, device=device, dtype=dtype)
    return _core_make_projection(in_features, rank, seed, projection=projection, device=device, dtype=dtype)


def install_orthogonal_projection() -> None:
    """Let the core's forward, backward and ``CompressedGrad`` build ``projection="orthogonal"``."""
    _functional.make_projection = _make_projection  # type: ignore[assignment]


def _projection(in_features: int, rank: int, seed: int, kind: str, like: torch.Tensor) -> torch.Tensor:
    return _make_projection(in_features, rank, seed, projection=kind, device=like.device, dtype=torch.float64)


@torch.no_grad()
def transfer_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, p_old: torch.Tensor, p_new: torch.Tensor,
                     carry: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments ``[m, r_old]`` in the basis ``p_old`` (``[n, r_old]``) -> ``[m, r_new]`` in ``p_new``."""
    r_new = p_new.shape[1]
    dtype = exp_avg.dtype
    cross = p_old.t() @ p_new  # [r_old, r_new]
    if carry == "lstsq":
        m = exp_avg.to(torch.float64) @ torch.linalg.solve(p_old.t() @ p_old, cross)
    elif carry == "raw":
        m = exp_avg.to(torch.float64) @ cross
    elif carry == "reset":
        m = torch.zeros(exp_avg.shape[0], r_new, dtype=torch.float64, device=exp_avg.device)
    else:
        raise ValueError(f"carry must be one of {CARRIES[1:]}, got {carry!r}")
    v = exp_avg_sq.mean(dim=1, keepdim=True).expand(-1, r_new).contiguous()
    return m.to(dtype), v.to(exp_avg_sq.dtype)


class CarryCompActAdamW(CompActAdamW):
    """``CompActAdamW`` that moves compressed moments into the new basis when the projection changes.

    Args:
        carry: ``"lstsq"``, ``"raw"``, ``"reset"`` (see the module docstring) or ``"none"``
            (the paper's: moments kept as they are; only a rank change is then handled,
            by ``lstsq``).
    """

    def __init__(self, *args: Any, carry: str = "lstsq", **kwargs: Any) -> None:
        if carry not in CARRIES:
            raise ValueError(f"carry must be one of {CARRIES}, got {carry!r}")
        super().__init__(*args, **kwargs)
        self.carry = carry
        self.transfers = 0

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, *, scale: float = 1.0, carry: str = "lstsq") -> CarryCompActAdamW:  # type: ignore[override]
        new = super().from_optimizer(optimizer, scale=scale)
        new.carry = carry
        new.transfers = 0
        return new

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # Lightning's closure runs forward and backward: gradients exist only after it
            with torch.enable_grad():
                loss = closure()
        seen = []
        for group in self.param_groups:
            for p in group["params"]:
                sink = compressed_grad_of(p)
                if sink is None or sink.value is None:
                    continue
                state = self.state[p]
                basis = (sink.seed, sink.rank, sink.projection)
                old = state.get("basis")
                if old is not None and "exp_avg" in state and old != basis:
                    rank_changed = old[1] != sink.rank
                    carry = self.carry if self.carry != "none" else ("lstsq" if rank_changed else None)
                    if carry is not None:
                        like = sink.value
                        p_old = _projection(sink.in_features, old[1], old[0], old[2], like)
                        p_new = _projection(sink.in_features, sink.rank, sink.seed, sink.projection, like)
                        state["exp_avg"], state["exp_avg_sq"] = transfer_moments(
                            state["exp_avg"], state["exp_avg_sq"], p_old, p_new, carry
                        )
                        self.transfers += 1
                seen.append((p, basis))
        # (``basis`` is a Python tuple in the state: a prototype, not meant for weights_only checkpoints.)
        super().step()
        for p, basis in seen:  # recorded after the step, which creates the state of a new parameter
            self.state[p]["basis"] = basis
        return loss


class AblationCallback(pl.Callback):
    """Applies an ablation's projection kind and rank schedule to the layers ``CompActCallback`` converted.

    Put it after ``CompActCallback`` in the callback list.
    """

    def __init__(self, ablation: dict[str, Any], total_steps: int) -> None:
        self.projection = ablation.get("projection")
        self.rank_schedule = tuple(ablation.get("rank_schedule", ()))
        self.total_steps = total_steps
        if self.projection == "orthogonal":
            install_orthogonal_projection()

    def _layers(self, trainer: pl.Trainer) -> dict[str, CompActLinear]:
        from lightning_compact.callbacks.compact import CompActCallback

        for cb in trainer.callbacks:
            if isinstance(cb, CompActCallback):
                return cb.layers
        return {}

    def _base_rank(self, trainer: pl.Trainer) -> Any:
        from lightning_compact.callbacks.compact import CompActCallback

        return next(cb.rank for cb in trainer.callbacks if isinstance(cb, CompActCallback))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in self._layers(trainer).values():
            if self.projection is not None:
                layer.projection = self.projection
                sink = compressed_grad_of(layer.weight)
                if sink is not None:
                    sink.projection = self.projection
        self._apply_rank(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply_rank(trainer)

    def _apply_rank(self, trainer: pl.Trainer) -> None:
        if not self.rank_schedule:
            return
        from lightning_compact.callbacks.compact import CompActCallback

        gap = next(cb.update_proj_gap for cb in trainer.callbacks if isinstance(cb, CompActCallback))
        step = trainer.global_step
        wanted = self._base_rank(trainer)
        for fraction, rank in self.rank_schedule:
            # Switch at the first resample boundary at or after the fraction.
            if step < -(-int(fraction * self.total_steps) // gap) * gap:
                wanted = rank
                break
        for layer in self._layers(trainer).values():
            layer.rank = resolve_rank(wanted, layer.in_features)


def ablation_module(module_cls: type[pl.LightningModule], ablation: dict[str, Any], *, scale: float = 1.0,
                    **kwargs: Any) -> pl.LightningModule:
    """An instance of a subclass of ``module_cls`` whose optimizer is a :class:`CarryCompActAdamW`
    when the ablation carries moments or changes rank (else ``module_cls`` as it is)."""
    carry = ablation.get("carry", "lstsq" if ablation.get("rank_schedule") else None)
    if carry is None:
        return module_cls(**kwargs)

    class _Ablation(module_cls):  # type: ignore[misc, valid-type]
        def configure_optimizers(self) -> Any:
            config = super().configure_optimizers()
            old = config["optimizer"]
            new = CarryCompActAdamW.from_optimizer(old, scale=scale, carry=carry)
            rebind_lr_scheduler(config["lr_scheduler"]["scheduler"], old, new)
            config["optimizer"] = new
            return config

    _Ablation.__name__ = f"{module_cls.__name__}Ablation"
    return _Ablation(**kwargs)
