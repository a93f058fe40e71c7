"""Seeded random projections ``P ∈ R^{n×r}`` with ``E[P Pᵀ] = I``, regenerated on demand.

CompAct never stores ``P``: the forward pass, the backward pass and the optimizer each
rebuild it from an integer seed. For that to be correct the same seed must give the
same ``P`` everywhere (every rank, forward and backward, before and after a resume),
and nothing may be drawn from PyTorch's global RNG (that would shift user code's
random stream and differ between ranks).

So ``P`` comes from a counter-based hash: entry ``(i, j)`` is a pure function of
``(seed, i·r + j)``, computed with int64 tensor ops whose intermediate values never
overflow. Integer results are bit-identical on every device; the Gaussian's
``log``/``cos`` may differ by an ulp between CPU and CUDA kernels, Rademacher signs
never do. No ``torch.Generator`` is involved, which also keeps ``torch.compile``
graphs free of breaks.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import torch

__all__ = ["PROJECTIONS", "Projection", "make_projection", "layer_seed", "window_for_step"]

Projection = Literal["gaussian", "rademacher"]
PROJECTIONS: tuple[str, ...] = ("gaussian", "rademacher")

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow (split ``c`` in halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (the 'lowbias32' constants), elementwise on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _splitmix64(value: int) -> int:
    """Mix a Python int into 64 well-spread bits (host side, used only for seeds)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _hash_bits(numel: int, seed: int, stream: int, device: torch.device) -> torch.Tensor:
    """``numel`` pseudo-random 32-bit words (as int64) for ``(seed, stream)``."""
    key = _splitmix64((seed & _MASK64) ^ _splitmix64(stream))
    k0, k1, k2 = key & _MASK32, (key >> 32) & _MASK32, _splitmix64(key) & _MASK32
    idx = torch.arange(numel, device=device, dtype=torch.int64)
    # Fold the counter's high word in so more than 2**32 entries stay distinct.
    lo, hi = idx & _MASK32, idx >> 32
    h = _mix32(lo ^ k0)
    h = _mix32((h + _mix32(hi ^ k1)) & _MASK32 ^ k2)
    return _mix32(h ^ k1)


def _uniform_open(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Map 32-bit words to floats in the open interval (0, 1)."""
    return (bits.to(dtype) + 0.5) * (1.0 / 4294967296.0)


def make_projection(
    in_features: int,
    rank: int,
    seed: int,
    *,
    projection: Projection = "gaussian",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the ``[in_features, rank]`` projection for ``seed``; entries have variance ``1/rank``.

    Args:
        in_features: n, the size of the input being compressed.
        rank: r, the compressed size.
        seed: any Python int; equal seeds give equal matrices.
        projection: ``"gaussian"`` (the paper's, N(0, 1/r)) or ``"rademacher"`` (±1/√r:
            cheaper to build, exactly identical on every device).
        device: where to build it (no host-device copy is made).
        dtype: the result's dtype. Gaussian values are computed in float64 when
            ``dtype`` is float64, else in float32, then cast.
    """
    if in_features < 1 or rank < 1:
        raise ValueError(f"in_features and rank must be positive, got {in_features} and {rank}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    numel = in_features * rank
    scale = 1.0 / math.sqrt(rank)
    if projection == "rademacher":
        bits = _hash_bits(numel, seed, stream=0, device=device)
        signs = (bits & 1).to(dtype) * 2 - 1
        return (signs * scale).view(in_features, rank)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # Box-Muller on two independent streams.
    u1 = _uniform_open(_hash_bits(numel, seed, stream=1, device=device), work)
    u2 = _uniform_open(_hash_bits(numel, seed, stream=2, device=device), work)
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return (normal * scale).to(dtype).view(in_features, rank)


def layer_seed(base_seed: int, layer_name: str, window: int) -> int:
    """The seed of one layer's projection in one resample window.

    The only place seeds are derived: the layer's fully qualified name (not its index,
    so adding or filtering other layers changes nothing) is hashed with CRC32, which is
    stable across processes and Python versions, unlike ``hash(str)``.
    """
    name_key = zlib.crc32(layer_name.encode("utf-8"))
    return _splitmix64(_splitmix64(_splitmix64(base_seed & _MASK64) ^ name_key) ^ (window & _MASK64)) >> 1


def window_for_step(global_step: int, update_proj_gap: int) -> int:
    """Resample window of an optimizer step: P changes every ``update_proj_gap`` steps."""
    return global_step // update_proj_gap
