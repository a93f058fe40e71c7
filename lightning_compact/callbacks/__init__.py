"""Lightning callbacks: CompAct conversion and the seed schedule; lean activations; peak-memory reporting."""

from lightning_compact.callbacks.compact import CompActCallback
from lightning_compact.callbacks.lean import LeanActivations
from lightning_compact.callbacks.memory import PeakMemoryMonitor

__all__ = ["CompActCallback", "LeanActivations", "PeakMemoryMonitor"]
