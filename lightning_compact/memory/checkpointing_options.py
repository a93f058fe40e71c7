"""Activation-checkpointing granularities the estimator and the planner know: a pluggable registry.

A granularity is a name, a function that applies it to the estimator's LLaMA in place,
and a step-time factor for the planner's cost model (with where the factor comes from).
``"blocks"`` (``torch.utils.checkpoint`` around each decoder layer, non-reentrant: every
matmul of the block is recomputed in the backward) is built in. Other granularities
come from :func:`register_checkpointing`, or, when ``lightning_compact.checkpointing``
exists and defines ``apply_checkpointing(model, granularity=...)``, from that module: each
name it lists in ``GRANULARITIES`` (default ``("selective",)``) is registered on first use,
with its factor taken from ``STEP_TIME_FACTORS[name]`` when it defines one.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch.utils.checkpoint
from torch import nn

__all__ = ["CheckpointGranularity", "Checkpointed", "checkpoint_blocks", "checkpointing_granularities", "get_checkpointing", "register_checkpointing"]


@dataclasses.dataclass(frozen=True)
class CheckpointGranularity:
    """One way to checkpoint a model.

    Attributes:
        name: what recipes and flags call it (``"blocks"``).
        apply: ``apply(model)`` checkpoints the estimator's ``LlamaForCausalLM`` in place.
        step_time_factor: step time relative to the same configuration without checkpointing.
        source: where ``step_time_factor`` comes from (a measurement, or "assumed").
        recomputes_matmuls: whether the backward recomputes matmuls (the planner reports it).
    """

    name: str
    apply: Callable[[nn.Module], None]
    step_time_factor: float
    source: str
    recomputes_matmuls: bool = True


class Checkpointed(nn.Module):
    """A decoder layer whose activations are recomputed in the backward (non-reentrant)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        # No dropout in these models: the RNG state need not be stashed (and a real RNG
        # tensor would not mix with fake ones under the estimator's FakeTensorMode).
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, preserve_rng_state=False)


def checkpoint_blocks(model: nn.Module) -> None:
    """Wrap each decoder layer of a ``LlamaForCausalLM`` (``model.model.layers``) in :class:`Checkpointed`."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer, Checkpointed):
            layers[i] = Checkpointed(layer)


_REGISTRY: dict[str, CheckpointGranularity] = {
    "blocks": CheckpointGranularity(
        "blocks", checkpoint_blocks, 1.263,
        "benchmarks/RESULTS.md §4 'Against peers': LLaMA-350M on an H200, 128 x 256, bf16-mixed, 1.263x the baseline's step",
    ),
}


def register_checkpointing(granularity: CheckpointGranularity) -> None:
    """Add (or replace) a granularity; the planner's ``--plan.checkpointing`` can then name it."""
    _REGISTRY[granularity.name] = granularity


def _discover() -> None:
    # The colleague's module (lightning_compact/checkpointing.py), when present: pluggable, not required.
    try:
        module = importlib.import_module("lightning_compact.checkpointing")
    except ImportError:
        return
    apply = getattr(module, "apply_checkpointing", None)
    if apply is None:
        return
    factors = getattr(module, "STEP_TIME_FACTORS", {})
    for name in getattr(module, "GRANULARITIES", ("selective",)):
        if name in _REGISTRY:
            continue  # the built-in "blocks" stays: its factor is measured
        factor = factors.get(name)
        _REGISTRY[name] = CheckpointGranularity(
            name, lambda model, g=name: apply(model, granularity=g), factor if factor is not None else 1.10,
            "lightning_compact.checkpointing.STEP_TIME_FACTORS" if factor is not None else "assumed (unmeasured): 1.10",
            recomputes_matmuls=name != "selective",
        )


def checkpointing_granularities() -> dict[str, CheckpointGranularity]:
    """Every known granularity, by name."""
    _discover()
    return dict(_REGISTRY)


def get_checkpointing(name: str) -> CheckpointGranularity:
    """The granularity called ``name``, or a ``ValueError`` listing the known ones."""
    known = checkpointing_granularities()
    if name not in known:
        raise ValueError(
            f"unknown checkpointing granularity {name!r}; known: {', '.join(known)} "
            "(others can be added with lightning_compact.memory.checkpointing_options.register_checkpointing)"
        )
    return known[name]
