"""Measure the bytes a training step keeps alive for its backward pass, on any device.

Every tensor autograd saves passes through ``saved_tensors_hooks``; we record its
storage (not the tensor: q, k and v save views of one input, and counting each view
would over-count). Parameters are not activations and are left out. All saved tensors
are alive together at the end of the forward pass, so the sum over the unique storages
of one step is that step's peak of saved activations.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from lightning_compact.functional import VIEW_NODES, observe_compressed_inputs

__all__ = ["SavedActivations", "SavedActivationTracker"]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


@dataclasses.dataclass(frozen=True)
class SavedActivations:
    """What one step saved for backward.

    Attributes:
        bytes: unique storages saved (parameters excluded).
        uncompressed_bytes: what the same step would have saved with every CompAct
            layer a plain ``nn.Linear`` (its input stored instead of ``x·P``).
        compressed_bytes: the part of ``bytes`` that is CompAct's ``x·P``.
        compressed_layers: number of CompAct forwards seen.
        parameter_copy_bytes: casts of trainable parameters saved for backward (mixed
            precision keeps a low-precision copy of each weight); not in ``bytes``,
            since they scale with the model, not the batch.
    """

    bytes: int
    uncompressed_bytes: int
    compressed_bytes: int = 0
    compressed_layers: int = 0
    parameter_copy_bytes: int = 0

    @property
    def replaced_input_bytes(self) -> int:
        """Inputs of CompAct layers that no other op keeps: what ``x·P`` replaced."""
        return self.uncompressed_bytes - self.bytes + self.compressed_bytes


def _is_parameter_copy(t: torch.Tensor) -> bool:
    """A dtype cast of a trainable Parameter, or a view of one (autocast's weight copies).

    Seen through the autograd graph: view nodes, then ``ToCopyBackward0``, then the
    ``AccumulateGrad`` of an ``nn.Parameter``.
    """
    fn = t.grad_fn
    for _ in range(4):
        if fn is None or type(fn).__name__ not in VIEW_NODES:
            break
        fn = fn.next_functions[0][0] if fn.next_functions else None
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    sources = [next_fn for next_fn, _ in fn.next_functions if next_fn is not None]
    return bool(sources) and all(isinstance(getattr(s, "variable", None), nn.Parameter) for s in sources)


class _Storage:
    """One storage seen in the step; ``alive`` turns False when PyTorch frees it."""

    __slots__ = ("nbytes", "alive", "saved")

    def __init__(self, nbytes: int, saved: bool) -> None:
        self.nbytes, self.alive, self.saved = nbytes, True, saved

    def free(self) -> None:
        self.alive = False


class _StorageRegistry:
    """Storages keyed by address, where an address freed and reused is a new storage.

    The address alone is not enough: a compressed layer's input dies after the forward
    and its memory is reused, so a later tensor at the same address is another storage.
    UntypedStorage keeps its Python object while the storage lives, so a weakref
    finalizer tells when the address is released.
    """

    def __init__(self) -> None:
        self.live: dict[tuple[str, int], _Storage] = {}
        self.all: list[_Storage] = []
        self._finalizers: list[weakref.finalize] = []

    def detach(self) -> None:
        """Stop watching the storages (their finalizers would otherwise live as long as they do)."""
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers = []

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is a live one of this registry."""
        entry = self.live.get(_storage_key(t))
        return entry is not None and entry.alive

    def get_or_add(self, t: torch.Tensor, saved: bool) -> _Storage:
        key = _storage_key(t)
        entry = self.live.get(key)
        if entry is None or not entry.alive:
            storage = t.untyped_storage()
            entry = _Storage(storage.nbytes(), saved)
            self._finalizers.append(weakref.finalize(storage, entry.free))
            self.live[key] = entry
            self.all.append(entry)
        return entry


class SavedActivationTracker:
    """Context manager recording the storages saved for backward inside its block.

    Args:
        exclude: modules or tensors whose storages are not activations (e.g. the model:
            its parameters and buffers are saved by reference, not allocated).
    """

    def __init__(self, exclude: Iterable[nn.Module | torch.Tensor] = ()) -> None:
        # Excluded storages by address, each while it lives: a buffer freed inside the block (a
        # projection cache that cache_projections="auto" drops at the first forward) leaves its
        # address to an activation, which must then be counted.
        self._excluded = _StorageRegistry()
        for item in exclude:
            tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, nn.Module) else [item]
            for t in tensors:
                self._excluded.get_or_add(t, saved=False)
        self._storages = _StorageRegistry()
        self._parameter_copies = _StorageRegistry()
        self._inputs: list[_Storage] = []
        self._compressed: list[_Storage] = []
        self._contexts: list = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._excluded.holds(t):
            return t
        if _is_parameter_copy(t):
            self._parameter_copies.get_or_add(t, saved=True)
        else:
            self._storages.get_or_add(t, saved=True).saved = True
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _observe(self, input: torch.Tensor, compressed: torch.Tensor) -> None:
        # The input's entry is shared with any op that saves the same live storage.
        self._inputs.append(self._storages.get_or_add(input, saved=False))
        self._compressed.append(self._storages.get_or_add(compressed, saved=False))

    def __enter__(self) -> SavedActivationTracker:
        self._contexts = [
            torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack),
            observe_compressed_inputs(self._observe),
        ]
        for ctx in self._contexts:
            ctx.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        for ctx in reversed(self._contexts):
            ctx.__exit__(*exc_info)
        self._contexts = []
        self._excluded.detach()  # the model's storages outlive the block; the activations' die after backward

    def result(self) -> SavedActivations:
        saved = [e for e in self._storages.all if e.saved]
        total = sum(e.nbytes for e in saved)
        compressed = sum(e.nbytes for e in {id(e): e for e in self._compressed}.values() if e.saved)
        # An input that another op saves anyway (e.g. the attention output) costs nothing extra.
        unique_inputs = {id(e): e for e in self._inputs}.values()
        inputs_not_saved = sum(e.nbytes for e in unique_inputs if not e.saved)
        return SavedActivations(
            bytes=total,
            uncompressed_bytes=total - compressed + inputs_not_saved,
            compressed_bytes=compressed,
            compressed_layers=len(self._inputs),
            parameter_copy_bytes=sum(e.nbytes for e in self._parameter_copies.all),
        )
