"""Where training memory goes: saved activations, a per-category step breakdown, and a no-GPU estimator.

* :class:`SavedActivationTracker`: bytes saved for backward (hooks only, cheap).
* :class:`StepMemoryTracker` / :func:`measure_step`: one step's peak split into
  parameters, gradients, optimizer states, activations and temporaries
  (:class:`MemoryBreakdown`), on any device, with real or fake tensors.
* :mod:`lightning_compact.memory.estimator`: the same on fake tensors for a whole
  recipe, baseline vs CompAct, beside the paper's Table 1 (``lightning-compact estimate``).
  Imported on demand (``from lightning_compact.memory import estimator``).
"""

from lightning_compact.memory.breakdown import MemoryBreakdown, StepMemory
from lightning_compact.memory.saved_activations import SavedActivations, SavedActivationTracker
from lightning_compact.memory.tracker import (
    CUDA_ALLOCATION_ROUNDING,
    MemTrackerUnavailable,
    StepMemoryTracker,
    measure_step,
    require_mem_tracker,
)

__all__ = [
    "CUDA_ALLOCATION_ROUNDING",
    "MemTrackerUnavailable",
    "MemoryBreakdown",
    "SavedActivationTracker",
    "SavedActivations",
    "StepMemory",
    "StepMemoryTracker",
    "measure_step",
    "require_mem_tracker",
]
