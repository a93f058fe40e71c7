"""CompActAdamW(moment_carry=True): the first moment moved into the new basis at a resample.

Beyond the paper (off by default): ``M ← M (P_oldᵀP_old)⁻¹ P_oldᵀ P_new`` and each row of
``V`` set to its mean, at the first step of a new window.
"""

import io

import pytest
import torch
from torch import nn

from lightning_compact import CompActAdamW, CompActConfig, convert_to_compact
from lightning_compact.projection import make_projection


def _layer(projection="gaussian", n=16, m=12, r=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m)).double()
    convert_to_compact(model, config=CompActConfig(rank=r, grad_mode="compressed", projection=projection))
    return model[0]


def _backward(layer, step):
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(20, layer.in_features, generator=g, dtype=torch.float64)
    grad_out = torch.randn(20, layer.out_features, generator=g, dtype=torch.float64)
    (layer(x) * grad_out).sum().backward()  # ∂L/∂o = grad_out
    return x, grad_out


def _train(layer, opt, windows, start=0):
    for i, window in enumerate(windows):
        layer.set_window(window)
        opt.zero_grad()
        _backward(layer, start + i)
        opt.step()


@pytest.mark.parametrize("projection", ["gaussian", "orthogonal"])
def test_carried_moments_equal_the_hand_computed_transform(projection):
    n, r, (b1, b2) = 16, 4, (0.9, 0.99)
    layer = _layer(projection, n=n, r=r)
    opt = CompActAdamW(layer.parameters(), lr=0.01, betas=(b1, b2), weight_decay=0.0, moment_carry=True)
    _train(layer, opt, [0, 0])  # two steps in window 0
    state = opt.state[layer.weight_delta]
    m_old, v_old = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    p_old = make_projection(n, r, layer.seed, projection=projection, dtype=torch.float64)

    layer.set_window(1)
    opt.zero_grad()
    _backward(layer, 2)
    g_hat = layer.weight_delta.grad.clone()
    opt.step()

    p_new = make_projection(n, r, layer.seed, projection=projection, dtype=torch.float64)
    m_carried = m_old @ torch.linalg.inv(p_old.T @ p_old) @ p_old.T @ p_new
    v_carried = v_old.mean(dim=1, keepdim=True).expand_as(v_old)
    m_ref = b1 * m_carried + (1 - b1) * g_hat
    v_ref = b2 * v_carried + (1 - b2) * g_hat**2
    # float64 throughout: an r x r solve of a well-conditioned PᵀP (condition ~ (1+√(r/n))²/(1-√(r/n))² = 9)
    # loses a few ulps times the condition number; 1e-12 leaves three orders of margin.
    assert torch.allclose(state["exp_avg"], m_ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(state["exp_avg_sq"], v_ref, rtol=1e-12, atol=1e-16)
    if projection == "orthogonal":  # PᵀP = (n/r)·I: the carry is M Q_oldᵀ Q_new, a contraction
        assert state["exp_avg"].sub((1 - b1) * g_hat).norm() <= b1 * m_old.norm() * (1 + 1e-12)


def test_a_full_size_first_moment_in_the_old_span_is_carried_exactly():
    # If M = F P_old for a full-size F in the row space spanned by P_old's columns (F = A P_oldᵀ),
    # the least-squares reconstruction returns F and the carry gives exactly F P_new.
    n, r = 16, 4
    layer = _layer(n=n, r=r)
    opt = CompActAdamW(layer.parameters(), lr=0.01, weight_decay=0.0, betas=(0.0, 0.99), moment_carry=True)
    _train(layer, opt, [0])
    p_old = make_projection(n, r, layer.seed, dtype=torch.float64)
    a = torch.randn(layer.out_features, r, dtype=torch.float64)
    full = a @ p_old.T
    opt.state[layer.weight_delta]["exp_avg"].copy_(full @ p_old)
    layer.set_window(1)
    p_new = make_projection(n, r, layer.seed, dtype=torch.float64)
    opt._carry_moments([layer.weight_delta], [layer])
    assert torch.allclose(opt.state[layer.weight_delta]["exp_avg"], full @ p_new, rtol=1e-11, atol=1e-12)


def test_default_off_is_bit_identical_and_keeps_the_old_state():
    layer = _layer()
    reference = _layer()
    opt = CompActAdamW(layer.parameters(), lr=0.01)
    assert opt.moment_carry is False
    # The paper's rule, written out: the moments are carried as they are across the resample.
    b1, b2 = 0.9, 0.999
    m = torch.zeros_like(layer.weight_delta)
    v = torch.zeros_like(layer.weight_delta)
    for step, window in enumerate([0, 0, 1, 1, 2]):
        layer.set_window(window)
        opt.zero_grad()
        _backward(layer, step)
        g_hat = layer.weight_delta.grad.clone()
        opt.step()
        m.lerp_(g_hat, 1 - b1)  # the optimizer's own operations, in its order
        v.mul_(b2).addcmul_(g_hat, g_hat, value=1 - b2)
        assert torch.equal(opt.state[layer.weight_delta]["exp_avg"], m)
        assert torch.equal(opt.state[layer.weight_delta]["exp_avg_sq"], v)
    # Checkpoints as before: moment_carry adds nothing ("update_norm" is the default channel rule's limiter).
    assert set(opt.state[layer.weight_delta]) == {"step", "exp_avg", "exp_avg_sq", "update_norm"}
    # moment_carry=True changes nothing while the window stays the same.
    carry = CompActAdamW(reference.parameters(), lr=0.01, moment_carry=True)
    plain_layer = _layer()
    plain = CompActAdamW(plain_layer.parameters(), lr=0.01)
    _train(reference, carry, [0, 0, 0])
    _train(plain_layer, plain, [0, 0, 0])
    assert torch.equal(reference.weight, plain_layer.weight)
    assert torch.equal(carry.state[reference.weight_delta]["exp_avg"], plain.state[plain_layer.weight_delta]["exp_avg"])


def test_state_dict_round_trip_with_weights_only_continues_bit_exactly():
    full = _layer()
    opt = CompActAdamW(full.parameters(), lr=0.01, moment_carry=True)
    _train(full, opt, [0, 0, 1])
    buffer = io.BytesIO()
    torch.save({"model": full.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(full, opt, [1, 2, 2], start=3)  # a resample right after the checkpoint

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    assert ckpt["opt"]["state"][2]["projection_keys"].dtype == torch.int32  # δ is the third parameter
    resumed = _layer(seed=1)
    resumed.load_state_dict(ckpt["model"])
    opt2 = CompActAdamW(resumed.parameters(), lr=0.01, moment_carry=True)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, [1, 2, 2], start=3)
    assert torch.equal(full.weight, resumed.weight)
    assert torch.equal(opt.state[full.weight_delta]["exp_avg"], opt2.state[resumed.weight_delta]["exp_avg"])


def test_a_checkpoint_without_keys_only_records_them():
    layer = _layer()
    opt = CompActAdamW(layer.parameters(), lr=0.01)
    _train(layer, opt, [0])
    opt.moment_carry = True  # turned on later (as after CompActAdamW.from_optimizer)
    m = opt.state[layer.weight_delta]["exp_avg"].clone()
    layer.set_window(1)
    opt._carry_moments([layer.weight_delta], [layer])
    assert torch.equal(opt.state[layer.weight_delta]["exp_avg"], m)  # nothing to carry from: unknown basis
    assert "projection_keys" in opt.state[layer.weight_delta]


def test_from_optimizer_passes_moment_carry():
    layer = _layer()
    opt = CompActAdamW.from_optimizer(torch.optim.AdamW(layer.parameters()), moment_carry=True)
    assert opt.moment_carry is True
    assert CompActAdamW.from_optimizer(torch.optim.AdamW(layer.parameters())).moment_carry is False


def test_the_callback_switches_the_carry_on_in_the_optimizer_it_swaps_in(tmp_path):
    from helpers import PlainLM, make_trainer, token_loader

    from lightning_compact import CompActCallback

    seen = {}

    class Probe(CompActCallback):
        def on_train_end(self, trainer, pl_module):
            seen["carry"] = [getattr(opt, "moment_carry", None) for opt in trainer.optimizers]
            seen["keys"] = any("projection_keys" in st for opt in trainer.optimizers for st in opt.state.values())

    for carry in (False, True):
        make_trainer(tmp_path, [Probe(rank=4, update_proj_gap=2, moment_carry=carry)], max_steps=3).fit(
            PlainLM(), token_loader()
        )
        assert seen == {"carry": [carry], "keys": carry}
