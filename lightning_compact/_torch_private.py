"""Every private PyTorch module this package imports, in one place, for torch 2.11-2.14.

The memory accounting needs what torch has no public API for: fake tensors (the
estimator runs a 7B step without allocating), the ``MemTracker`` behind the per-category
figures, the fake process group's store (per-rank FSDP2 estimates) and dispatch modes
(counting live storages in a benchmark). Each is imported here, on first use, and a
torch without it raises :class:`PrivateTorchAPIError` naming the versions this package
was checked with. One more serves speed, not accounting: the C entry of
``autograd.Function.apply`` (:func:`eager_function_apply`, called once per CompAct layer and
step), which falls back to the public ``apply`` where the private check it needs is missing.
(``torch._foreach_*`` in ``optim.py`` are the multi-tensor kernels ``torch.optim`` itself
runs; they are ops, not modules, and stay there.)
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

__all__ = [
    "CHECKED_TORCH",
    "PrivateTorchAPIError",
    "adopt_module_hooks",
    "dispatch_modes_disabled",
    "eager_function_apply",
    "fake_store",
    "fake_tensor",
    "fake_tensor_mode",
    "mem_tracker",
    "torch_dispatch_mode",
    "tree_leaves",
]

CHECKED_TORCH = "2.11-2.14"


class PrivateTorchAPIError(ImportError):
    """This torch lacks a private API the package relies on; the message says which torch to install."""


@functools.cache
def _load(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as err:  # ImportError, AttributeError, or a distributed-less build failing inside the import
        raise PrivateTorchAPIError(
            f"{module}.{name} is missing from torch {torch.__version__} ({err!r}); lightning-compact uses it as "
            f"shipped in torch {CHECKED_TORCH}: `pip install 'torch>=2.11,<2.15'`"
        ) from err


def fake_tensor_mode() -> type:
    """``torch._subclasses.fake_tensor.FakeTensorMode``."""
    return _load("torch._subclasses.fake_tensor", "FakeTensorMode")


def fake_tensor() -> type:
    """``torch._subclasses.fake_tensor.FakeTensor``."""
    return _load("torch._subclasses.fake_tensor", "FakeTensor")


def mem_tracker() -> tuple[type, Any]:
    """``(MemTracker, _MemRefType)`` from ``torch.distributed._tools.mem_tracker``."""
    module = "torch.distributed._tools.mem_tracker"
    return _load(module, "MemTracker"), _load(module, "_MemRefType")


def fake_store() -> type:
    """The store of torch's ``"fake"`` process-group backend (``torch.testing._internal.distributed.fake_pg``)."""
    return _load("torch.testing._internal.distributed.fake_pg", "FakeStore")


def torch_dispatch_mode() -> type:
    """``torch.utils._python_dispatch.TorchDispatchMode``."""
    return _load("torch.utils._python_dispatch", "TorchDispatchMode")


def dispatch_modes_disabled() -> Any:
    """``torch.utils._python_dispatch._disable_current_modes()``: a context in which no dispatch mode sees the ops."""
    return _load("torch.utils._python_dispatch", "_disable_current_modes")()


def tree_leaves(tree: Any) -> list[Any]:
    """``torch.utils._pytree.tree_leaves``."""
    return _load("torch.utils._pytree", "tree_leaves")(tree)


# nn.Module's hook registries. A layer swap hands the very dicts to the new module, so hooks
# keep firing and the handles users hold (which point at these dicts) still remove them.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def adopt_module_hooks(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Give ``target`` ``source``'s hook registries (the same dict objects) and full-backward-hook flag."""
    for attr in _HOOK_DICTS:
        if hasattr(source, attr) and hasattr(target, attr):
            setattr(target, attr, getattr(source, attr))
    # Without this flag nn.Module treats the entries of _backward_hooks as neither full nor
    # legacy hooks and never calls them.
    target._is_full_backward_hook = getattr(source, "_is_full_backward_hook", None)


def eager_function_apply(function: type[torch.autograd.Function]) -> Any:
    """``function.apply`` for eager calls outside functorch transforms: torch's C entry, without the Python wrapper.

    ``Function.apply`` scans every argument for dead functorch wrappers before it calls the C
    entry; outside functorch transforms (``torch._C._are_functorch_transforms_active``, private)
    that scan finds nothing, and at small micro-batches it was 2-4 µs of each CompAct layer's
    call. Returns a callable that takes the wrapper's path whenever a transform is active;
    callers keep ``function.apply`` under ``torch.compile`` (dynamo recognizes that call).
    """
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    c_apply = super(torch.autograd.Function, function).apply  # torch._C._FunctionBase.apply, bound to function
    if transforms_active is None:
        return function.apply

    def apply(*args: Any) -> Any:
        return function.apply(*args) if transforms_active() else c_apply(*args)

    return apply
