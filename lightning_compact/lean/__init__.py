"""Memory-lean ops around the linears: save less for backward, never recompute a matmul.

* :mod:`~lightning_compact.lean.norms`: RMSNorm / LayerNorm saving only their input.
* :mod:`~lightning_compact.lean.activations`: SwiGLU / GELU saving only their inputs.
* :mod:`~lightning_compact.lean.cross_entropy`: lm_head + cross-entropy in token chunks.
* :mod:`~lightning_compact.lean.swap`: :func:`apply_lean`, the module swaps for this
  project's LLaMA and recognised transformers models.
"""

from lightning_compact.lean.activations import LeanGELU, LeanSwiGLUMLP, gelu, swiglu
from lightning_compact.lean.cross_entropy import causal_lm_loss, chunked_linear_cross_entropy, default_chunk_size
from lightning_compact.lean.norms import LeanLayerNorm, LeanRMSNorm, layer_norm, rms_norm
from lightning_compact.lean.swap import LeanReport, LeanSwap, apply_lean

__all__ = [
    "LeanGELU",
    "LeanLayerNorm",
    "LeanRMSNorm",
    "LeanReport",
    "LeanSwap",
    "LeanSwiGLUMLP",
    "apply_lean",
    "causal_lm_loss",
    "chunked_linear_cross_entropy",
    "default_chunk_size",
    "gelu",
    "layer_norm",
    "rms_norm",
    "swiglu",
]
