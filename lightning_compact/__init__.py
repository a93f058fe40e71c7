"""lightning-compact: CompAct (compressed activations, arXiv 2410.15352) for PyTorch Lightning."""

from lightning_compact.callbacks.compact import CompActCallback
from lightning_compact.callbacks.lean import LeanActivations
from lightning_compact.callbacks.memory import PeakMemoryMonitor
from lightning_compact.functional import CompressedGrad, compact_linear
from lightning_compact.lean import apply_lean
from lightning_compact.layers import CompActConfig, CompActLinear, compressed_grad_of, convert_to_compact
from lightning_compact.optim import CompActAdamW
from lightning_compact.projection import make_projection

__all__ = [
    "CompActAdamW",
    "CompActCallback",
    "CompActConfig",
    "CompActLinear",
    "CompressedGrad",
    "LeanActivations",
    "PeakMemoryMonitor",
    "apply_lean",
    "compact_linear",
    "compressed_grad_of",
    "convert_to_compact",
    "make_projection",
]
__version__ = "0.1.0"
