"""Data-parallel and sharded training with compressed gradients.

Every rank builds the same ``P`` (same seed, no global RNG), so averaging the
compressed gradients ``Ĝ = G P`` across ranks gives exactly the compressed gradient
of the global batch: ``mean_k(G_k P) = (mean_k G_k) P``. In compressed mode ``Ĝ`` is
the ``.grad`` of each layer's ``weight_delta``, which DDP's reducer averages like any
gradient (bucketed, overlapped with the backward, skipped under ``no_sync``): the
traffic of those weights shrinks by r/n.

The weights themselves get no ``.grad`` in that mode, so DDP must not wait for one:
they are taken out of its buckets before it wraps the model (:func:`exclude_from_ddp`),
and because DDP then no longer broadcasts them at start-up, :func:`broadcast_parameters`
does.

Under FSDP2 (``fully_shard``) each ``δ`` is sharded by rows like its weight, so FSDP2
reduce-scatters ``Ĝ`` (again r/n of the traffic) and each rank holds the rows of ``Ĝ``
that match its rows of ``W``: :func:`add_decompressed_` and :func:`decompress` apply the
update and the gradient to those rows locally, with the same ``P`` on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support: nothing is ever a DTensor
    DTensor = ()  # type: ignore[assignment,misc]
from torch.nn.parallel import DistributedDataParallel


__all__ = ["add_decompressed_", "broadcast_parameters", "decompress", "exclude_from_ddp", "is_dtensor", "local_shard"]


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (e.g. a Parameter sharded by FSDP2's ``fully_shard``)."""
    return isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s local shard (a view: in-place ops write the ``DTensor``), any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def exclude_from_ddp(module: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """Keep ``params`` out of the DDP wrapper that will later wrap ``module``.

    Must be called before ``DistributedDataParallel(module)`` is built. Names already
    excluded (by the user or another library) are kept.

    Returns:
        The fully qualified names of the parameters excluded.
    """
    ids = {id(p) for p in params}
    names = [name for name, p in module.named_parameters() if id(p) in ids]
    existing = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(set(existing) | set(names)))
    return names


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Copy ``src``'s values of ``params`` to every rank (what DDP does for the parameters it manages)."""
    if not _distributed():
        return
    for p in params:
        dist.broadcast(p.data, src=src, group=group)


def _same_rows(update: torch.Tensor, weight: torch.Tensor) -> bool:
    # δ and W of one layer have the same rows; sharded alike, each rank holds matching rows.
    return (
        isinstance(update, DTensor)
        and update.device_mesh == weight.device_mesh
        and update.placements == weight.placements == (Shard(0),)
    )


def decompress(update: torch.Tensor, proj: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``update · projᵀ`` (``[m, r] · [r, n]``) in ``like``'s dtype and layout (plain, or FSDP2's ``DTensor``).

    Every rank builds the same ``proj``, so a row-sharded ``update`` gives its rows of the
    product locally; any other layout gathers the small ``update`` first.
    """
    if not isinstance(like, DTensor):
        if isinstance(update, DTensor):
            raise TypeError(
                "a compressed gradient is a DTensor but its weight is not: shard each converted layer's weight "
                "and weight_delta together (one fully_shard call over the layer or a module above it)"
            )
        return (update @ proj.t().to(update.dtype)).to(like.dtype)
    mesh = like.device_mesh
    if _same_rows(update, like):
        local = (local_shard(update) @ proj.t().to(update.dtype)).to(like.dtype)
        return DTensor.from_local(local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())
    full = update.full_tensor() if isinstance(update, DTensor) else update
    product = DTensor.from_local(
        (full @ proj.t().to(full.dtype)).to(like.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False
    )
    return product.redistribute(mesh, like.placements)


@torch.no_grad()
def add_decompressed_(weight: torch.Tensor, update: torch.Tensor, proj: torch.Tensor, alpha: float) -> None:
    """``weight += alpha · update · projᵀ`` in place: ``weight [m, n]``, ``update [m, r]``, ``proj [n, r]``.

    Plain tensors or FSDP2's ``DTensor`` shards. Where ``weight`` and ``update`` are split
    by rows alike (the usual case) each rank updates its own rows inside the matmul: no
    communication and no ``[m, n]`` temporary (see :func:`decompress` for the rest).
    """
    add_decompressed_unguarded_(weight, update, proj, alpha)


def add_decompressed_unguarded_(weight: torch.Tensor, update: torch.Tensor, proj: torch.Tensor, alpha: float) -> None:
    """:func:`add_decompressed_` for callers already under ``torch.no_grad()`` (an optimizer's step, per layer)."""
    if not isinstance(weight, DTensor) and not isinstance(update, DTensor):
        weight.addmm_(update if update.dtype == weight.dtype else update.to(weight.dtype), proj.t(), alpha=alpha)
    elif isinstance(weight, DTensor) and _same_rows(update, weight):
        local_shard(weight).addmm_(local_shard(update).to(weight.dtype), proj.t(), alpha=alpha)
    else:
        weight.add_(decompress(update, proj, weight), alpha=alpha)
