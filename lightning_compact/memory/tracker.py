"""Per-category peak memory of one training step, on any device, with real or fake tensors.

A thin, stable layer over PyTorch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``, a private API): a ``TorchDispatchMode``
that follows every storage made inside it, tags it by what made it (forward,
backward, optimizer step, or a parameter/gradient/optimizer object it was told
about) and records the per-category bytes at the moment of the total peak. Storages
are counted once, however many views (q, k, v of one input) point at them. It works
under ``FakeTensorMode``, which is what lets the estimator run a 7B step on a laptop.

On top of ``MemTracker`` this module:

* returns a :class:`~lightning_compact.memory.breakdown.StepMemory` instead of dicts
  keyed by private enums, and fails with a clear message when the API is missing;
* tags CompAct's compressed gradients (``[out, rank]`` buffers made in the backward,
  which ``MemTracker`` would call temporaries) as gradients;
* keeps each category's own largest value over the step, and skips the per-module
  statistics it does not need (they cost most of the tracker's time);
* can round every allocation up like CUDA's caching allocator (512 B) while running
  on CPU or fake CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_compact._torch_private import PrivateTorchAPIError, mem_tracker
from lightning_compact.memory.breakdown import MemoryBreakdown, StepMemory

__all__ = ["CUDA_ALLOCATION_ROUNDING", "MemTrackerUnavailable", "StepMemoryTracker", "measure_step", "require_mem_tracker"]

# CUDA's caching allocator hands out blocks in multiples of 512 bytes
# (kMinBlockSize); torch.cuda.max_memory_allocated counts those rounded sizes.
CUDA_ALLOCATION_ROUNDING = 512

# MemTracker's category names (its _MemRefType values) -> MemoryBreakdown fields.
_CATEGORY_OF = {
    "Parameter": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer_states",
    "Activation": "activations",
    "Temp": "temporaries",
    "Buffer": "other",
    "Other": "other",
}
_TOTAL_KEY = "Total"
# The private members this module relies on; checked up front so API drift in another
# torch release fails with one clear message instead of an AttributeError mid-step.
_REQUIRED = (
    "track_external", "get_tracker_snapshot", "_update_peak_stats", "_update_snap", "_update_and_maybe_create_winfos",
    "_register_global_optimizer_hook", "_deregister_param_and_optimizer_hooks",
)


class MemTrackerUnavailable(RuntimeError):
    """This torch build lacks the ``MemTracker`` API the accounting is built on."""


@functools.cache
def _mem_tracker_api() -> tuple[type, Any]:
    """``(MemTracker, _MemRefType)``, or :class:`MemTrackerUnavailable` saying what to install."""
    hint = (
        f"Per-category memory accounting needs torch.distributed._tools.mem_tracker.MemTracker as shipped in "
        f"torch 2.11-2.14 (this is torch {torch.__version__}). Install a torch in that range built with "
        "torch.distributed (`pip install 'torch>=2.11,<2.15'`); saved-activation tracking "
        "(SavedActivationTracker) works without it."
    )
    try:
        MemTracker, _MemRefType = mem_tracker()
    except PrivateTorchAPIError as err:
        raise MemTrackerUnavailable(f"{hint} Import failed: {err}") from err
    missing = [name for name in _REQUIRED if not hasattr(MemTracker, name)]
    unknown = sorted({m.value for m in _MemRefType} - set(_CATEGORY_OF))
    if missing or unknown:
        raise MemTrackerUnavailable(f"{hint} Its API changed: missing {missing}, unknown categories {unknown}.")
    return MemTracker, _MemRefType


def require_mem_tracker() -> None:
    """Raise :class:`MemTrackerUnavailable` (saying which torch to install) if accounting cannot run here."""
    _mem_tracker_api()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tracker_class() -> type:
    MemTracker, _ = _mem_tracker_api()

    class _Tracker(MemTracker):  # type: ignore[misc, valid-type]
        """MemTracker with optional allocator rounding, per-category maxima, no per-module peaks."""

        def __init__(self, round_to: int, closure_steps: bool = False) -> None:
            super().__init__()
            self.round_to = round_to
            self.closure_steps = closure_steps
            self.largest: dict[Any, dict[str, int]] = {}

        def _register_global_optimizer_hook(self) -> None:
            super()._register_global_optimizer_hook()
            if not self.closure_steps:
                return
            # optimizer.step(closure) runs the forward and backward inside the step: tag
            # what is made there as activations and temporaries, until the update begins
            # (StepMemoryTracker.optimizer_update_begins).
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            def _not_yet(optimizer: Any, args: Any, kwargs: Any) -> None:
                self._in_opt = False

            self._closure_hook = register_optimizer_step_pre_hook(_not_yet)  # runs after MemTracker's own

        def _deregister_param_and_optimizer_hooks(self) -> None:
            super()._deregister_param_and_optimizer_hooks()
            handle = getattr(self, "_closure_hook", None)
            if handle is not None:
                handle.remove()
                self._closure_hook = None

        def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: int | None = None, old_reftype: Any = None) -> None:
            if self.round_to > 1 and u_type.name in ("ADD", "SIZE"):
                # Every later update of this storage (free, re-tag) reuses this rounded size.
                winfo.mem_consumed = _round_up(winfo.size * winfo.element_size, self.round_to)
            super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)

        def _update_peak_stats(self, peak_state: Any) -> None:
            # Called after every op. MemTracker also refreshes the peak of each active
            # module here (a loop over all modules per op); only the global peak is used.
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)
                largest = self.largest.setdefault(dev, {})
                for key, value in snap.items():
                    if value > largest.get(key, 0):
                        largest[key] = value

    return _Tracker


def _to_breakdown(snapshot: dict[Any, int]) -> MemoryBreakdown:
    fields: dict[str, int] = {}
    for key, value in snapshot.items():
        name = getattr(key, "value", key)
        if name == _TOTAL_KEY:
            continue
        field = _CATEGORY_OF[name]
        fields[field] = fields.get(field, 0) + int(value)
    return MemoryBreakdown(**fields)


class StepMemoryTracker:
    """Context manager: the per-category peak of everything run inside it.

    Tensors made inside the block are followed automatically. Objects made before it
    must be named: ``modules`` (parameters, buffers, existing gradients),
    ``optimizers`` (their state) and ``tensors`` (e.g. the batch, counted as
    ``other``); anything else made outside the block is not seen.

    Args:
        modules: models whose parameters, buffers and gradients exist already.
        optimizers: optimizers whose state exists already.
        tensors: other tensors alive during the step.
        round_to: round each allocation up to a multiple of this many bytes; use
            :data:`CUDA_ALLOCATION_ROUNDING` to mimic CUDA's allocator while running
            on CPU or fake tensors (on real CUDA tensors ``MemTracker`` rounds already).
        closure_steps: the step runs the forward and backward inside
            ``optimizer.step(closure)`` (Lightning's automatic optimization): what they make
            is not counted as optimizer state; call :meth:`optimizer_update_begins` once
            the closure has returned (Lightning's ``on_before_optimizer_step``).

    Raises:
        MemTrackerUnavailable: on a torch without a compatible ``MemTracker``.

    Example::

        with StepMemoryTracker(modules=[model], optimizers=[opt], tensors=[batch]) as tracker:
            model(batch).sum().backward()
            opt.step()
            opt.zero_grad()
        print(tracker.result().peak.table())
    """

    def __init__(
        self,
        *,
        modules: Iterable[nn.Module] = (),
        optimizers: Iterable[torch.optim.Optimizer] = (),
        tensors: Iterable[torch.Tensor] = (),
        round_to: int = 1,
        closure_steps: bool = False,
    ) -> None:
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        _, self._ref_type = _mem_tracker_api()
        self._tracker = _tracker_class()(round_to, closure_steps)
        self._modules = list(modules)
        self._optimizers = list(optimizers)
        self._tensors = list(tensors)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> StepMemoryTracker:
        tracker = self._tracker
        tracker.track_external(*self._modules, *self._optimizers, *self._tensors)
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            # MemTracker's post-accumulate-grad hook may fire for a parameter whose .grad
            # is None (a weight whose gradient CompAct keeps compressed) and warns about it.
            warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
            stack.enter_context(tracker)  # resets the peak to what is alive now
            tracker.largest = {dev: dict(snap) for dev, snap in tracker._curr_mem_snap.items()}
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(*exc_info)

    def optimizer_update_begins(self) -> None:
        """With ``closure_steps``: the closure has run; what is made from now on is the optimizer's."""
        self._tracker._in_opt = True

    def next_forward(self) -> None:
        """Call between two forward passes of the same model in one block (gradient accumulation).

        ``MemTracker`` refuses to see a root module run twice without this reset.
        """
        self._tracker.reset_mod_stats()

    def result(self) -> StepMemory:
        """The peak of the block (on the device with the largest peak) and each category's largest."""
        peaks = self._tracker.get_tracker_snapshot("peak")
        if not peaks:
            return StepMemory(MemoryBreakdown(), MemoryBreakdown())
        device = max(peaks, key=lambda d: peaks[d].get(_TOTAL_KEY, 0))
        largest = self._tracker.largest.get(device, {})
        return StepMemory(_to_breakdown(peaks[device]), _to_breakdown(largest), device=str(device))


def measure_step(
    step: Callable[[], Any],
    *,
    modules: Iterable[nn.Module] = (),
    optimizers: Iterable[torch.optim.Optimizer] = (),
    tensors: Iterable[torch.Tensor] = (),
    round_to: int = 1,
) -> StepMemory:
    """Run ``step()`` once under a :class:`StepMemoryTracker` and return what it used.

    For the steady state, run one step first (outside): the optimizer state then exists
    and is counted, as it is for every later step.
    """
    with StepMemoryTracker(modules=modules, optimizers=optimizers, tensors=tensors, round_to=round_to) as tracker:
        step()
    return tracker.result()
