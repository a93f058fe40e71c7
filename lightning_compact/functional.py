"""``compact_linear``: a linear map that saves ``x·P`` instead of ``x`` for the backward pass.

Forward is exactly ``F.linear``. Backward:

* ``∂L/∂x = ∂L/∂o · W`` and ``∂L/∂b = Σ ∂L/∂o`` are exact (they never needed ``x``);
* the weight gradient ``Gᵀ = (∂L/∂o)ᵀ x`` (``[m, n]`` in ``nn.Linear``'s layout) is
  computed in the compressed space, ``Ĝ = (∂L/∂o)ᵀ (x P)`` (``[m, r]``), and then
  decompressed to ``Ĝ Pᵀ``. Since ``E[P Pᵀ] = I`` the result is unbiased.

``P`` is rebuilt from ``seed`` in the backward (see :mod:`lightning_compact.projection`).

Given a ``grad_sink`` (a :class:`CompressedGrad`), the backward skips the
decompression: ``Ĝ`` is added to the sink and ``weight.grad`` is left alone. That is
the paper's full method, where an optimizer such as
:class:`~lightning_compact.optim.CompActAdamW` consumes ``Ĝ`` directly.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from lightning_compact.projection import Projection, make_projection

__all__ = ["CompressedGrad", "compact_linear", "observe_compressed_inputs"]

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


class CompressedGrad:
    """One weight's gradient kept compressed: ``Ĝ = (∂L/∂o)ᵀ (x P)``, ``[out_features, rank]``.

    Backward passes add into :attr:`value` (so micro-batches that share ``P``
    accumulate exactly, as ``.grad`` does); :attr:`seed` remembers which ``P`` made it,
    so whoever consumes ``Ĝ`` rebuilds the same ``P`` with :meth:`projection_matrix`.

    Attributes:
        in_features: n, the size of the weight's input.
        rank: r.
        projection: the projection family (``"gaussian"`` or ``"rademacher"``).
        value: ``Ĝ`` summed over the backward passes since the last :meth:`zero_`, or ``None``.
        seed: the seed of the ``P`` behind :attr:`value`, or ``None`` while nothing is held.
    """

    __slots__ = ("in_features", "rank", "projection", "value", "seed")

    def __init__(self, in_features: int, rank: int, projection: Projection = "gaussian") -> None:
        self.in_features, self.rank, self.projection = in_features, rank, projection
        self.value: torch.Tensor | None = None
        self.seed: int | None = None

    def accumulate(self, grad: torch.Tensor, seed: int) -> None:
        """Add ``grad`` (a ``Ĝ`` made with ``seed``) to :attr:`value`."""
        if self.seed is not None and seed != self.seed:
            raise RuntimeError(
                "A compressed gradient is being accumulated under a different projection than the one it holds: "
                "zero the gradients (optimizer.zero_grad()) before the projection seed changes."
            )
        if self.value is None:
            self.value = grad
        else:
            self.value.add_(grad)
        self.seed = seed

    def zero_(self, set_to_none: bool = True) -> None:
        """Forget the held gradient (free it, or zero it in place and keep the buffer)."""
        if set_to_none:
            self.value = None
        elif self.value is not None:
            self.value.zero_()
        # A zeroed buffer belongs to no projection yet: the next backward may bring a new one.
        self.seed = None

    def projection_matrix(
        self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The ``[in_features, rank]`` projection behind :attr:`value` (same device and dtype by default)."""
        if self.seed is None or self.value is None:
            raise RuntimeError("no compressed gradient is held, so there is no projection to rebuild")
        return make_projection(
            self.in_features,
            self.rank,
            self.seed,
            projection=self.projection,
            device=device if device is not None else self.value.device,
            dtype=dtype if dtype is not None else self.value.dtype,
        )

    def decompress(self) -> torch.Tensor:
        """``Ĝ Pᵀ``: the full-size ``[out_features, in_features]`` estimate of the weight gradient."""
        return self.value @ self.projection_matrix().t()

    def __repr__(self) -> str:
        shape = None if self.value is None else tuple(self.value.shape)
        return f"CompressedGrad(in_features={self.in_features}, rank={self.rank}, value={shape}, seed={self.seed})"


class _CompActLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, input, weight, bias, compressed, rank: int, seed: int, projection: Projection, grad_sink, weight_dtype
    ):
        # ``compressed`` (x·P) is made by compact_linear, outside autograd, so layers that
        # share an input and a projection can share it too.
        output = F.linear(input, weight, bias)
        # Save only what each gradient needs: W for ∂L/∂x, x·P for ∂L/∂W.
        ctx.save_for_backward(compressed, weight if ctx.needs_input_grad[0] else None)
        ctx.input_shape = input.shape
        ctx.has_bias = bias is not None
        ctx.rank, ctx.seed, ctx.projection = rank, seed, projection
        ctx.grad_sink, ctx.weight_dtype = grad_sink, weight_dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        compressed, weight = ctx.saved_tensors
        out_features = grad_output.shape[-1]
        grad_2d = grad_output.reshape(-1, out_features)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Autocast is off in a custom backward: match dtypes explicitly (e.g. bf16 grad, fp32 W).
            grad_input = (grad_2d @ weight.to(grad_2d.dtype)).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_compressed = grad_2d.to(compressed.dtype).t() @ compressed  # Ĝ: [m, r]
            if ctx.grad_sink is not None:
                # Paper-faithful mode: Ĝ goes to the sink (in the dtype .grad would have), .grad stays None.
                ctx.grad_sink.accumulate(grad_compressed.to(ctx.weight_dtype), ctx.seed)
            else:
                in_features = ctx.input_shape[-1]
                proj = make_projection(
                    in_features,
                    ctx.rank,
                    ctx.seed,
                    projection=ctx.projection,
                    device=compressed.device,
                    dtype=compressed.dtype,
                )
                grad_weight = grad_compressed @ proj.t()  # [m, n]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def compact_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    rank: int,
    seed: int,
    projection: Projection = "gaussian",
    grad_sink: CompressedGrad | None = None,
    share_compressed: bool = False,
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` that keeps only ``input @ P`` (rank ``rank``) for the backward.

    Args:
        input: ``[..., in_features]``.
        weight: ``[out_features, in_features]``.
        bias: ``[out_features]`` or ``None``.
        rank: r, columns of the projection (``>= 1``).
        seed: selects ``P``; the backward rebuilds the same ``P`` from it.
        projection: ``"gaussian"`` or ``"rademacher"``.
        grad_sink: where the compressed weight gradient goes instead of ``weight.grad``
            (``None``: decompress it into ``weight.grad``). Its ``in_features``, ``rank``
            and ``projection`` must match this call's.
        share_compressed: reuse the ``x·P`` of the previous call when it had the very
            same ``input`` tensor (unmodified), rank, seed and projection, instead of
            computing and saving another: layers that read one input with one seed
            (q/k/v, gate/up under ``share_projection``) then keep a single ``x·P``.

    Returns:
        The same output as ``F.linear``. Without a sink ``weight.grad`` receives an
        unbiased estimate of the true weight gradient; with one, ``Ĝ`` (in the weight's
        dtype) is added to the sink. Input and bias gradients are exact. If ``weight``
        does not require grad nothing is computed or saved for it.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if grad_sink is not None and (
        grad_sink.rank != rank or grad_sink.in_features != weight.shape[1] or grad_sink.projection != projection
    ):
        raise ValueError(
            f"{grad_sink!r} does not match rank={rank}, in_features={weight.shape[1]}, projection={projection!r}"
        )
    weight_dtype = weight.dtype
    source = input
    device_type = input.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # Mirror autocast's rule for F.linear (run in the lower precision), then keep
        # autocast out of the Function so forward and backward see the same dtypes.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    compressed = None
    if weight.requires_grad and torch.is_grad_enabled():
        key = (rank, seed, projection, input.dtype)
        compressed = _SHARED_COMPRESSION.get(source, key) if share_compressed else None
        if compressed is None:
            with torch.no_grad():
                proj = make_projection(weight.shape[1], rank, seed, projection=projection, device=input.device, dtype=input.dtype)
                compressed = input.reshape(-1, weight.shape[1]) @ proj
            if share_compressed:
                _SHARED_COMPRESSION.put(source, key, compressed)
        for observer in _OBSERVERS:
            observer(input, compressed)
    args = (input, weight, bias, compressed, rank, seed, projection, grad_sink, weight_dtype)
    if autocast:
        with torch.autocast(device_type, enabled=False):
            return _CompActLinearFunction.apply(*args)
    return _CompActLinearFunction.apply(*args)


class _LastCompression:
    """The most recent shareable ``x·P``, keyed by the very input tensor (and its version).

    Layers reading one input with one projection (q, k, v; gate, up) run one after the
    other, so one slot is enough. Only weak references are held: the entry dies with the
    input or with the compressed tensor (freed after the backward).
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, source: torch.Tensor, key: tuple) -> torch.Tensor | None:
        if self._entry is None:
            return None
        source_ref, version, entry_key, compressed_ref = self._entry
        if source_ref() is source and version == source._version and entry_key == key:
            return compressed_ref()
        return None

    def put(self, source: torch.Tensor, key: tuple, compressed: torch.Tensor) -> None:
        self._entry = (weakref.ref(source), source._version, key, weakref.ref(compressed))


_SHARED_COMPRESSION = _LastCompression()
