"""Activation-checkpointing granularities the estimator and the planner know: a pluggable registry.

A granularity is a name, a function that applies it to the estimator's LLaMA in place,
and a step-time factor for the planner's cost model (with where the factor comes from).
Both built-in ones are :func:`lightning_compact.checkpointing.apply_checkpointing`'s (the
very wrappers ``LeanActivations(checkpointing=...)`` puts on a model): ``"blocks"``
recomputes each decoder layer in the backward, every matmul included; ``"selective"``
keeps the matmul and attention outputs and recomputes the elementwise rest; either with
``":F"`` does so for the first fraction ``F`` of the blocks (``"blocks:0.5"`` is built in,
any other fraction is made on request, its step-time factor scaled from the whole one's
extra time: ``1 + F * (factor - 1)``, recomputation being per block). Others come from
:func:`register_checkpointing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from lightning_compact.checkpointing import apply_checkpointing, parse_granularity

__all__ = ["CheckpointGranularity", "checkpointing_granularities", "get_checkpointing", "register_checkpointing"]


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


_WHOLE: dict[str, CheckpointGranularity] = {
    "blocks": CheckpointGranularity(
        "blocks", lambda model: apply_checkpointing(model, "blocks"), 1.263,
        "benchmarks/RESULTS.md §4 'Against peers': LLaMA-350M on an H200, 128 x 256, bf16-mixed, 1.263x the baseline's step",
    ),
    "selective": CheckpointGranularity(
        "selective", lambda model: apply_checkpointing(model, "selective"), 1.10,
        "assumed (unmeasured on a GPU): 1.10", recomputes_matmuls=False,
    ),
}


def _fraction_of(name: str) -> CheckpointGranularity:
    """``"blocks:0.5"`` and the like: the whole granularity's extra time scaled by the fraction of blocks."""
    kind, fraction = parse_granularity(name)
    whole = _WHOLE[kind]
    return CheckpointGranularity(
        name, lambda model: apply_checkpointing(model, name), 1.0 + fraction * (whole.step_time_factor - 1.0),
        f"derived: 1 + {fraction:g} x ({whole.step_time_factor:g} - 1), from '{kind}': {whole.source}",
        recomputes_matmuls=whole.recomputes_matmuls,
    )


_REGISTRY: dict[str, CheckpointGranularity] = {**_WHOLE, "blocks:0.5": _fraction_of("blocks:0.5")}


def register_checkpointing(granularity: CheckpointGranularity) -> None:
    """Add (or replace) a granularity; the planner's ``--plan.checkpointing`` can then name it."""
    _REGISTRY[granularity.name] = granularity


def checkpointing_granularities() -> dict[str, CheckpointGranularity]:
    """Every known granularity, by name."""
    return dict(_REGISTRY)


def get_checkpointing(name: str) -> CheckpointGranularity:
    """The granularity called ``name`` (a registered one, or a built-in with ``":F"``), else a ``ValueError``."""
    known = checkpointing_granularities()
    if name not in known and name.partition(":")[0] in _WHOLE:
        return _fraction_of(name)  # raises for a bad fraction, naming the form
    if name not in known:
        raise ValueError(
            f"unknown checkpointing granularity {name!r}; known: {', '.join(known)} "
            "(others can be added with lightning_compact.memory.checkpointing_options.register_checkpointing)"
        )
    return known[name]
