"""Helpers of the lean tests: relative errors and the bytes autograd saves for backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    ref = ref.detach().double()
    return float((out.detach().double() - ref).norm() / ref.norm())


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, torch.Tensor]:
    """Bytes of the unique storages autograd saves while ``fn`` runs (``exclude``: parameters, not activations)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op produces: transient buffers included."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: nothing new was allocated.
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
        return out
