"""Models: the paper's LLaMA presets, ``transformers`` adapters, and their LightningModules.

Names are imported lazily, so ``lightning_compact.models.llama`` needs only torch (the
LightningModules and adapters bring ``datasets``/``transformers`` only when used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CausalLMModule": "causal_lm",
    "build_llama": "causal_lm",
    "SequenceClassificationModule": "classification",
    "task_metrics": "classification",
    "build_hf_model": "hf",
    "LLAMA_PRESETS": "llama",
    "LlamaConfig": "llama",
    "LlamaForCausalLM": "llama",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
