"""CompActAdamW against float64 references of its formula, torch's AdamW, and itself after a reload."""

import copy

import pytest
import torch
from torch import nn

from lightning_compact import CompActAdamW, CompActConfig, convert_to_compact
from lightning_compact.layers import CompActLinear
from lightning_compact.optim import put_deltas_in_place_of_weights, rebind_lr_scheduler, unsupported_reason
from lightning_compact.projection import make_projection


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _compressed_model(dtype=torch.float64, rank=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 6)).to(dtype)
    convert_to_compact(model, config=CompActConfig(rank=rank, grad_mode="compressed"))
    return model


def _batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(10, 16, generator=g, dtype=dtype), torch.randn(10, 6, generator=g, dtype=dtype)


def test_two_steps_match_a_float64_reference_of_the_formula_across_a_seed_change():
    n, m, r = 16, 12, 4
    lr, (b1, b2), eps, wd, alpha = 0.05, (0.9, 0.99), 1e-8, 0.1, 0.5
    layer = nn.Sequential(nn.Linear(n, m)).double()
    convert_to_compact(layer, config=CompActConfig(rank=r, grad_mode="compressed"))
    layer = layer[0]
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = CompActAdamW(layer.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, scale=alpha, update_rule="adam")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, n, generator=g, dtype=torch.float64)
    grad_out = torch.randn(20, m, generator=g, dtype=torch.float64)

    m_w = v_w = m_b = v_b = 0.0
    for t, window in ((1, 0), (2, 1)):  # the projection is resampled between the steps
        layer.set_window(window)
        opt.zero_grad()
        (layer(x) * grad_out).sum().backward()  # ∂L/∂o = grad_out
        opt.step()

        p = make_projection(n, r, layer.seed, dtype=torch.float64)
        g_hat = grad_out.T @ (x @ p)  # Ĝ: [m, r]
        g_b = grad_out.sum(0)
        m_w, v_w = b1 * m_w + (1 - b1) * g_hat, b2 * v_w + (1 - b2) * g_hat**2  # moments carried over
        m_b, v_b = b1 * m_b + (1 - b1) * g_b, b2 * v_b + (1 - b2) * g_b**2
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        n_w = (m_w / bc1) / ((v_w / bc2).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * alpha * n_w @ p.T
        b = b * (1 - lr * wd) - lr * (m_b / bc1) / ((v_b / bc2).sqrt() + eps)
        assert rel_err(layer.weight, w) < 1e-12
        assert rel_err(layer.bias, b) < 1e-12


def test_optimizer_state_of_a_compressed_weight_holds_r_times_m_elements():
    model = _compressed_model()
    opt = CompActAdamW(model.parameters())
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for layer in (model[0], model[2]):
        state = opt.state[layer.weight_delta]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == layer.rank * layer.out_features
        assert layer.weight not in opt.state  # no full-size moments
        assert layer.weight.grad is None and layer.weight_delta.grad.numel() == layer.rank * layer.out_features
        assert opt.state[layer.bias]["exp_avg"].shape == layer.bias.shape


def test_uncompressed_parameters_follow_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 6))
    theirs = copy.deepcopy(ours)

    def groups(model):
        return [{"params": model[0].parameters(), "lr": 0.01, "weight_decay": 0.1}, {"params": model[2].parameters()}]

    opt_a = CompActAdamW(groups(ours), lr=0.003, betas=(0.8, 0.95), eps=1e-6)
    opt_b = torch.optim.AdamW(groups(theirs), lr=0.003, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    for step in range(4):
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            x, y = _batch(step, torch.float32)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(pa, pb)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        for layer in (model[0], model[2]):
            layer.set_window(step // 2)  # resample every 2 steps
        x, y = _batch(step, torch.float32)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_state_loads_with_weights_only_and_a_reload_continues_bit_exactly(tmp_path):
    full = _compressed_model(torch.float32)
    opt = CompActAdamW(full.parameters(), lr=0.01)
    _train(full, opt, 3)
    torch.save({"model": full.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(full, opt, 3, start=3)

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _compressed_model(torch.float32, seed=1)
    resumed.load_state_dict(ckpt["model"])
    opt2 = CompActAdamW(resumed.parameters(), lr=0.01)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["scale"] == 1.0
    _train(resumed, opt2, 3, start=3)
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


def test_loading_moments_of_another_rank_is_refused():
    rank4 = _compressed_model(torch.float32, rank=4)
    opt = CompActAdamW(rank4.parameters())
    x, y = _batch(0, torch.float32)
    nn.functional.mse_loss(rank4(x), y).backward()
    opt.step()
    rank2 = _compressed_model(torch.float32, rank=2)
    with pytest.raises(ValueError, match=r"the compressed gradient of .* has moments of shape \(12, 4\).*another CompAct rank.*Resume with the rank"):
        CompActAdamW(rank2.parameters()).load_state_dict(opt.state_dict())


def test_a_weight_with_both_a_full_and_a_compressed_gradient_is_refused():
    model = _compressed_model(torch.float32)
    opt = CompActAdamW(model.parameters())
    x, y = _batch(0, torch.float32)
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad = torch.zeros_like(model[0].weight)  # as a tied use outside the layer would
    with pytest.raises(RuntimeError, match="tied"):
        opt.step()


def test_a_weight_delta_whose_model_is_gone_is_refused_with_the_fix():
    import gc

    model = _compressed_model(torch.float32)
    opt = CompActAdamW(model.parameters())
    x, y = _batch(0, torch.float32)
    nn.functional.mse_loss(model(x), y).backward()
    del model  # the optimizer now holds the parameters of layers that no longer exist
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists.*build the optimizer from the parameters of the model"):
        opt.step()


def test_from_optimizer_puts_each_weight_delta_in_its_weights_place():
    # The compressed weight itself gets neither a .grad nor moments: holding it would only
    # leave a parameter without state, which torch.distributed.checkpoint refuses to load.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 6))
    adamw = torch.optim.AdamW([{"params": [model[0].weight], "lr": 0.1}, {"params": [model[2].weight, model[0].bias]}])
    convert_to_compact(model, config=CompActConfig(rank=4, grad_mode="compressed"))  # δ made after the optimizer
    new = CompActAdamW.from_optimizer(adamw, layers=[model[0], model[2]])
    assert new.param_groups[0]["params"] == [model[0].weight_delta]
    assert new.param_groups[0]["lr"] == 0.1
    assert new.param_groups[1]["params"] == [model[2].weight_delta, model[0].bias]


def test_a_weight_delta_already_held_stays_and_its_weight_is_dropped():
    model = _compressed_model(torch.float32)
    groups = [{"params": list(model.parameters())}]
    layers = [m for m in model.modules() if isinstance(m, CompActLinear)]
    put_deltas_in_place_of_weights(groups, layers)
    held = groups[0]["params"]
    assert all(not any(p is layer.weight for p in held) for layer in layers)
    assert all(sum(p is layer.weight_delta for p in held) == 1 for layer in layers)


def test_from_optimizer_keeps_groups_and_hyperparameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    adamw = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 0.1, "tag": "a"},
            {"params": model[1].parameters(), "weight_decay": 0.0},
        ],
        lr=0.01,
        betas=(0.8, 0.9),
        eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.StepLR(adamw, step_size=1, gamma=0.5)
    new = CompActAdamW.from_optimizer(adamw, scale=0.25)
    rebind_lr_scheduler(sched, adamw, new)
    for old_g, new_g in zip(adamw.param_groups, new.param_groups):
        for key in ("params", "lr", "betas", "eps", "weight_decay", "initial_lr"):
            assert new_g[key] == old_g[key], key
        assert new_g["scale"] == 0.25 and "amsgrad" not in new_g
    assert new.param_groups[0]["tag"] == "a"
    new.step()
    sched.step()
    assert sched.optimizer is new and sched.get_last_lr() == [0.05, 0.005] == [g["lr"] for g in new.param_groups]


@pytest.mark.parametrize(
    "make, supported",
    [
        (lambda p: torch.optim.AdamW(p), True),
        (lambda p: torch.optim.Adam(p), True),
        (lambda p: torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True), True),
        (lambda p: torch.optim.Adam(p, weight_decay=0.1), False),
        (lambda p: torch.optim.AdamW(p, amsgrad=True), False),
        (lambda p: torch.optim.AdamW(p, maximize=True), False),
        (lambda p: torch.optim.SGD(p, lr=0.1), False),
    ],
)
def test_only_adam_and_adamw_equivalents_are_supported(make, supported):
    opt = make(nn.Linear(3, 3).parameters())
    assert (unsupported_reason(opt) is None) == supported
    if not supported:
        with pytest.raises(ValueError):
            CompActAdamW.from_optimizer(opt)
