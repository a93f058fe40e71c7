"""lightning-compact: CompAct (compressed activations, arXiv 2410.15352) for PyTorch Lightning."""

from lightning_compact.callbacks.compact import CompActCallback
from lightning_compact.callbacks.lean import LeanActivations
from lightning_compact.callbacks.memory import PeakMemoryMonitor
from lightning_compact.controller import CompAct
from lightning_compact.functional import compact_linear
from lightning_compact.layers import (
    CompActConfig,
    CompActLinear,
    conversion_report,
    convert_to_compact,
    restore_linear,
)
from lightning_compact.lean import apply_lean
from lightning_compact.optim import CompActAdamW
from lightning_compact.projection import make_projection

__all__ = [
    "CompAct",
    "CompActAdamW",
    "CompActCallback",
    "CompActConfig",
    "CompActLinear",
    "LeanActivations",
    "PeakMemoryMonitor",
    "apply_lean",
    "compact_linear",
    "conversion_report",
    "convert_to_compact",
    "make_projection",
    "restore_linear",
]
__version__ = "0.2.0"
