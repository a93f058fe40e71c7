"""Activation checkpointing of transformer blocks, selective or whole, with CompAct inside.

:func:`apply_checkpointing` runs the forward of each recognised block under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:

* ``granularity="blocks"``: only the block's inputs are kept; the whole block is run
  again in the backward (the lowest memory, one more forward of the blocks).
* ``granularity="blocks:0.5"`` (any fraction in (0, 1] after the colon; likewise
  ``"selective:F"``): only the first ``ceil(F * N)`` of the ``N`` recognised blocks are
  checkpointed, the others run plainly. Between the two ends: about ``F`` of the
  recomputation and of the saving (Megatron-LM's ``recompute_num_layers``).
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

Custom autograd Functions (CompAct's, the lean norms and activations) need nothing
special: selective checkpointing works on the aten ops their forwards run, and what
they save goes through the checkpoint's saved-tensor hooks like any op's. What it does
need is a recomputation that runs the very same ops in the same order (torch replays
the kept outputs by position): CompAct's shared ``x·P`` (``share_projection=True``)
is therefore held for as long as its input lives, not only while autograd keeps it.

Measuring: what selective checkpointing keeps lives in its own cache, not in autograd's
saved tensors, so ``saved_tensors_hooks`` (and ``SavedActivationTracker``) see only the
blocks' inputs; ``benchmarks/cpu/checkpointing_memory.py`` counts live storages instead.

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
Key-value caches given to transformers layers (a ``Cache`` object, by name or by
position, and ``past_key_values``/``layer_past``/``cache``; ``use_cache``) are dropped
inside a checkpointed training forward, as transformers' own gradient checkpointing
does: the recomputation would append to the cache a second time (with ``"selective"``,
torch then reports ops "not found in storage").
"""

from __future__ import annotations

import functools
import math
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
    "parse_granularity",
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


def parse_granularity(granularity: str) -> tuple[str, float]:
    """``(kind, fraction)`` of a granularity: ``"blocks"`` is ``("blocks", 1.0)``, ``"blocks:0.5"`` is ``("blocks", 0.5)``.

    Raises ``ValueError`` naming the accepted forms.
    """
    kind, colon, rest = str(granularity).partition(":")
    fraction = 1.0
    if colon:
        try:
            fraction = float(rest)
        except ValueError:
            fraction = math.nan
    if kind not in GRANULARITIES or not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"checkpointing granularity must be one of {GRANULARITIES}, optionally with ':F' for the fraction "
            f"0 < F <= 1 of the blocks to checkpoint (e.g. 'blocks:0.5'), got {granularity!r}"
        )
    return kind, fraction


def compute_intensive_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of :data:`SAVED_OPS`, recompute every other op (elementwise, norms, views)."""
    if func.overloadpacket in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


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


Policy = Callable[..., "CheckpointPolicy | bool"]


class _CheckpointedForward:
    """The instance ``forward`` of a wrapped block: the original forward under ``checkpoint``.

    Kept on the module itself (not in a registry), so a deepcopy of the model is wrapped
    the same way and can be restored the same way.
    """

    def __init__(self, module: nn.Module, granularity: str, policy: Policy) -> None:
        self.module, self.granularity, self.policy = module, granularity, policy
        # An instance forward set by someone else before us, put back by restore.
        self.previous: Callable | None = module.__dict__.get("forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        forward = self.previous if self.previous is not None else functools.partial(type(module).forward, module)
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)  # no backward, nothing to recompute
        # A key-value cache would be appended to a second time by the recomputation: drop
        # it, whether passed by name or by position (GPT-2 passes it positionally).
        args = tuple(None if _is_kv_cache(a) else a for a in args)
        kwargs = {k: None if k in _CACHE_KWARGS or _is_kv_cache(v) else v for k, v in kwargs.items()}
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if self.granularity == "selective":
            context_fn = functools.partial(create_selective_checkpoint_contexts, self.policy)
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _is_kv_cache(obj: Any) -> bool:
    """A transformers ``Cache`` (``DynamicCache``, ...), recognised without importing transformers."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers.") for c in type(obj).__mro__)


def _wrapper(module: nn.Module) -> _CheckpointedForward | None:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, _CheckpointedForward) else None


def apply_checkpointing(
    model: nn.Module,
    granularity: str = "selective",
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    policy: Policy = compute_intensive_policy,
) -> nn.Module:
    """Checkpoint the forward of ``model``'s transformer blocks, in place; returns ``model``.

    Args:
        model: any module tree (a LightningModule too).
        granularity: ``"selective"`` (keep matmul and attention outputs, recompute the
            rest) or ``"blocks"`` (keep only each block's inputs, recompute the block),
            either with an optional ``":F"``: checkpoint only the first ``ceil(F * N)``
            of the ``N`` blocks (``"blocks:0.5"``), the others run as they are.
        module_filter_fn: ``(module, name) -> bool``: the modules to wrap. Default:
            the recognised blocks (:func:`is_block`). Modules nested in a wrapped module
            are never wrapped.
        policy: under ``"selective"``, ``(ctx, op, *args, **kwargs) -> CheckpointPolicy``
            (torch's selective checkpointing policy; ``op`` is an ``aten`` overload):
            which op outputs to keep. Default :func:`compute_intensive_policy`.

    Calling it again with another granularity switches (blocks beyond a new fraction are
    unwrapped); modules already wrapped the same way are left as they are. Undo with
    :func:`restore_checkpointing`.
    """
    kind, fraction = parse_granularity(granularity)
    accept = module_filter_fn or (lambda module, name: is_block(module))
    blocks: list[nn.Module] = []
    skip_prefix: str | None = None
    for name, module in model.named_modules():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        if accept(module, name):
            skip_prefix = name + "." if name else ""
            blocks.append(module)
    wrapped = math.ceil(fraction * len(blocks) - 1e-9)  # the tolerance keeps 0.3 x 10 at 3
    for index, module in enumerate(blocks):
        wrapper = _wrapper(module)
        if index >= wrapped:
            _unwrap(module)
            continue
        if wrapper is not None:
            if wrapper.granularity == kind and wrapper.policy is policy:
                continue
            _unwrap(module)
        module.forward = _CheckpointedForward(module, kind, policy)
    return model


def _unwrap(module: nn.Module) -> None:
    wrapper = _wrapper(module)
    if wrapper is None:
        return
    if wrapper.previous is None:
        del module.forward
    else:
        module.forward = wrapper.previous


def restore_checkpointing(model: nn.Module) -> nn.Module:
    """Remove what :func:`apply_checkpointing` added under ``model``, in place; returns ``model``."""
    for module in model.modules():
        _unwrap(module)
    return model


def checkpointed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, module, granularity)`` for each module of ``model`` wrapped by :func:`apply_checkpointing`."""
    for name, module in model.named_modules():
        wrapper = _wrapper(module)
        if wrapper is not None:
            yield name, module, wrapper.granularity
