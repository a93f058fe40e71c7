"""The prototype ablations (lightning_compact.ablations): projections and moment transfer."""

from __future__ import annotations

import torch

from lightning_compact.ablations import orthogonal_projection, transfer_moments
from lightning_compact.projection import make_projection


def test_orthogonal_projection_is_scaled_orthonormal_and_unbiased():
    n, r = 64, 16
    p = orthogonal_projection(n, r, seed=3, dtype=torch.float64)
    assert torch.allclose(p.t() @ p, torch.eye(r, dtype=torch.float64) * n / r, atol=1e-10)
    assert torch.equal(p, orthogonal_projection(n, r, seed=3, dtype=torch.float64))  # seeded
    # E[P Pᵀ] = I: the average over many seeds approaches the identity.
    mean = sum(orthogonal_projection(n, r, seed=s, dtype=torch.float64) @ orthogonal_projection(n, r, seed=s, dtype=torch.float64).t() for s in range(400)) / 400
    assert (mean - torch.eye(n, dtype=torch.float64)).abs().max() < 0.25
    assert torch.allclose(torch.diagonal(mean), torch.ones(n, dtype=torch.float64), atol=0.1)


def test_lstsq_carry_is_the_projection_of_the_old_moment_onto_the_new_basis():
    torch.manual_seed(0)
    m, n, r_old, r_new = 5, 32, 8, 4
    g = torch.randn(m, n, dtype=torch.float64)
    p_old = make_projection(n, r_old, 1, dtype=torch.float64)
    p_new = make_projection(n, r_new, 2, dtype=torch.float64)
    moment = g @ p_old
    second = torch.rand(m, r_old, dtype=torch.float64)
    new_m, new_v = transfer_moments(moment, second, p_old, p_new, "lstsq")
    # Least-squares reconstruction of G inside span(P_old), then compressed with P_new.
    proj_old = p_old @ torch.linalg.pinv(p_old)  # orthogonal projector onto span(P_old)
    assert torch.allclose(new_m, g @ proj_old.t() @ p_new, atol=1e-10)
    assert new_v.shape == (m, r_new)
    assert torch.allclose(new_v, second.mean(1, keepdim=True).expand(m, r_new))
    # A moment already in the old basis that equals G P_old for G in span(P_old) transfers exactly.
    g_in = g @ proj_old.t()
    assert torch.allclose(transfer_moments(g_in @ p_old, second, p_old, p_new, "lstsq")[0], g_in @ p_new, atol=1e-10)
    raw, _ = transfer_moments(moment, second, p_old, p_new, "raw")
    assert torch.allclose(raw, moment @ p_old.t() @ p_new, atol=1e-10)
    zero, _ = transfer_moments(moment, second, p_old, p_new, "reset")
    assert zero.abs().sum() == 0 and zero.shape == (m, r_new)


def test_carry_optimizer_moves_moments_when_the_seed_changes():
    from torch import nn

    from lightning_compact.ablations import CarryCompActAdamW
    from lightning_compact.layers import CompActConfig, compressed_grad_of, convert_to_compact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(8, 4, bias=False))
    report = convert_to_compact(model, config=CompActConfig(rank=4, compress_grad=True))
    layer = report.converted["0"]
    opt = CarryCompActAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, carry="reset")
    x = torch.randn(10, 16)

    def step() -> torch.Tensor:
        opt.zero_grad()
        model(x).square().sum().backward()
        g = compressed_grad_of(layer.weight).value.clone()
        opt.step()
        return g

    step()
    step()  # same window: nothing to transfer
    assert opt.transfers == 0
    for m in report.converted.values():
        m.window = 1  # a resample
    g = step()
    assert opt.transfers == len(report.converted)
    # Reset: the first moment restarts from zero in the new basis, so after one step it is (1 - β₁)·Ĝ.
    assert torch.allclose(opt.state[layer.weight]["exp_avg"], 0.1 * g, atol=1e-7)
