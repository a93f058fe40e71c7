"""Data-parallel training with compressed gradients.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


__all__ = ["broadcast_parameters", "exclude_from_ddp"]


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
