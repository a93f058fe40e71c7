import math

import pytest
import torch
import torch.nn.functional as F

from lightning_compact.functional import compact_linear
from lightning_compact.projection import make_projection


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(shape, n, m, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, n, generator=g, dtype=dtype)
    w = torch.randn(m, n, generator=g, dtype=dtype) / math.sqrt(n)
    b = torch.randn(m, generator=g, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4)])
def test_forward_equals_f_linear_for_any_leading_dims(shape):
    x, w, b = _inputs(shape, 12, 6, dtype=torch.float32)
    out = compact_linear(x, w.requires_grad_(), b, rank=3, seed=1)
    assert out.shape == (*shape, 6)
    assert torch.equal(out, F.linear(x, w, b))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_input_and_bias_gradients_are_exact(dtype, tol):
    x, w, b = _inputs((4, 9), 16, 8, dtype=dtype)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    grad_out = torch.randn(4, 9, 8, dtype=dtype, generator=torch.Generator().manual_seed(3))
    compact_linear(x, w, b, rank=4, seed=11).backward(grad_out)

    # float64 reference from the plain linear layer
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xr, wr, br).backward(grad_out.double())
    assert rel_err(x.grad, xr.grad) < tol
    assert rel_err(b.grad, br.grad) < tol


@pytest.mark.parametrize("projection", ["gaussian", "rademacher", "orthogonal"])
def test_weight_gradient_is_the_decompressed_compressed_gradient(projection):
    n, m, r, seed = 16, 8, 4, 21
    x, w, b = _inputs((6, 5), n, m)
    w.requires_grad_()
    grad_out = torch.randn(6, 5, m, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    compact_linear(x, w, b, rank=r, seed=seed, projection=projection).backward(grad_out)
    p = make_projection(n, r, seed, projection=projection, dtype=torch.float64)
    go, x2 = grad_out.reshape(-1, m), x.reshape(-1, n)
    expected = (go.T @ (x2 @ p)) @ p.T  # Ĝ Pᵀ
    assert rel_err(w.grad, expected) < 1e-12


# r = 6 below. Orthogonal: P Pᵀ = (n/r)·Π with Π a uniformly random rank-r projection, so
# E[(P Pᵀ − I)²] = (n/r)²·(r/n)·I − 2·I + I = (n/r − 1)·I, i.e. an excess of −r.
@pytest.mark.parametrize("projection, excess", [("gaussian", 1), ("rademacher", -1), ("orthogonal", -6)])
def test_weight_grad_is_unbiased_with_the_predicted_variance(projection, excess):
    """E[G P Pᵀ] = G, and E‖G P Pᵀ − G‖² = (n + excess)/r · ‖G‖² (Wishart second moment)."""
    n, m, r, k = 24, 6, 6, 3000
    x, w, _ = _inputs((40,), n, m, seed=5)
    grad_out = torch.randn(40, m, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    true = grad_out.T @ x
    samples = []
    for seed in range(k):
        wk = w.clone().requires_grad_()
        compact_linear(x, wk, rank=r, seed=seed, projection=projection).backward(grad_out)
        samples.append(wk.grad)
    g = torch.stack(samples)  # [k, m, n]

    # Unbiased: every entry's sample mean within 5 standard errors of the truth.
    z = (g.mean(0) - true) / (g.std(0) / math.sqrt(k))
    assert z.abs().max() < 5

    # Variance: per-seed squared error matches the theory within 5 standard errors.
    sq_err = ((g - true) ** 2).sum(dim=(1, 2))
    predicted = (n + excess) / r * true.pow(2).sum()
    assert abs(sq_err.mean() - predicted) < 5 * sq_err.std() / math.sqrt(k)

    # Averaging K seeds shrinks the relative error as 1/√K (here: to √((n±1)/(rK))).
    rel = rel_err(g.mean(0), true)
    assert rel < 2 * math.sqrt((n + excess) / (r * k))


def _saved_numels(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = fn()
    return out, saved


def test_saves_compressed_input_not_input():
    x, w, b = _inputs((10,), 32, 8, dtype=torch.float32)
    x.requires_grad_(), w.requires_grad_()
    _, saved = _saved_numels(lambda: compact_linear(x, w, b, rank=4, seed=0))
    assert torch.Size([10, 4]) in saved
    assert torch.Size([10, 32]) not in saved


def test_frozen_weight_saves_nothing_for_it_and_gets_no_grad():
    x, w, b = _inputs((10,), 32, 8, dtype=torch.float32)
    x.requires_grad_()
    out, saved = _saved_numels(lambda: compact_linear(x, w, b, rank=4, seed=0))
    assert torch.Size([10, 4]) not in saved  # no x·P for a frozen weight
    out.sum().backward()
    assert w.grad is None
    assert rel_err(x.grad, torch.ones(10, 8) @ w) < 1e-6


def test_input_without_grad_does_not_keep_the_weight():
    x, w, b = _inputs((10,), 32, 8, dtype=torch.float32)
    w.requires_grad_()
    _, saved = _saved_numels(lambda: compact_linear(x, w, b, rank=4, seed=0))
    assert saved == [torch.Size([10, 4]), torch.Size([2])]  # x·P, and P's two int32 hash keys


def test_a_given_projection_is_used_and_saved_instead_of_its_keys():
    x, w, b = _inputs((10,), 32, 8, dtype=torch.float64)
    w.requires_grad_()
    p = make_projection(32, 4, seed=3, dtype=torch.float64)
    out, saved = _saved_numels(lambda: compact_linear(x, w, b, rank=4, proj=p))
    assert saved == [torch.Size([10, 4]), torch.Size([32, 4])]  # the cache itself: no new memory
    grad_out = torch.randn(10, 8, dtype=torch.float64)
    out.backward(grad_out)
    assert rel_err(w.grad, grad_out.T @ (x @ p) @ p.T) < 1e-12


def test_bf16_autocast_matches_autocast_linear():
    x, w, b = _inputs((4, 6), 32, 16, dtype=torch.float32)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compact_linear(x, w, b, rank=8, seed=2)
        ref = F.linear(x, w, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # Exact gradients up to bf16 rounding (8 mantissa bits: relative 2^-8 per element).
    go = torch.ones(4, 6, 16, dtype=torch.float64)
    assert rel_err(x.grad, go @ w.detach().double()) < 2**-7
    assert rel_err(b.grad, go.sum((0, 1))) < 2**-7


def test_bf16_weights():
    x, w, b = (t.to(torch.bfloat16) for t in _inputs((12,), 32, 16))
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    out = compact_linear(x, w, b, rank=8, seed=2)
    assert torch.equal(out, F.linear(x, w, b))
    out.float().pow(2).sum().backward()
    assert w.grad.dtype == torch.bfloat16 and w.grad.shape == w.shape
    assert torch.isfinite(w.grad.float()).all()


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank_is_rejected(rank):
    x, w, _ = _inputs((3,), 8, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        compact_linear(x, w, rank=rank, seed=0)
