import math
import subprocess
import sys

import pytest
import torch

from lightning_compact.projection import SEEDED_PROJECTIONS, layer_seed, make_projection, window_for_step


@pytest.mark.parametrize("projection", SEEDED_PROJECTIONS)
def test_same_seed_gives_same_projection_and_other_seeds_differ(projection):
    a = make_projection(64, 16, 123, projection=projection)
    b = make_projection(64, 16, 123, projection=projection)
    c = make_projection(64, 16, 124, projection=projection)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (64, 16)


def test_projection_does_not_touch_the_global_rng():
    state = torch.random.get_rng_state()
    make_projection(32, 8, 1)
    make_projection(32, 8, 1, projection="rademacher")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_gaussian_entries_have_mean_zero_and_variance_one_over_r():
    n, r = 1024, 256
    p = make_projection(n, r, 7, dtype=torch.float64).flatten() * math.sqrt(r)  # should be N(0, 1)
    count = p.numel()
    # Standard errors of the sample mean, variance and P(|x|<1) of N(0,1) samples; 5 sigma.
    assert abs(p.mean().item()) < 5 / math.sqrt(count)
    assert abs(p.var().item() - 1) < 5 * math.sqrt(2 / count)
    inside = 0.6826894921370859
    assert abs((p.abs() < 1).double().mean().item() - inside) < 5 * math.sqrt(inside * (1 - inside) / count)


def test_rademacher_entries_are_plus_minus_one_over_sqrt_r():
    r = 16
    p = make_projection(128, r, 3, projection="rademacher")
    assert torch.equal(p.abs(), torch.full_like(p, 1 / math.sqrt(r)))
    count = p.numel()
    assert abs((p > 0).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / count)


@pytest.mark.parametrize("projection", SEEDED_PROJECTIONS)
def test_expected_p_pt_is_identity(projection):
    n, r, k = 16, 8, 2000
    acc = torch.zeros(n, n, dtype=torch.float64)
    for seed in range(k):
        p = make_projection(n, r, seed, projection=projection, dtype=torch.float64)
        acc += p @ p.T
    mean = acc / k
    eye = torch.eye(n, dtype=torch.float64)
    off = ~torch.eye(n, dtype=torch.bool)
    # Off-diagonal (P Pᵀ)_ij = Σ_l P_il P_jl has variance 1/r for both distributions.
    assert (mean - eye)[off].abs().max() < 5 * math.sqrt(1 / (r * k))
    diag = torch.diagonal(mean)
    if projection == "rademacher":
        assert torch.allclose(diag, torch.ones(n, dtype=torch.float64), atol=1e-12)  # exactly r · 1/r
    else:
        # Diagonal Σ_l P_il² ~ χ²_r / r: variance 2/r.
        assert (diag - 1).abs().max() < 5 * math.sqrt(2 / (r * k))


def test_orthogonal_projection_has_orthogonal_columns_of_norm_sqrt_n_over_r():
    n, r = 64, 16
    p = make_projection(n, r, 5, projection="orthogonal", dtype=torch.float64)
    assert torch.allclose(p.T @ p, (n / r) * torch.eye(r, dtype=torch.float64), atol=1e-12)
    # Same seed, same matrix; built from the seed's Gaussian (its column space).
    g = make_projection(n, r, 5, projection="gaussian", dtype=torch.float64)
    q = p * (r / n) ** 0.5
    assert torch.allclose(q @ (q.T @ g), g, atol=1e-10)


def test_layer_seed_depends_on_seed_name_and_window():
    seeds = {layer_seed(s, name, w) for s in (0, 1) for name in ("a.q_proj", "a.k_proj") for w in (0, 1, 2)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)


def test_layer_seed_is_stable_across_processes():
    # Python's hash(str) is salted per process; the seed must not be.
    code = "from lightning_compact.projection import layer_seed; print(layer_seed(5, 'model.layers.0.mlp.up_proj', 3))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == layer_seed(5, "model.layers.0.mlp.up_proj", 3)


def test_window_advances_every_gap_steps():
    assert [window_for_step(s, 3) for s in range(7)] == [0, 0, 0, 1, 1, 1, 2]


def test_bad_shapes_and_names_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        make_projection(0, 4, 1)
    with pytest.raises(ValueError, match="projection must be one of"):
        make_projection(4, 2, 1, projection="sparse")


def test_compiled_projection_matches_eager_without_recompiling(monkeypatch):
    """The fused (torch.compile) path used on CUDA, exercised here on CPU."""
    from torch._dynamo.utils import counters

    import lightning_compact.projection as proj_module

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(proj_module, "_COMPILE_SETTING", "1")
    monkeypatch.setattr(proj_module, "_compiled_build", None)
    for dtype in (torch.float32, torch.bfloat16):
        for n, r in [(64, 16), (96, 24), (688, 172), (512, 64), (1024, 256)]:
            for seed in range(2):
                compiled = make_projection(n, r, seed, dtype=dtype)
                assert proj_module._compiled_build not in (None, False)
                monkeypatch.setattr(proj_module, "_COMPILE_SETTING", "0")
                eager = make_projection(n, r, seed, dtype=dtype)
                monkeypatch.setattr(proj_module, "_COMPILE_SETTING", "1")
                # Same integer bits; erfinv's two implementations agree to a few float32 ulps
                # (then one bf16 rounding may differ by one bf16 ulp, 2**-8 relative).
                tol = 1e-5 if dtype == torch.float32 else 2**-7
                assert torch.allclose(compiled.float(), eager.float(), rtol=tol, atol=tol * eager.float().abs().max().item())
    # One graph per dtype for all shapes, ranks and seeds: none of them recompiles
    # (torch.compile gives up after 8 graphs of one function and runs it eagerly).
    assert counters["stats"]["unique_graphs"] == 2
