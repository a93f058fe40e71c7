"""CompActAdamW's update rules ("adam", "channel", "tensor") against float64 references, resumes, DDP, FSDP2, compile."""

import copy

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from helpers import PlainLM, make_trainer, run_two_ranks, token_loader
from lightning_compact import CompAct, CompActAdamW, CompActCallback, CompActConfig, convert_to_compact
from lightning_compact.optim import UPDATE_RULES

GAMMA = 1.01  # APOLLO's norm-growth limit, the one CompActAdamW uses


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _reference_update(rule, g_hat, n_dir, previous_norm):
    """The r-space update U (W −= lr·α·U Pᵀ) of each rule, written out in full; returns (U, its norm for the limiter)."""
    if rule == "adam":
        return n_dir, previous_norm
    if rule == "channel":
        s = n_dir.norm(dim=1, keepdim=True) / g_hat.norm(dim=1, keepdim=True)
    else:
        s = n_dir.norm() / g_hat.norm()
    u = s * g_hat
    norm = u.norm()  # = ‖N‖_F for both rules
    if previous_norm is not None:
        limiter = max(norm.item() / (GAMMA * previous_norm.item()), 1.0)
        u, norm = u / limiter, norm / limiter
    return u, norm


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_each_rule_matches_a_float64_reference_with_clipping_and_a_resample(rule):
    n, m, r = 24, 10, 6
    lr, (b1, b2), eps, wd, alpha, max_norm = 0.03, (0.9, 0.99), 1e-8, 0.1, 0.5, 2.0
    model = nn.Sequential(nn.Linear(n, m, bias=False)).double()
    convert_to_compact(model, config=CompActConfig(rank=r, grad_mode="compressed", default_exclusions=False))
    layer = model[0]
    w = layer.weight.detach().clone()
    opt = CompActAdamW(
        layer.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, scale=alpha, update_rule=rule
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, n, generator=g, dtype=torch.float64)
    grad_outs = [torch.randn(32, m, generator=g, dtype=torch.float64) for _ in range(3)]
    # Noisy steps first, then one direction repeated: ‖N‖ grows and the limiter has work to do.
    schedule = [grad_outs[0], grad_outs[1], grad_outs[2], grad_outs[2], grad_outs[2], grad_outs[2]]

    m_w = v_w = 0.0
    norm, limited, clipped = None, 0, 0
    for t, grad_out in enumerate(schedule, start=1):
        layer.set_window(t // 3)  # resampled after step 2 and step 5
        opt.zero_grad()
        (layer(x) * grad_out).sum().backward()  # ∂L/∂o = grad_out
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()

        p = layer.projection_matrix(dtype=torch.float64)  # [n, r]
        full = grad_out.T @ x  # the exact G: [m, n]
        g_hat = full @ p
        coef = min(1.0, max_norm / (g_hat.norm().item() + 1e-6))  # clip_grad_norm_'s rule, on Ĝ
        clipped += coef < 1
        g_hat = g_hat * coef
        m_w, v_w = b1 * m_w + (1 - b1) * g_hat, b2 * v_w + (1 - b2) * g_hat**2
        n_dir = (m_w / (1 - b1**t)) / ((v_w / (1 - b2**t)).sqrt() + eps)
        previous = norm
        u, norm = _reference_update(rule, g_hat, n_dir, norm)
        limited += previous is not None and rule != "adam" and norm < n_dir.norm() * (1 - 1e-9)
        w = w * (1 - lr * wd) - lr * alpha * u @ p.T
        assert rel_err(layer.weight, w) < 1e-12, t
    assert clipped > 0  # the clipping branch was exercised
    if rule != "adam":
        assert limited > 0  # and the limiter's
        assert set(opt.state[layer.weight_delta]) == {"step", "exp_avg", "exp_avg_sq", "update_norm"}
        assert opt.state[layer.weight_delta]["update_norm"].shape == ()  # one scalar per tensor


def test_the_rules_differ_and_channel_gives_each_row_the_adam_rows_norm():
    # One step from zero moments: |N| = 1 elementwise, so ‖N_i‖ = √r for every row; the
    # channel rule moves each row of W by lr·‖N_i‖·‖Ĝ_i Pᵀ‖/‖Ĝ_i‖, the Adam rule by lr·‖N_i Pᵀ‖.
    deltas = {}
    for rule in UPDATE_RULES:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 8, bias=False)).double()
        convert_to_compact(model, config=CompActConfig(rank=4, grad_mode="compressed", default_exclusions=False))
        layer = model[0]
        w0 = layer.weight.detach().clone()
        opt = CompActAdamW(layer.parameters(), lr=1.0, weight_decay=0.0, eps=0.0, update_rule=rule)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 32, generator=g, dtype=torch.float64), torch.randn(16, 8, generator=g, dtype=torch.float64)
        (layer(x) * y).sum().backward()
        g_hat = layer.weight_delta.grad.clone()
        opt.step()
        deltas[rule] = (w0 - layer.weight.detach(), g_hat, layer.projection_matrix(dtype=torch.float64))
    (d_adam, g_hat, p), (d_channel, _, _), (d_tensor, _, _) = deltas["adam"], deltas["channel"], deltas["tensor"]
    assert rel_err(d_adam, torch.sign(g_hat) @ p.T) < 1e-12
    assert rel_err(d_channel, 2.0 * g_hat / g_hat.norm(dim=1, keepdim=True) @ p.T) < 1e-12  # √r = 2
    assert rel_err(d_tensor, (32**0.5) * g_hat / g_hat.norm() @ p.T) < 1e-12  # ‖N‖_F = √(m·r)
    assert rel_err(d_channel, d_adam) > 0.1 and rel_err(d_tensor, d_channel) > 0.1


@pytest.mark.parametrize("rule", ["channel", "tensor"])
def test_a_row_without_gradient_stays_finite(rule):
    model = nn.Sequential(nn.Linear(16, 6, bias=False)).double()
    convert_to_compact(model, config=CompActConfig(rank=4, grad_mode="compressed", default_exclusions=False))
    layer = model[0]
    w0 = layer.weight.detach().clone()
    opt = CompActAdamW(layer.parameters(), lr=0.1, weight_decay=0.0, update_rule=rule)
    mask = torch.ones(6, dtype=torch.float64)
    mask[2] = 0.0  # output channel 2 gets no gradient
    for _ in range(2):
        opt.zero_grad()
        (layer(torch.randn(8, 16, dtype=torch.float64)) * mask).sum().backward()
        opt.step()
    assert torch.isfinite(layer.weight).all()
    assert torch.equal(layer.weight[2], w0[2])
    assert not torch.equal(layer.weight[0], w0[0])


def _loop(rule, steps, model=None, opt_state=None, start=0, compact=None):
    """A plain training loop of a small converted MLP; returns (model, optimizer, compact)."""
    if model is None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
        compact = CompAct(rank=4, update_proj_gap=2, default_exclusions=False, update_rule=rule)
        compact.convert(model)
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(12, 16, generator=g), torch.randn(12, 8, generator=g)
        compact.step(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, compact


@pytest.mark.parametrize("rule", ["channel", "tensor"])
def test_a_resumed_run_continues_bit_exactly_from_a_weights_only_checkpoint(tmp_path, rule):
    full, _, _ = _loop(rule, 7)
    half, opt, _ = _loop(rule, 3)
    assert all(g["update_rule"] == rule for g in opt.param_groups)
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    model.load_state_dict(ckpt["model"])
    compact = CompAct(rank=4, update_proj_gap=2, default_exclusions=False, update_rule=rule)
    compact.convert(model)
    resumed, opt2, _ = _loop(rule, 4, model=model, opt_state=ckpt["opt"], start=3, compact=compact)
    assert any("update_norm" in s for s in opt2.state.values())
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_saved_before_update_rule_existed_loads_with_the_default():
    _, opt, _ = _loop("adam", 1)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["update_rule"]
    _, opt2, _ = _loop("adam", 1)
    opt2.load_state_dict(state)
    assert all(g["update_rule"] == "adam" for g in opt2.param_groups)


def test_accumulated_micro_batches_equal_one_step_on_their_union():
    results = []
    for micro in (1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).double()
        compact = CompAct(rank=4, update_proj_gap=1, default_exclusions=False, update_rule="channel")
        compact.convert(model)
        opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(12, 16, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64)
            compact.step(step)
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (nn.functional.mse_loss(model(xs), ys) / micro).backward()
            opt.step()
            opt.zero_grad()
        results.append(model.state_dict())
    for name, ref in results[0].items():
        assert rel_err(results[1][name], ref) < 1e-12, name


def test_from_optimizer_sets_the_rule_on_groups_that_have_none_and_keeps_the_others():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    compact = CompAct(rank=4, default_exclusions=False)
    compact.convert(model)
    base = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=1e-3)
    base.param_groups[1]["update_rule"] = "tensor"
    opt = CompActAdamW.from_optimizer(base, layers=compact.compressed_layers.values(), update_rule="channel")
    assert [g["update_rule"] for g in opt.param_groups] == ["channel", "tensor"]
    assert CompAct(rank=4, update_rule="tensor").update_rule == "tensor"


def test_an_unknown_rule_is_refused_everywhere_with_the_valid_names():
    with pytest.raises(ValueError, match="'adam', 'channel', 'tensor'"):
        CompActAdamW([torch.zeros(2, requires_grad=True)], update_rule="apollo")
    with pytest.raises(ValueError, match="update_rule='sgd'"):
        CompActAdamW([{"params": [torch.zeros(2, requires_grad=True)], "update_rule": "sgd"}])
    with pytest.raises(ValueError, match="must be one of"):
        CompActAdamW.from_optimizer(torch.optim.AdamW([torch.zeros(2, requires_grad=True)]), update_rule="Channel")
    with pytest.raises(ValueError, match="must be one of"):
        CompAct(rank=4, update_rule="mini")
    with pytest.raises(MisconfigurationException, match="update_rule='mini'"):
        CompActCallback(rank=4, update_rule="mini")
    with pytest.raises(MisconfigurationException, match="grad_mode='decompressed' does not use"):
        CompActCallback(rank=4, grad_mode="decompressed", update_rule="channel")


def test_the_callback_swaps_in_an_optimizer_with_its_rule(tmp_path):
    torch.manual_seed(0)
    module = PlainLM()
    seen = {}

    class Probe(CompActCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            seen["rules"] = {g["update_rule"] for g in trainer.optimizers[0].param_groups}
            seen["type"] = type(trainer.optimizers[0])

    make_trainer(tmp_path, [Probe(rank=4, update_rule="tensor")], max_steps=2).fit(module, token_loader())
    assert seen == {"rules": {"tensor"}, "type": CompActAdamW}


def test_the_cli_key_compact_update_rule_reaches_the_callback():
    from test_cli import PRETRAIN_QUICKSTART

    from lightning_compact.cli import CompActCLI

    cli = CompActCLI(args=["--config", PRETRAIN_QUICKSTART, "--compact.update_rule=channel"], run=False)
    (compact,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CompActCallback)]
    assert compact.compact.update_rule == "channel"


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["channel", "tensor"])
def test_inductor_fullgraph_trains_like_eager(rule):
    # The model is compiled, the optimizer runs eagerly (as for the Adam rule's test in test_compile.py).
    torch.manual_seed(0)
    kwargs = dict(rank=8, update_proj_gap=1, default_exclusions=False, update_rule=rule)
    eager = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 8))
    compiled_model = copy.deepcopy(eager)
    compact_e, compact_c = CompAct(**kwargs), CompAct(**kwargs)
    compact_e.convert(eager)
    compact_c.convert(compiled_model)
    opt_e = compact_e.optimizer(torch.optim.AdamW(eager.parameters(), lr=1e-2))
    opt_c = compact_c.optimizer(torch.optim.AdamW(compiled_model.parameters(), lr=1e-2))
    compiled = torch.compile(compiled_model, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        for compact, model, opt in ((compact_e, eager, opt_e), (compact_c, compiled, opt_c)):
            compact.step(step)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for (name, pe), pc in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        assert rel_err(pc, pe) < 1e-4, name  # float32, inductor reorders: agreement to rounding


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["channel", "tensor"])
def test_two_process_ddp_matches_one_process(tmp_path, rule):
    from ddp_compressed_train import LOCAL_BATCH, N_SAMPLES, SETTINGS, WORLD

    r0, r1 = run_two_ranks("ddp_compressed_train.py", tmp_path, "adamw", rule, port_base=38500)
    assert r0["compressed"] == r0["converted"] and len(r0["converted"]) == 14
    torch.manual_seed(0)
    single = PlainLM()
    make_trainer(tmp_path / "single", [CompActCallback(rank=4, update_proj_gap=2, update_rule=rule)], **SETTINGS).fit(
        single, token_loader(n_samples=N_SAMPLES, batch_size=LOCAL_BATCH * WORLD)
    )
    torch.manual_seed(0)
    initial = PlainLM().state_dict()
    for name, ref in single.state_dict().items():
        for result in (r0, r1):
            assert rel_err(result["state"][name], ref) < 1e-10, name  # float64: summation order only
        if name.endswith("proj.weight"):
            assert rel_err(ref, initial[name]) > 1e-3, name  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["channel", "tensor"])
def test_two_process_fsdp2_matches_one_process_and_resumes_exactly(tmp_path, rule):
    # "tensor" needs the norms of the whole tensor: two scalars are all-reduced over the row shards.
    from fsdp_train import GAP, LOCAL_BATCH, N_SAMPLES, RANK, SETTINGS, STEPS, WORLD

    r0, r1 = run_two_ranks("fsdp_train.py", tmp_path, "compressed", rule, port_base=37500, timeout=600)
    assert r0["compressed"] == r0["converted"] and len(r0["converted"]) == 14
    torch.manual_seed(0)
    single = PlainLM()
    cb = CompActCallback(rank=RANK, update_proj_gap=GAP, update_rule=rule)
    make_trainer(tmp_path / "single", [cb], max_steps=STEPS, **SETTINGS).fit(
        single, token_loader(n_samples=N_SAMPLES, batch_size=LOCAL_BATCH * WORLD)
    )
    torch.manual_seed(0)
    initial = PlainLM().state_dict()
    for name, ref in single.state_dict().items():
        assert rel_err(r0["state"][name], ref) < 1e-4, name  # float32 across 2 shards
        assert torch.equal(r0["state"][name], r1["state"][name]), name
        if name.endswith("proj.weight"):
            assert rel_err(ref, initial[name]) > 1e-3, name
    for kind in ("dcp", "full"):
        for name, value in r0["state"].items():
            assert torch.equal(r0[f"resumed_{kind}"][name], value), (kind, name)


# float64: the same formulas in another summation order, over sums of at most 7 terms: 1e-14.
# bfloat16: both compute in float32 and round the result (and the kept norm) to bfloat16 once:
# one bfloat16 ulp, 2**-8 relative (the per-layer path used to round γ·previous to bfloat16 first).
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-14), (torch.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("rule", ["channel", "tensor"])
def test_the_batched_rescaling_equals_the_per_layer_one(rule, dtype, tol, monkeypatch):
    # CompActAdamW rescales a group's plain gradients a chunk of layers at a time (two ranks r,
    # two chunks for r = 4 below); the per-layer function is the definition. Mixed: zero rows, a
    # layer on its first step (no previous norm) beside limited ones, two step counts.
    from lightning_compact import optim

    monkeypatch.setattr(optim, "_CHUNK_ELEMENTS", 60)  # chunks of two layers: {0, 1}, {2, 5} (r = 4), {3, 4} (r = 6)
    chunk_sizes = []
    rescale_chunk = optim._rescale_chunk
    monkeypatch.setattr(optim, "_rescale_chunk", lambda us, *a: chunk_sizes.append(len(us)) or rescale_chunk(us, *a))
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (7, 4), (5, 4), (3, 6), (6, 6), (7, 4)]
    updates = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    grads[1][2] = 0.0  # a row without gradient
    grads[4].zero_()  # a layer without gradient
    previous = [0.5, None, 20.0, 0.1, 3.0, 0.2]  # small bounds: the limiter acts on most layers
    bcs = [0.1, 0.1, 0.1, 0.19, 0.19, 0.1]
    batched_states = [{} if p is None else {"update_norm": torch.tensor(p, dtype=dtype)} for p in previous]
    single_states = [{} if p is None else {"update_norm": torch.tensor(p, dtype=dtype)} for p in previous]
    single = [optim._rescaled_gradient(u, gr, rule, st, bc) for u, gr, st, bc in zip(updates, grads, single_states, bcs)]
    pending = list(updates)  # consumed: each entry is dropped once rescaled
    batched_by_k = dict(optim._rescaled_gradients(pending, grads, rule, batched_states, bcs))
    assert sorted(batched_by_k) == list(range(len(shapes))) and all(u is None for u in pending)
    assert chunk_sizes == [2, 2, 2]
    # Lazily, a chunk at a time: after the first yield the later chunks' updates are still pending.
    pending = list(updates)
    next(optim._rescaled_gradients(pending, grads, rule, [{} for _ in shapes], bcs))
    assert pending[0] is None and pending[2] is not None and pending[3] is not None
    batched = [batched_by_k[k] for k in range(len(shapes))]
    limited = 0
    for k, (out, ref) in enumerate(zip(batched, single)):
        assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
        assert torch.allclose(out.double(), ref.double(), rtol=tol, atol=0.0), k
        norm, ref_norm = batched_states[k]["update_norm"], single_states[k]["update_norm"]
        assert norm.dtype == ref_norm.dtype == dtype
        assert abs(norm.item() - ref_norm.item()) <= tol * abs(ref_norm.item()), k
        limited += previous[k] is not None and ref_norm.item() < updates[k].double().norm().item() / bcs[k] * (1 - 1e-2)
    assert limited >= 3  # the limiter's branch was exercised
    assert torch.equal(batched[4], torch.zeros_like(grads[4])) and torch.equal(batched[1][2], torch.zeros(4, dtype=dtype))
