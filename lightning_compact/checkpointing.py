"""Activation checkpointing of transformer blocks, selective or whole, with CompAct inside.

:func:`apply_checkpointing` runs the forward of each recognised block under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:

* ``granularity="blocks"``: only the block's inputs are kept; the whole block is run
  again in the backward (the lowest memory, one more forward of the blocks).
* ``granularity="selective"``: torch's selective activation checkpointing
  (``create_selective_checkpoint_contexts``) with :func:`compute_intensive_policy`:
  the outputs of matmuls and attention kernels are kept (:data:`SAVED_OPS`), everything
  else (norms, activations, adds, rotary, casts) is recomputed in the backward. No matmul
  is run twice.

**CompAct inside.** A :class:`~lightning_compact.CompActLinear` computes its ``x·P``
with an ``aten.mm`` outside its autograd Function, so under ``"selective"`` that ``x·P``
is one of the kept matmul outputs (``[tokens, r]``) and the full input ``x`` is not
kept; under ``"blocks"`` it is recomputed. In both cases the recomputation sees the very
same ``P``: it is either rebuilt from the layer's int32 ``projection_keys`` (a pure
function of the keys, no RNG state) or read from its ``projection_cache``, and neither
changes between a step's forward and backward (the controller resamples between
optimizer steps). The tests check losses and every gradient (``weight_delta.grad`` in
compressed mode, ``weight.grad`` in decompressed mode) against the same model without
checkpointing.

Recognised blocks (a block inside an already wrapped block is left alone):

* this project's ``LlamaDecoderLayer``;
* transformers layers by class name: ``*DecoderLayer`` (LLaMA, Mistral, Qwen2, ...),
  ``GPT2Block``, ``BertLayer``, ``RobertaLayer``, and any subclass of transformers'
  ``GradientCheckpointingLayer`` (its own marker of a checkpointable layer).

``module_filter_fn(module, name) -> bool`` replaces this recognition: exactly the
modules it accepts are wrapped (e.g. ``lambda m, n: is_block(m) and n.endswith(".0")``
to narrow it, or a test on another class to checkpoint other models' blocks).

The block's ``forward`` is wrapped on the instance (not the class, not a wrapper
module): ``state_dict`` keys are unchanged and module hooks stay outside the
checkpoint (they do not run twice). :func:`restore_checkpointing` removes the wrappers.
Key-value cache arguments of transformers layers (``use_cache``, ``past_key_values``,
...) are disabled inside a checkpointed training forward, as transformers' own
gradient checkpointing does: the recomputation would append to the cache a second time.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = [
    "GRANULARITIES",
    "SAVED_OPS",
    "apply_checkpointing",
    "checkpointed_modules",
    "compute_intensive_policy",
    "is_block",
    "restore_checkpointing",
]

GRANULARITIES: tuple[str, ...] = ("selective", "blocks")

_HF_BLOCK_NAMES = frozenset({"GPT2Block", "BertLayer", "RobertaLayer"})
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def _aten_packets(names: tuple[str, ...]) -> frozenset:
    # getattr: the attention kernels differ across torch versions and builds.
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


# Matmuls (CompAct's x·P among them: an aten.mm) and fused attention kernels: the ops
# whose recomputation costs real time. Their outputs are kept under "selective".
SAVED_OPS: frozenset = _aten_packets((
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
))


def compute_intensive_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of :data:`SAVED_OPS`, recompute every other op (elementwise, norms, views)."""
    if func.overloadpacket in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(compute_intensive_policy)


def is_block(module: nn.Module) -> bool:
    """A transformer block :func:`apply_checkpointing` wraps by default."""
    from lightning_compact.models.llama import LlamaDecoderLayer

    if isinstance(module, LlamaDecoderLayer):
        return True
    cls = type(module)
    names = {c.__name__ for c in cls.__mro__}
    return (
        "GradientCheckpointingLayer" in names
        or cls.__name__ in _HF_BLOCK_NAMES
        or (cls.__name__.endswith("DecoderLayer") and cls.__module__.startswith("transformers."))
    )


# The original forward (an instance attribute or None) and the granularity, per wrapped module.
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, tuple[Callable | None, str]] = weakref.WeakKeyDictionary()


def _checkpointed_forward(module: nn.Module, forward: Callable, granularity: str, *args: Any, **kwargs: Any) -> Any:
    if not (module.training and torch.is_grad_enabled()):
        # Evaluation or no_grad: no backward to recompute for.
        return forward(*args, **kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if granularity == "selective":
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_checkpointing(
    model: nn.Module,
    granularity: str = "selective",
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Checkpoint the forward of ``model``'s transformer blocks, in place; returns ``model``.

    Args:
        model: any module tree (a LightningModule too).
        granularity: ``"selective"`` (keep matmul and attention outputs, recompute the
            rest) or ``"blocks"`` (keep only each block's inputs, recompute the block).
        module_filter_fn: ``(module, name) -> bool``: the modules to wrap. Default:
            the recognised blocks (:func:`is_block`). Modules nested in a wrapped module
            are never wrapped.

    Calling it again with another granularity switches; modules already wrapped with
    the same one are left as they are. Undo with :func:`restore_checkpointing`.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    accept = module_filter_fn or (lambda module, name: is_block(module))
    skip_prefix: str | None = None
    for name, module in model.named_modules():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        if module is model or not accept(module, name):
            continue
        skip_prefix = name + "."
        if module in _WRAPPED:
            if _WRAPPED[module][1] == granularity:
                continue
            _unwrap(module)
        original = module.__dict__.get("forward")
        _WRAPPED[module] = (original, granularity)
        # functools.partial over the bound forward: deepcopy and pickling keep working.
        module.forward = functools.partial(_checkpointed_forward, module, module.forward, granularity)
    return model


def _unwrap(module: nn.Module) -> None:
    original, _ = _WRAPPED.pop(module)
    if original is None:
        del module.forward
    else:
        module.forward = original


def restore_checkpointing(model: nn.Module) -> nn.Module:
    """Remove what :func:`apply_checkpointing` added under ``model``, in place; returns ``model``."""
    for module in model.modules():
        if module in _WRAPPED:
            _unwrap(module)
    return model


def checkpointed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, module, granularity)`` for each module of ``model`` wrapped by :func:`apply_checkpointing`."""
    for name, module in model.named_modules():
        if module in _WRAPPED:
            yield name, module, _WRAPPED[module][1]

