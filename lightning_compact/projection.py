"""Seeded random projections ``P ∈ R^{n×r}`` with ``E[P Pᵀ] = I``, regenerated on demand.

CompAct never stores ``P``: the forward pass, the backward pass and the optimizer each
rebuild it from an integer seed. For that to be correct the same seed must give the
same ``P`` everywhere (every rank, forward and backward, before and after a resume),
and nothing may be drawn from PyTorch's global RNG (that would shift user code's
random stream and differ between ranks).

So ``P`` comes from a counter-based hash: entry ``(i, j)`` is a pure function of
``(seed, i·r + j)``, computed with wrapping int32 tensor ops. The integer bits are
identical on every device; the Gaussian's ``erfinv`` may differ by an ulp between CPU
and CUDA kernels, Rademacher signs never do. No ``torch.Generator`` is involved, which also keeps ``torch.compile``
graphs free of breaks.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from typing import Literal

import torch

__all__ = [
    "DATA_DEPENDENT_PROJECTIONS",
    "DEFAULT_PROJECTION",
    "PROJECTIONS",
    "Projection",
    "SEEDED_PROJECTIONS",
    "build_projection",
    "layer_seed",
    "make_projection",
    "seed_keys",
    "window_for_step",
]

Projection = Literal["gaussian", "rademacher", "orthogonal", "principal"]
PROJECTIONS: tuple[str, ...] = ("gaussian", "rademacher", "orthogonal", "principal")
# Projections built from the layer's input (see lightning_compact.principal), not from a
# seed alone: they cannot be rebuilt here, so a layer keeps them in its projection cache.
DATA_DEPENDENT_PROJECTIONS: tuple[str, ...] = ("principal",)
# Those make_projection builds from a seed alone.
SEEDED_PROJECTIONS: tuple[str, ...] = tuple(p for p in PROJECTIONS if p not in DATA_DEPENDENT_PROJECTIONS)
# The projection every entry point uses unless told otherwise (the one place this is decided).
DEFAULT_PROJECTION: Projection = "gaussian"

_MASK64 = 0xFFFFFFFFFFFFFFFF
_MAX_ENTRIES = 2**31 - 1


def _signed32(c: int) -> int:
    """A 32-bit constant as the int32 value with the same bits."""
    return c - 2**32 if c >= 2**31 else c


# 'lowbias32' multipliers (Wellons' hash prospector), as int32.
_M1, _M2 = _signed32(0x7FEB352D), _signed32(0x846CA68B)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In-place 32-bit avalanche hash of an int32 tensor.

    int32 arithmetic wraps modulo 2**32 on CPU and CUDA (two's complement), which is
    exactly the unsigned arithmetic the hash needs; right shifts are arithmetic in
    torch, so each is masked to a logical shift. int32 rather than int64 because
    64-bit integer multiplies are not vectorised on common CPUs (about 10x slower).
    """
    x ^= (x >> 16) & 0xFFFF
    x *= _M1
    x ^= (x >> 15) & 0x1FFFF
    x *= _M2
    x ^= (x >> 16) & 0xFFFF
    return x


def _splitmix64(value: int) -> int:
    """Mix a Python int into 64 well-spread bits (host side, used only for seeds)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _hash_bits(numel: int, keys: torch.Tensor) -> torch.Tensor:
    """``numel`` pseudo-random 32-bit words (int32) for ``keys`` (int32 ``[2]``): two hash rounds over a counter."""
    h = torch.arange(numel, device=keys.device, dtype=torch.int32)
    h ^= keys[0]
    _mix32_(h)
    h += keys[1]  # wraps
    return _mix32_(h)


def _build(in_features: int, rank: int, keys: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    # The keys are a tensor, not Python ints, so a compiled graph reads them as data: a
    # new seed or window never recompiles. The scale is derived here from the (symbolic,
    # when compiled) rank: a float argument would be specialised for every rank.
    scale = rank**-0.5
    bits = _hash_bits(in_features * rank, keys)
    if kind == "rademacher":
        signs = (bits >> 31) | 1  # the sign bit as -1 or +1
        return (signs.to(dtype) * scale).view(in_features, rank)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # The top 24 bits k give v = (2k + 1 - 2**24) / 2**24, exact in float32 and exactly
    # symmetric about 0 on (-1, 1); the inverse normal CDF √2·erfinv(v) makes it Gaussian.
    odd = ((bits >> 8) & 0xFFFFFF) * 2 + (1 - 2**24)
    normal = torch.erfinv(odd.to(work) * 2.0**-24) * (math.sqrt(2.0) * scale)
    if kind == "orthogonal":
        # Orthonormal columns from the QR of the same Gaussian (signs fixed by R's diagonal,
        # which makes Q Haar-distributed), scaled by √(n/r): PᵀP = (n/r)·I exactly and
        # E[P Pᵀ] = I still holds, with less variance than independent Gaussian columns.
        q, r_factor = torch.linalg.qr(normal.view(in_features, rank))
        q = q * torch.sign(torch.diagonal(r_factor)).unsqueeze(0)
        return (q * math.sqrt(in_features / rank)).to(dtype)
    return normal.to(dtype).view(in_features, rank)


# On CUDA the ~30 elementwise ops above cost one kernel launch each, which dominated the
# step of small models; compiled, they are one fused kernel with the same integer bits
# (and erfinv to an ulp). Compiled once with dynamic sizes and keys, so neither a new
# seed nor a new layer shape recompiles. LIGHTNING_COMPACT_COMPILE=0 turns it off;
# =1 also compiles on CPU.
_COMPILE_SETTING = os.environ.get("LIGHTNING_COMPACT_COMPILE", "auto").lower()
_compiled_build = None


def _builder(device: torch.device):
    global _compiled_build
    if torch.compiler.is_compiling():
        return _build  # traced into the caller's graph (a nested compiled function would break it)
    wanted = _COMPILE_SETTING in ("1", "true") or (_COMPILE_SETTING == "auto" and device.type == "cuda")
    if not wanted or _compiled_build is False:
        return _build
    if _compiled_build is None:
        _compiled_build = torch.compile(_build, dynamic=True, fullgraph=True)
    return _compiled_build


def make_projection(
    in_features: int,
    rank: int,
    seed: int,
    *,
    projection: Projection = DEFAULT_PROJECTION,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the ``[in_features, rank]`` projection for ``seed``; entries have variance ``1/rank``.

    Args:
        in_features: n, the size of the input being compressed.
        rank: r, the compressed size.
        seed: any Python int; equal seeds give equal matrices.
        projection: ``"gaussian"`` (the paper's, N(0, 1/r)), ``"orthogonal"`` (beyond the
            paper: the Gaussian's QR, orthonormal columns scaled by √(n/r); lower variance
            of the gradient estimate at the same rank, one QR per build) or ``"rademacher"`` (±1/√r:
            cheaper to build, exactly identical on every device).
            (``"principal"`` is built from data, not from a seed: it raises here; see
            :mod:`lightning_compact.principal`.)
        device: where to build it (no host-device copy is made).
        dtype: the result's dtype. Gaussian values are computed in float64 when
            ``dtype`` is float64, else in float32, then cast. Each entry carries 24
            random bits (Gaussian tails reach ±5.3σ).
    """
    if in_features < 1 or rank < 1:
        raise ValueError(f"in_features and rank must be positive, got {in_features} and {rank}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    _refuse_data_dependent(projection)
    if in_features * rank > _MAX_ENTRIES:
        raise ValueError(f"a projection has at most {_MAX_ENTRIES} entries, got {in_features} x {rank}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    keys = torch.tensor(seed_keys(seed), dtype=torch.int32, device=device)
    return build_projection(in_features, rank, keys, projection=projection, dtype=dtype)


def _check_seed(seed: object) -> None:
    # A float would fail later inside the hash with "unsupported operand type(s) for &".
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__}); e.g. seed=int(seed)")


def seed_keys(seed: int) -> tuple[int, int]:
    """The two int32 hash keys of ``seed`` (what :func:`build_projection` takes as a tensor)."""
    _check_seed(seed)
    key = _splitmix64(seed & _MASK64)
    return _signed32(key & 0xFFFFFFFF), _signed32(key >> 32)


def build_projection(
    in_features: int,
    rank: int,
    keys: torch.Tensor,
    *,
    projection: Projection = DEFAULT_PROJECTION,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`make_projection` from the keys of a seed held in a tensor (int32 ``[2]``, see :func:`seed_keys`).

    The projection is built on ``keys.device``. Traceable by ``torch.compile``: a
    layer keeps its keys in a buffer, so a new seed reaches a compiled graph as data.
    """
    global _compiled_build
    _refuse_data_dependent(projection)
    build = _builder(keys.device)
    if build is not _build:
        try:
            return build(in_features, rank, keys, projection, dtype)
        except Exception as err:  # a backend without a working compiler: stay correct, just slower
            warnings.warn(f"lightning_compact: compiling the projection failed ({err!r}); using eager ops", stacklevel=2)
            _compiled_build = False
    return _build(in_features, rank, keys, projection, dtype)


def _refuse_data_dependent(projection: str) -> None:
    if projection in DATA_DEPENDENT_PROJECTIONS:
        raise ValueError(
            f"projection={projection!r} is built from the layer's input (lightning_compact.principal), not from a "
            "seed: read it with CompActLinear.projection_matrix() (its projection cache), or build it with "
            "lightning_compact.principal.principal_projection(x, rank, k, keys). (CompActAdamW's moment_carry, "
            "which rebuilds past projections from their seeds, does not support it.)"
        )


def layer_seed(base_seed: int, layer_name: str, window: int) -> int:
    """The seed of one layer's projection in one resample window.

    The only place seeds are derived: the layer's fully qualified name (not its index,
    so adding or filtering other layers changes nothing) is hashed with CRC32, which is
    stable across processes and Python versions, unlike ``hash(str)``.
    """
    _check_seed(base_seed)
    name_key = zlib.crc32(layer_name.encode("utf-8"))
    return _splitmix64(_splitmix64(_splitmix64(base_seed & _MASK64) ^ name_key) ^ (window & _MASK64)) >> 1


def window_for_step(global_step: int, update_proj_gap: int) -> int:
    """Resample window of an optimizer step: P changes every ``update_proj_gap`` steps."""
    return global_step // update_proj_gap
