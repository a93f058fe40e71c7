"""Data-parallel training with compressed gradients: CompAct's own all-reduce.

Every rank builds the same ``P`` (same seed, no global RNG), so averaging the
compressed gradients ``Ĝ = G P`` across ranks gives exactly the compressed gradient
of the global batch: ``mean_k(G_k P) = (mean_k G_k) P``. Communicating ``Ĝ``
(``[m, r]``) instead of ``G`` (``[m, n]``) shrinks the traffic of those weights by r/n.

DDP itself would wait for a full-size ``.grad`` of every parameter it manages, so
compressed weights are taken out of its buckets before it wraps the model
(:func:`exclude_from_ddp`), and :func:`all_reduce_gradients` averages them once per
optimizer step, after the last accumulated micro-batch (the point where DDP would have
synchronised). Because DDP no longer broadcasts them at start-up either,
:func:`broadcast_parameters` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compact.layers import compressed_grad_of

__all__ = ["all_reduce_gradients", "broadcast_parameters", "exclude_from_ddp"]


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


def _gradient_of(p: torch.Tensor) -> torch.Tensor | None:
    sink = compressed_grad_of(p)
    if sink is not None and sink.value is not None:
        return sink.value
    return p.grad


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> int:
    """Average the gradients of ``params`` across ranks, in place: ``Ĝ`` where compressed, else ``.grad``.

    Tensors are packed into one flat buffer per device and dtype, so a step costs one
    collective per buffer (plus a tiny one that checks every rank holds the same set of
    gradients, which turns a mismatch into an error instead of a hang). A no-op outside
    an initialised process group of more than one rank.

    Returns:
        The number of gradient elements communicated (0 when not distributed).
    """
    if not _distributed() or not params:
        return 0
    grads = [_gradient_of(p) for p in params]
    device = params[0].device
    present = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=device)
    counts = present.clone()
    dist.all_reduce(counts, group=group)
    world = dist.get_world_size(group)
    if bool(((counts != 0) & (counts != world)).any()):
        raise RuntimeError(
            "CompAct: some ranks produced a gradient for a compressed weight and others did not; every rank "
            "must run every converted layer in each step (as DDP requires without find_unused_parameters)."
        )
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        if g is not None:
            buckets.setdefault((g.device, g.dtype), []).append(g)
    communicated = 0
    for tensors in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        communicated += flat.numel()
    return communicated
