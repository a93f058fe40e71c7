"""The ``"principal"`` projection: the input's top-k directions plus a scaled random complement.

Beyond the paper, in the manner of PRAC (arXiv 2602.23111). Each resample window a layer
builds, from the input ``x`` (``[tokens, n]``) of its first training forward,

    P = [U_k, c·Q_c]  (``[n, r]``),   c = √((n − k)/(r − k)),

where ``U_k`` (``[n, k]``) spans the top-k right singular directions of ``x`` (a randomized
range finder, Halko, Martinsson & Tropp 2011: ``Y = (xᵀx)^(q+1) Ω`` with QR between the
powers, then the top eigenvectors of the small ``Qᵀ xᵀx Q``) and ``Q_c`` (``[n, r − k]``)
is orthonormal in the orthogonal complement of ``U_k``, drawn at random: the QR of
``[U_k | Z]`` with ``Z`` Gaussian, signs fixed by ``R``'s diagonal.

**Unbiasedness.** Let ``Π_k = U_k U_kᵀ`` and ``Π_c = I − Π_k``. Given ``U_k``, ``Π_c Z`` is
a standard Gaussian matrix on the ``(n − k)``-dimensional complement, so ``Q_c`` is Haar
distributed there (the sign fix makes the QR's map equivariant) and the law of the
projector ``Q_c Q_cᵀ`` is invariant under every rotation of the complement. Its mean is
therefore a multiple of ``Π_c``; the trace fixes it: ``E[Q_c Q_cᵀ] = (r − k)/(n − k) · Π_c``.
Hence

    E[P Pᵀ | U_k] = Π_k + c² (r − k)/(n − k) Π_c = Π_k + Π_c = I,

and ``Ĝ Pᵀ = G P Pᵀ`` is an unbiased estimate of ``G`` (``nn.Linear`` layout ``[m, n]``)
conditionally on the data that chose ``U_k``; the random bits come from the counter-based
hash of the window's seed (:mod:`lightning_compact.projection`), independent of the data.

**Variance.** With ``(c² Q_cQ_cᵀ − Π_c)² = (c⁴ − 2c²) Q_cQ_cᵀ + Π_c`` the same mean gives
``E‖G P Pᵀ − G‖² = (c² − 1)‖G Π_c‖² = (n − r)/(r − k) · ‖G Π_c‖²``: only the part of the
gradient outside the principal subspace is estimated with noise. The orthogonal projection
(``k = 0``) has ``(n − r)/r · ‖G‖²``; the principal one is better when
``‖G Π_c‖²/‖G‖² < (r − k)/r``, i.e. when the gradient's row space (that of ``x``) is
concentrated. ``E‖P Pᵀ − I‖²_F = (n − k)(n − r)/(r − k)``.

**Which data.** ``U_k`` comes from the first micro-batch of the window and is kept for the
window's other micro-batches and steps (one ``P`` per optimizer step, as gradient
accumulation needs); unbiasedness holds exactly for gradients independent of the complement
draw, as for the paper's seeded ``P`` held for ``T`` steps. Under ``torch.distributed`` the
``P`` of rank 0 is broadcast to every rank (:func:`broadcast_basis_`), so all ranks use the
same ``P`` although their micro-batches differ. (Tested with 2 gloo processes under DDP; under
FSDP2 and under ``torch.compile`` together with torch.distributed, not yet.)

**The update in CompActAdamW.** Adam normalises each r-space coordinate by its own second
moment, so scaling a column of ``P`` scales ``Ĝ``'s coordinate but leaves ``N = M̂/(√V̂+ε)``
unchanged; the scale reappears only in the update ``N Pᵀ = N_k U_kᵀ + c·N_c Q_cᵀ``. Each
principal direction thus gets a step of 1 (per coordinate of ``N``), each random one c, where
the Gaussian and orthogonal projections give all r directions √(n/r). The total
``‖N Pᵀ‖² ≈ m(k + c²(r − k)) = m·n`` equals theirs, so a learning rate keeps its meaning; the
split follows the same rule as theirs (a block standing for d of the n dimensions with j
columns steps √(d/j)). The paper's ``N Pᵀ`` is kept; ``benchmarks/diagnostics/projection_variance.py
--loss-steps`` compares it with a step of c for the principal directions too.

Nothing here knows layers: :class:`~lightning_compact.layers.CompActLinear` calls
:func:`principal_projection` at its first training forward of a window and keeps the result
in its projection cache (which is therefore also what checkpoints carry).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lightning_compact.projection import build_projection

__all__ = [
    "OVERSAMPLE",
    "POWER_ITERATIONS",
    "broadcast_basis_",
    "principal_projection",
    "resolve_principal_rank",
    "top_directions",
]

# Range-finder settings (Halko et al. §4.3-4.4): a few extra sketch columns and two power
# iterations find the top-k subspace of activations (slowly decaying spectra) to a few
# percent of the optimum; each costs two [tokens, n] x [n, k + p] matmuls, once per window.
OVERSAMPLE: int = 8
POWER_ITERATIONS: int = 2

# XOR masks that split a window's hash keys into two independent streams: the sketch Ω and
# the complement's Gaussian (equal keys would make them share their first bits).
_SKETCH_MASK = (0x1B873593, 0x0)
_COMPLEMENT_MASK = (0x5BD1E995, 0x0)


def resolve_principal_rank(principal_rank: int | float, rank: int) -> int:
    """k, the number of principal directions of a layer of rank ``rank``.

    An ``int`` is absolute, a ``float`` in (0, 1) a fraction of ``rank`` (rounded). At
    least one column stays random (k ≤ r − 1), since the random part is what makes
    ``E[P Pᵀ] = I``; a rank-1 layer gets k = 0 (the orthogonal projection). ``1.0`` is the
    exception: every column principal (k = r), ``P = U_r``, no random part: a biased,
    GaLore-like estimate (see :func:`principal_projection`).
    """
    if isinstance(principal_rank, float) and principal_rank == 1.0:
        return rank
    if isinstance(principal_rank, bool):
        raise TypeError("principal_rank must be an int or a float, not a bool")
    if isinstance(principal_rank, int):
        if principal_rank < 1:
            raise ValueError(f"principal_rank must be >= 1 when given as an int, got {principal_rank}")
        k = principal_rank
    elif isinstance(principal_rank, float):
        if not 0.0 < principal_rank < 1.0:
            raise ValueError(
                f"principal_rank as a float is a fraction of each layer's rank r and must be in (0, 1], got "
                f"{principal_rank}; pass an int for an absolute number of principal directions (1.0: all r, biased)"
            )
        k = max(1, round(principal_rank * rank))
    else:
        raise TypeError(f"principal_rank must be an int or a float, got {type(principal_rank).__name__}")
    return min(k, rank - 1)


def _stream(keys: torch.Tensor, mask: tuple[int, int]) -> torch.Tensor:
    return keys ^ torch.tensor(mask, dtype=torch.int32, device=keys.device)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def top_directions(
    x: torch.Tensor,
    k: int,
    keys: torch.Tensor,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
) -> torch.Tensor:
    """Orthonormal ``[n, k]``: the (approximate) top-k right singular directions of ``x`` (``[tokens, n]``).

    Randomized range finder with subspace iteration: ``Ω`` (``[n, k + p]``) is a Gaussian
    from ``keys``' sketch stream; ``Q = qr((xᵀx)^(q+1) Ω)`` with a QR after each power;
    then the top-k eigenvectors of ``Qᵀ xᵀx Q`` (``[k + p, k + p]``, in float64 where the
    device has it), mapped back by ``Q``. Computed in float32 (float64 for float64 ``x``);
    traceable by ``torch.compile``.
    """
    n = x.shape[-1]
    work = _work_dtype(x)
    x = x.reshape(-1, n).to(work)
    width = min(n, k + oversample)
    y = build_projection(n, width, _stream(keys, _SKETCH_MASK), projection="gaussian", dtype=work)
    for _ in range(power_iterations + 1):
        y = x.t() @ (x @ y)  # (xᵀx) y: never forms the [n, n] covariance
        y = torch.linalg.qr(y)[0]
    b = x @ y  # [tokens, k + p]
    small = torch.float32 if x.device.type == "mps" else torch.float64
    gram = (b.t() @ b).to(small)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = vecs.flip(-1)[:, :k].to(work)
    return y @ top


def principal_projection(
    x: torch.Tensor,
    rank: int,
    k: int,
    keys: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
) -> torch.Tensor:
    """``P = [U_k, c·Q_c]`` (``[n, rank]``) for the input ``x`` (``[..., n]``); see the module docstring.

    Args:
        x: the layer's input (any leading shape); only read.
        rank: r, columns of ``P`` (``1 <= r < n``).
        k: principal columns (``0 <= k <= r``). ``k = r`` gives ``P = U_r`` (orthonormal, no
            random part): ``E[P Pᵀ] = Π_r ≠ I``, so ``Ĝ Pᵀ = G Π_r`` drops the gradient outside
            the input's top-r subspace instead of estimating it with noise, as GaLore drops
            what lies outside the gradient's top-r subspace.
        keys: the window's hash keys (int32 ``[2]``): the sketch and the complement are
            drawn from two streams of them, never from the global RNG.
        dtype: the result's dtype (computed in float32, or float64 for float64 ``x``).
    """
    n = x.shape[-1]
    if not (0 <= k <= rank < n):
        raise ValueError(f"need 0 <= k <= rank < n, got k={k}, rank={rank}, n={n}")
    work = _work_dtype(x)
    if k == rank:
        u = top_directions(x, k, keys, oversample=oversample, power_iterations=power_iterations)
        q, r_factor = torch.linalg.qr(u)
        return (q * torch.sign(torch.diagonal(r_factor)).unsqueeze(0)).to(dtype)
    z = build_projection(n, rank - k, _stream(keys, _COMPLEMENT_MASK), projection="gaussian", dtype=work)
    if k > 0:
        u = top_directions(x, k, keys, oversample=oversample, power_iterations=power_iterations)
        z = torch.cat([u, z], dim=1)
    # Householder QR of [U_k | Z]: the first k columns are U_k (up to sign, fixed below, as
    # U_k is orthonormal); the rest are orthonormal in U_k's complement, Haar-distributed.
    q, r_factor = torch.linalg.qr(z)
    q = q * torch.sign(torch.diagonal(r_factor)).unsqueeze(0)
    c = math.sqrt((n - k) / (rank - k))
    scale = torch.cat([q.new_ones(k), q.new_full((rank - k,), c)])
    return (q * scale).to(dtype)


def broadcast_basis_(basis: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Under an initialized default process group, overwrite ``basis`` with rank ``src``'s (in place).

    Ranks see different micro-batches, so each finds a different ``U_k``; one ``P`` for all
    keeps the compressed gradients of every rank in one space (DDP/FSDP2 average them).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(basis, src=src)
    return basis
