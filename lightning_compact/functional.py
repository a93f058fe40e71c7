"""``compact_linear``: a linear map that saves ``x·P`` instead of ``x`` for the backward pass.

Forward is exactly ``F.linear``. Backward:

* ``∂L/∂x = ∂L/∂o · W`` and ``∂L/∂b = Σ ∂L/∂o`` are exact (they never needed ``x``);
* the weight gradient ``Gᵀ = (∂L/∂o)ᵀ x`` (``[m, n]`` in ``nn.Linear``'s layout) is
  computed in the compressed space, ``Ĝ = (∂L/∂o)ᵀ (x P)`` (``[m, r]``).

An input that is (a view of) an SDPA kernel's output, which that kernel keeps for its own
backward (an attention output projection's, in most models), is saved as it is instead of
``x·P``: no new memory. ``Ĝ`` is then made from it in the backward: the same value, in both
gradient modes, so a compiled model (which stores ``x·P`` there) computes what eager does
(see :func:`input_kept_elsewhere`).

Where ``Ĝ`` goes is the *gradient mode*:

* ``"decompressed"``: ``weight.grad`` receives ``Ĝ Pᵀ``, an unbiased estimate of the
  true gradient (``E[P Pᵀ] = I``); any optimizer works.
* ``"compressed"`` (the paper's full method): the call is given a ``weight_delta`` ``δ``
  (``[m, r]``) and the weight is read as ``W + δ Pᵀ`` with ``δ = 0``, so ``∂L/∂δ = G P = Ĝ``
  exactly. ``Ĝ`` is then an ordinary autograd gradient, ``δ.grad``: accumulation, DDP's
  reducer, clipping, gradient scalers and ``torch.compile`` handle it by their standard
  means, and an optimizer such as :class:`~lightning_compact.optim.CompActAdamW` turns it
  into an update of ``W``. ``weight.grad`` stays ``None``. (``δ``'s value is never read:
  its storage can be a broadcast zero.)

``P`` is passed in (a cached tensor) or rebuilt from an int32 key tensor in the forward
and, in decompressed mode, the backward (see :mod:`lightning_compact.projection`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from lightning_compact._torch_private import eager_function_apply
from lightning_compact.projection import DEFAULT_PROJECTION, PROJECTIONS, Projection, build_projection, seed_keys

__all__ = ["GRAD_MODES", "compact_linear", "input_kept_elsewhere", "observe_compressed_inputs"]

GRAD_MODES: tuple[str, ...] = ("compressed", "decompressed")

# Called as ``observer(input, compressed)`` for every compact_linear forward that saves
# a compressed input; memory reports use it to know what the plain layer would have saved.
_OBSERVERS: list[Callable[[torch.Tensor, torch.Tensor], None]] = []


@contextlib.contextmanager
def observe_compressed_inputs(observer: Callable[[torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, call ``observer(input, input @ P)`` on each compressing forward."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def _projection(in_features: int, rank: int, proj, keys, kind: str, dtype: torch.dtype) -> torch.Tensor:
    if proj is not None:
        return proj if proj.dtype == dtype else proj.to(dtype)
    return build_projection(in_features, rank, keys, projection=kind, dtype=dtype)


class _CompActLinearFunction(torch.autograd.Function):
    # Every line here runs once per layer and step: at small micro-batches this class's Python
    # was a visible part of a step, so the static arguments travel as one tuple (``spec``).

    @staticmethod
    def forward(ctx, input, weight, bias, weight_delta, saved, proj, keys, spec):  # type: ignore[override]
        # ``saved``: x·P, made by compact_linear outside autograd (so layers that share an input
        # and a projection can share it too), or, where ``spec`` says so, the input itself, whose
        # storage another op (SDPA) keeps for its own backward anyway: saved instead of x·P (no
        # new memory), the weight gradient is made from it. spec = (rank, kind, from_kept).
        needs = ctx.needs_input_grad
        # Save only what each gradient needs: W for ∂L/∂x, x·P for ∂L/∂W, and P (a cached
        # tensor, no new memory) or its keys where Ĝ is decompressed, or made from the kept input.
        need_p = spec[2] or (weight_delta is None and needs[1])
        ctx.save_for_backward(
            saved,
            weight if needs[0] else None,
            proj if need_p else None,
            keys if need_p and proj is None else None,
        )
        ctx.spec = spec
        ctx.input_shape = input.shape
        ctx.delta_dtype = weight_delta.dtype if weight_delta is not None else None
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        saved, weight, proj, keys = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rank, kind, from_kept = ctx.spec
        delta_dtype = ctx.delta_dtype
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = grad_delta = None
        if needs[0]:
            # Autocast is off in a custom backward: match dtypes explicitly (e.g. bf16 grad, fp32 W).
            grad_input = torch.mm(grad_2d, _as(weight, grad_2d.dtype)).view(ctx.input_shape)
        if needs[3] or (needs[1] and delta_dtype is None):
            n = ctx.input_shape[-1]
            if from_kept:
                # Ĝ = (∂L/∂o)ᵀ (x P) from the kept input: the very value a stored x·P gives (not the
                # exact gradient in decompressed mode, which a compiled graph, storing x·P, could not match).
                x = saved.reshape(-1, n)
                p = _projection(n, rank, proj, keys, kind, x.dtype)
                saved = torch.mm(x, p)
            elif not needs[3]:
                p = _projection(n, rank, proj, keys, kind, saved.dtype)  # decompressed: P again
            grad_saved = _as(grad_2d, saved.dtype)
            if needs[3]:
                # Ĝ = (∂L/∂o)ᵀ (x P): [m, r], in δ's dtype (the dtype .grad of the weight would have).
                grad_delta = _as(torch.mm(grad_saved.t(), saved), delta_dtype)
            else:
                grad_weight = _decompressed_weight_grad(grad_saved, saved, p)
        if needs[2]:
            grad_bias = grad_2d.sum(0)
        return grad_input, grad_weight, grad_bias, grad_delta, None, None, None, None


def _decompressed_weight_grad(grad_2d: torch.Tensor, compressed: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``Ĝ Pᵀ = ((∂L/∂o)ᵀ (x P)) Pᵀ`` (``[m, n]``), multiplied in the order with fewer flops.

    Ĝ first costs ``m·r·(T + n)``, ``x P Pᵀ`` first ``T·n·(r + m)`` (T tokens): the second wins
    at small micro-batches (T below about r), where a step is bound by the host anyway.
    """
    tokens, r = compressed.shape
    m, n = grad_2d.shape[1], p.shape[0]
    if tokens * n * (r + m) < m * r * (tokens + n):
        return torch.mm(grad_2d.t(), torch.mm(compressed, p.t()))
    return torch.mm(torch.mm(grad_2d.t(), compressed), p.t())


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # .to() costs a dispatch even when it changes nothing; a step calls this a few hundred times.
    return t if t.dtype == dtype else t.to(dtype)


# Autograd nodes that return a view of their input (no new storage; also read by the memory
# tracker), and the SDPA kernels that keep their output for their own backward (flash /
# memory-efficient / cuDNN; the math fallback, used e.g. with attention dropout on CPU, keeps
# its inputs instead).
VIEW_NODES = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "TransposeBackward0", "TransposeBackward1", "TBackward0",
    "PermuteBackward0", "ReshapeAliasBackward0", "AsStridedBackward0", "AliasBackward0", "ExpandBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3",
    "SliceBackward0", "SelectBackward0",
})
_OUTPUT_KEEPING_NODES = (
    "ScaledDotProductFlashAttention", "ScaledDotProductEfficientAttention", "ScaledDotProductCudnnAttention",
    "ScaledDotProductFusedAttention",
)


def input_kept_elsewhere(input: torch.Tensor, max_depth: int = 8) -> bool:
    """Whether ``input`` is (a view of) an SDPA kernel's output, which that kernel keeps for its backward.

    Follows ``input.grad_fn`` through view nodes only: a copy in between (``contiguous`` of a
    transposed tensor, eager attention's ``clone``) makes fresh storage that nothing else keeps.
    Eager mode; reads only node types, never saved tensors.
    """
    fn = input.grad_fn
    for _ in range(max_depth):
        if fn is None:
            return False
        name = type(fn).__name__
        if name.startswith(_OUTPUT_KEEPING_NODES):
            return True
        if name not in VIEW_NODES or not fn.next_functions:
            return False
        fn = fn.next_functions[0][0]
    return False


def compact_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    rank: int,
    seed: int | torch.Tensor | None = None,
    proj: torch.Tensor | None = None,
    projection: Projection = DEFAULT_PROJECTION,
    weight_delta: torch.Tensor | None = None,
    share_compressed: bool = False,
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` that keeps only ``input @ P`` (rank ``rank``) for the backward.

    Args:
        input: ``[..., in_features]``.
        weight: ``[out_features, in_features]``.
        bias: ``[out_features]`` or ``None``.
        rank: r, columns of the projection (``>= 1``).
        seed: selects ``P``: a Python int, or its keys as an int32 tensor ``[2]``
            (:func:`~lightning_compact.projection.seed_keys`; a tensor keeps a compiled
            graph free of the seed's value). Not needed when ``proj`` is given.
        proj: ``P`` itself (``[in_features, rank]``), e.g. a per-window cache; it must be
            the projection of ``seed`` if both are given.
        projection: ``"gaussian"``, ``"orthogonal"`` or ``"rademacher"`` (used when ``P`` is built here).
        weight_delta: compressed gradient mode: a ``[out_features, rank]`` tensor that
            requires grad and whose ``.grad`` receives ``Ĝ`` (``weight.grad`` is left
            alone). ``None``: decompressed mode, ``weight.grad`` receives ``Ĝ Pᵀ``.
        share_compressed: reuse the ``x·P`` of the previous call when it had the very
            same ``input`` tensor (unmodified), rank and projection, instead of
            computing and saving another: layers that read one input with one
            projection (q/k/v, gate/up under ``share_projection``) keep a single ``x·P``.
            Eager mode only (ignored while compiling).

    Returns:
        The same output as ``F.linear``. Input and bias gradients are exact. If
        ``weight`` does not require grad nothing is computed or saved for it.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    n = weight.shape[1]
    if rank > n:
        raise ValueError(
            f"rank {rank} exceeds in_features {n}: x·P would be larger than the input it replaces; "
            f"use a rank below {n} (or F.linear for this layer)"
        )
    if seed is not None and not isinstance(seed, torch.Tensor) and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int (or its keys as an int32 tensor from seed_keys), got {seed!r}")
    if weight_delta is not None and tuple(weight_delta.shape) != (weight.shape[0], rank):
        raise ValueError(f"weight_delta has shape {tuple(weight_delta.shape)}, expected {(weight.shape[0], rank)}")
    if proj is not None and tuple(proj.shape) != (n, rank):
        raise ValueError(f"proj has shape {tuple(proj.shape)}, expected {(n, rank)}")
    if proj is None and seed is None:
        raise ValueError("pass seed=... or proj=...")
    return _compact_linear(input, weight, bias, rank, seed, proj, projection, weight_delta, share_compressed)


def _compact_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    seed: int | torch.Tensor | None,
    proj: torch.Tensor | None,
    projection: str,
    weight_delta: torch.Tensor | None,
    share_compressed: bool,
) -> torch.Tensor:
    # compact_linear without the argument checks, for CompActLinear, whose arguments are
    # valid by construction (its common case takes _compact_linear_cached instead).
    n = weight.shape[1]
    compiling = torch.compiler.is_compiling()
    keys = None
    if proj is None:
        keys = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed_keys(seed), dtype=torch.int32)
        keys = keys.to(input.device)
    source = input
    device_type = input.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # Mirror autocast's rule for F.linear (run in the lower precision), then keep
        # autocast out of the Function so forward and backward see the same dtypes.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    saved, from_kept = None, False
    if torch.is_grad_enabled() and (weight.requires_grad or (weight_delta is not None and weight_delta.requires_grad)):
        if (
            not compiling and input_kept_elsewhere(source)
            and (input is source or input.untyped_storage().data_ptr() == source.untyped_storage().data_ptr())
        ):
            # Its storage stays alive for SDPA's backward (no autocast copy came between): saving
            # x·P as well would only add memory.
            saved, from_kept = input, True
        else:
            sharing = share_compressed and not compiling
            key = None
            if sharing:
                # Which P: the very cache or key tensor (siblings share one), or the int seed.
                which = id(proj) if proj is not None else (id(seed) if isinstance(seed, torch.Tensor) else seed)
                # ... and its version: a resample writes the keys or the cache in place.
                p_source = proj if proj is not None else seed
                p_version = p_source._version if isinstance(p_source, torch.Tensor) else None
                key = (rank, which, p_version, projection, input.dtype)
                saved = _SHARED_COMPRESSION.get(source, key)
            if saved is None:
                # Outside autograd (a detached input: cheaper than a no_grad block).
                saved = torch.mm(input.detach().reshape(-1, n), _projection(n, rank, proj, keys, projection, input.dtype))
                if sharing:
                    _SHARED_COMPRESSION.put(source, key, saved)
            for observer in _OBSERVERS:
                observer(input, saved)
    apply = _CompActLinearFunction.apply if compiling else _EAGER_APPLY
    args = (input, weight, bias, weight_delta, saved, proj, keys, (rank, projection, from_kept))
    if autocast:
        with torch.autocast(device_type, enabled=False):
            return apply(*args)
    return apply(*args)


_EAGER_APPLY = eager_function_apply(_CompActLinearFunction)


def _compact_linear_cached(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_delta: torch.Tensor | None,
    cache: torch.Tensor,
    rank: int,
    projection: str,
) -> torch.Tensor:
    """:func:`_compact_linear` where the caller has ruled out everything but the common case.

    Eager (not compiling), no autocast, grad enabled for a trainable weight, ``P`` cached in the input's dtype, no
    shared ``x·P``, no observers: what a CompActLinear meets at every step of a plain run. The
    same Function with the same arguments, without the branches (at small micro-batches each
    line here costs a visible share of a layer's step).
    """
    if input_kept_elsewhere(input):
        return _EAGER_APPLY(input, weight, bias, weight_delta, input, cache, None, (rank, projection, True))
    saved = torch.mm(input.detach().reshape(-1, cache.shape[0]), cache)
    return _EAGER_APPLY(input, weight, bias, weight_delta, saved, cache, None, (rank, projection, False))


def compression_observed() -> bool:
    """Whether an :func:`observe_compressed_inputs` block is open (its observers must see every forward)."""
    return bool(_OBSERVERS)


class _LastCompression:
    """The most recent shareable ``x·P``, keyed by the very input tensor (and its version).

    Layers reading one input with one projection (q, k, v; gate, up) run one after the
    other, so one slot is enough. The input is held weakly and the entry dies with it;
    the ``x·P`` is held strongly, because under activation checkpointing autograd does
    not keep it, and the siblings must find it in the forward as in its recomputation
    (selective checkpointing replays the kept matmuls in the order they first ran).
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, source: torch.Tensor, key: tuple) -> torch.Tensor | None:
        if self._entry is None:
            return None
        source_ref, version, entry_key, compressed = self._entry
        if source_ref() is source and version == source._version and entry_key == key:
            return compressed
        return None

    def put(self, source: torch.Tensor, key: tuple, compressed: torch.Tensor) -> None:
        self._entry = (weakref.ref(source, self._drop), source._version, key, compressed)

    def _drop(self, source_ref: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is source_ref:
            self._entry = None


_SHARED_COMPRESSION = _LastCompression()
