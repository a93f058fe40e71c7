"""projection="principal": P = [U_k, c·Q_c], top input directions plus a scaled random complement."""

import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from helpers import TINY_LLAMA, PlainLM, make_trainer, run_two_ranks, token_loader
from lightning_compact import CompAct, CompActCallback
from lightning_compact.layers import CompActConfig
from lightning_compact.models.llama import LlamaForCausalLM
from lightning_compact.principal import principal_projection, resolve_principal_rank, top_directions
from lightning_compact.projection import make_projection, seed_keys


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def keys(seed: int) -> torch.Tensor:
    return torch.tensor(seed_keys(seed), dtype=torch.int32)


def spiked_input(tokens: int, n: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[tokens, n]`` whose right singular values are ``spectrum`` (a random orthonormal basis)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    left, _ = torch.linalg.qr(torch.randn(tokens, n, generator=g, dtype=torch.float64))
    return left @ torch.diag(spectrum.double()) @ basis.t()


def test_top_directions_span_the_float64_svd_subspace():
    n, k = 48, 6
    spectrum = torch.cat([torch.linspace(10, 5, k), torch.full((n - k,), 0.5)])  # a gap of 10x in the singular values
    x = spiked_input(256, n, spectrum)
    ref = torch.linalg.svd(x, full_matrices=False).Vh[:k].t()  # float64 reference
    proj_ref = ref @ ref.t()
    for dtype in (torch.float64, torch.float32):
        u = top_directions(x.to(dtype), k, keys(3))
        assert rel_err(u.t().double() @ u.double(), torch.eye(k, dtype=torch.float64)) < 1e-5  # orthonormal
        # Subspace iteration with q = 2: the error falls as (σ_k+1/σ_k)^(2(q+1)) = 0.1^6 times a
        # modest constant from the Gaussian sketch (Halko et al. §9-10); float32 rounding adds ~1e-7.
        assert rel_err(u.double() @ u.double().t(), proj_ref) < 10 * 0.1**6


def test_principal_projection_has_the_stated_structure_and_float32_matches_float64():
    n, r, k = 40, 10, 4
    x = spiked_input(128, n, torch.linspace(8, 0.1, n))
    p64 = principal_projection(x, r, k, keys(5), dtype=torch.float64)
    c2 = (n - k) / (r - k)
    gram = p64.t() @ p64
    assert rel_err(gram, torch.diag(torch.tensor([1.0] * k + [c2] * (r - k), dtype=torch.float64))) < 1e-12
    u = top_directions(x, k, keys(5))
    assert rel_err(p64[:, :k], u) < 1e-10  # the principal block is U_k itself
    p32 = principal_projection(x.float(), r, k, keys(5))
    assert p32.dtype == torch.float32 and rel_err(p32, p64) < 1e-4
    assert torch.equal(principal_projection(x, r, k, keys(5), dtype=torch.float64), p64)  # deterministic
    assert not torch.equal(principal_projection(x, r, k, keys(6), dtype=torch.float64), p64)


def test_expected_p_pt_is_identity_with_the_theoretical_spread():
    # Fixed data (so a fixed U_k up to the sketch's randomness); many complement draws.
    # E‖PPᵀ − I‖²_F = (n − k)(n − r)/(r − k) per draw (principal.py), so the mean of N draws
    # has E‖M̄ − I‖²_F = (n − k)(n − r)/((r − k) N). That is a sum over ~(n − k)²/2
    # independent-ish entries: relative spread ≈ √(2/91) ≈ 0.15 here, so [0.5, 1.5] is > 3σ.
    n, r, k, draws = 16, 6, 2, 1000
    x = spiked_input(64, n, torch.cat([torch.tensor([20.0, 10.0]), torch.full((n - 2,), 1.0)]))
    eye = torch.eye(n, dtype=torch.float64)
    acc = torch.zeros(n, n, dtype=torch.float64)
    per_draw = []
    for seed in range(draws):
        p = principal_projection(x, r, k, keys(seed), dtype=torch.float64)
        acc += p @ p.t()
        per_draw.append(float((p @ p.t() - eye).norm() ** 2))
    expected_one = (n - k) * (n - r) / (r - k)
    assert abs(sum(per_draw) / draws - expected_one) < 0.01 * expected_one  # exact identity per draw
    measured = float((acc / draws - eye).norm() ** 2)
    expected = expected_one / draws
    assert 0.5 * expected < measured < 1.5 * expected
    # The wrong scale (c = 1, an orthonormal P) is biased: E‖M̄ − I‖² → (n − k)(1 − (r − k)/(n − k))².
    assert (n - k) * (1 - (r - k) / (n - k)) ** 2 > 100 * expected


def test_gradient_estimate_is_unbiased_with_the_variance_formula():
    # E‖G(PPᵀ − I)‖² = (n − r)/(r − k) · ‖G Π_c‖² (principal.py); the mean estimate converges to G.
    n, r, k, draws = 24, 8, 4, 600
    x = spiked_input(96, n, torch.cat([torch.linspace(12, 6, k), torch.full((n - k,), 1.0)]))
    g = torch.randn(10, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ x  # G = dYᵀ x: [m, n]
    acc = torch.zeros_like(g)
    sq = []
    for seed in range(draws):
        p = principal_projection(x, r, k, keys(seed), dtype=torch.float64)
        est = g @ p @ p.t()
        acc += est
        u = p[:, :k]
        gc = g - g @ u @ u.t()
        sq.append((float((est - g).norm() ** 2), (n - r) / (r - k) * float(gc.norm() ** 2)))
    errs = torch.tensor([a for a, _ in sq])
    theory = torch.tensor([b for _, b in sq]).mean()
    # CLT: the mean of the squared errors is within 4 standard errors of the theory's value.
    assert abs(errs.mean() - theory) < 4 * errs.std() / math.sqrt(draws)
    # The bias: ‖mean − G‖² has expectation theory/N; 3x is a > 5σ bound for this many entries.
    assert float((acc / draws - g).norm() ** 2) < 3 * theory / draws
    # And the principal estimate is much less noisy than the orthogonal one on such data.
    orth = [make_projection(n, r, s, projection="orthogonal", dtype=torch.float64) for s in range(50)]
    orth_sq = sum(float((g @ q @ q.t() - g).norm() ** 2) for q in orth) / len(orth)
    assert theory < 0.2 * orth_sq


def test_principal_rank_resolution_and_validation():
    assert resolve_principal_rank(0.5, 8) == 4
    assert resolve_principal_rank(0.9, 8) == 7
    assert resolve_principal_rank(0.99, 8) == 7  # at least one random column
    assert resolve_principal_rank(3, 8) == 3 and resolve_principal_rank(20, 8) == 7
    assert resolve_principal_rank(0.5, 1) == 0  # rank 1: the orthogonal projection
    assert resolve_principal_rank(1.0, 8) == 8  # all principal: P = U_r, no random part (biased)
    for bad in (0.0, 1.5, -2, 0):
        with pytest.raises(ValueError, match="principal_rank"):
            CompActConfig(rank=4, projection="principal", principal_rank=bad)
    with pytest.raises(TypeError, match="principal_rank"):
        CompActConfig(rank=4, projection="principal", principal_rank=True)
    with pytest.raises(ValueError, match="cache_projections=True"):
        CompActConfig(rank=4, projection="principal", cache_projections=False)
    with pytest.raises(ValueError, match="share_projection=False"):
        CompActConfig(rank=4, projection="principal", share_projection=True)
    with pytest.raises(ValueError, match="moment_carry=False"):
        CompAct(rank=4, projection="principal", moment_carry=True)
    with pytest.raises(ValueError, match="projection_matrix"):
        make_projection(16, 4, 0, projection="principal")


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 8))


def test_basis_is_built_once_per_window_from_its_first_micro_batch():
    torch.manual_seed(0)
    model = _mlp()
    compact = CompAct(rank=8, projection="principal", update_proj_gap=2, default_exclusions=False)
    compact.convert(model)
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    first = model[0]
    assert first.principal_k == 4 and first.basis_pending
    g = torch.Generator().manual_seed(1)
    seen = []
    for step in range(4):
        compact.step(step)
        for micro in range(2):  # gradient accumulation: one P for both micro-batches
            x = torch.randn(16, 32, generator=g)
            if step % 2 == 0 and micro == 0:
                expected = principal_projection(x, 8, 4, first.projection_keys)
            model(x).pow(2).mean().backward()
            assert not first.basis_pending
            assert torch.equal(first.projection_matrix(), expected)
        seen.append(first.projection_matrix().clone())
        opt.step()
        opt.zero_grad()
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3]) and not torch.equal(seen[1], seen[2])


def test_compressed_gradient_is_g_times_p_against_float64():
    torch.manual_seed(0)
    layer_model = nn.Sequential(nn.Linear(32, 16))
    ref_weight = layer_model[0].weight.detach().double().clone()
    compact = CompAct(rank=8, projection="principal", default_exclusions=False)
    compact.convert(layer_model)
    compact.step(0)
    x, dy = torch.randn(64, 32), torch.randn(64, 16)
    (layer_model(x) * dy).sum().backward()
    layer = layer_model[0]
    g = dy.double().t() @ x.double()  # the exact weight gradient, [m, n]
    p = principal_projection(x.double(), 8, 4, layer.projection_keys, dtype=torch.float64)
    assert rel_err(layer.weight_delta.grad, g @ p) < 1e-5
    assert torch.equal(layer.weight.detach().double(), ref_weight)


def _llama_run(steps, compact_state=None, model_state=None, opt_state=None, start=0, accumulate=2):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_LLAMA)
    compact = CompAct(rank=4, projection="principal", update_proj_gap=3)
    compact.convert(model)
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    if model_state is not None:
        model.load_state_dict(model_state, strict=True)  # the plain model's keys: nothing CompAct-specific
        opt.load_state_dict(opt_state)
        compact.load_state_dict(compact_state)
    data = token_loader(n_samples=4 * accumulate * steps, batch_size=4).dataset.tensors[0].view(steps, accumulate, 4, -1)
    for step in range(start, steps):
        compact.step(step)
        for micro in range(accumulate):
            model(data[step, micro], labels=data[step, micro]).backward()
        opt.step()
        opt.zero_grad()
    return model, compact, opt


def test_resume_mid_window_through_the_controller_is_bit_exact(tmp_path):
    full, _, _ = _llama_run(6)
    # Stop after step 3 (window 1 = steps 3-5 has begun: its basis came from step 3's data).
    part, compact, opt = _llama_run(4)
    torch.save({"model": part.state_dict(), "opt": opt.state_dict(), "compact": compact.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(ckpt["compact"]["principal_bases"]) == set(compact.layers)
    assert set(ckpt["model"]) == set(LlamaForCausalLM(TINY_LLAMA).state_dict())
    resumed, _, _ = _llama_run(6, ckpt["compact"], ckpt["model"], ckpt["opt"], start=4)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # Without the bases the resumed run builds window 1's P from step 4's data instead: it diverges.
    no_bases = {k: v for k, v in ckpt["compact"].items() if k != "principal_bases"}
    other, _, _ = _llama_run(6, no_bases, ckpt["model"], ckpt["opt"], start=4)
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), other.state_dict().values()))


def test_resume_mid_window_through_the_callback_is_bit_exact(tmp_path):
    loader = token_loader(n_samples=12, batch_size=4)  # 3 steps per epoch
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    torch.manual_seed(0)
    full = PlainLM()
    cb = CompActCallback(rank=4, update_proj_gap=4, projection="principal", principal_rank=2)
    make_trainer(tmp_path / "full", [cb, ckpts], max_steps=6, enable_checkpointing=True).fit(full, loader)
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=True)
    bases = next(v for k, v in saved["callbacks"].items() if "CompActCallback" in k)["principal_bases"]
    assert len(bases) == len(cb.layers) and all(b["window"] == 0 for b in bases.values())
    plain = PlainLM()
    plain.load_state_dict(saved["state_dict"], strict=True)

    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    resumed = PlainLM()
    make_trainer(tmp_path / "b", [CompActCallback(rank=4, update_proj_gap=4, projection="principal", principal_rank=2)],
                 max_steps=6).fit(resumed, loader, ckpt_path=path)
    for (name, w), r in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(w, r), name


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_fullgraph_matches_eager_with_one_extra_graph_for_the_refresh():
    torch.manual_seed(0)
    eager = LlamaForCausalLM(TINY_LLAMA)
    compiled_model = copy.deepcopy(eager)
    runs = []
    backend = CountingBackend()
    for model, compile_it in ((eager, False), (compiled_model, True)):
        compact = CompAct(rank=4, projection="principal", update_proj_gap=2)
        compact.convert(model)
        opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        fn = torch.compile(model, fullgraph=True, backend=backend) if compile_it else model
        runs.append((compact, model, fn, opt))
    tokens = torch.randint(0, TINY_LLAMA.vocab_size, (6, 2, 16), generator=torch.Generator().manual_seed(2))
    for step in range(6):  # three windows
        for compact, model, fn, opt in runs:
            compact.step(step)
            fn(tokens[step], labels=tokens[step]).backward()
            opt.step()
            opt.zero_grad()
        a, b = (run[1].model.layers[0].mlp.up_proj.projection_matrix() for run in runs)
        assert rel_err(b, a) < 1e-5
    assert backend.graphs == 2  # one with the basis refresh, one without; no graph per window
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        assert rel_err(b, a) < 1e-5, name


@pytest.mark.slow
def test_two_process_ddp_ranks_share_rank_zeros_basis(tmp_path):
    """Each rank sees other micro-batches; the basis is rank 0's everywhere, so the runs stay identical."""
    r0, r1 = run_two_ranks("ddp_compressed_train.py", tmp_path, "adamw", "adam", "principal", port_base=36500)
    assert r0["sent"] == [r0["compressed_numel"]] * 3  # DDP reduced Ĝ (r·m per weight), not full gradients
    assert set(r0["projections"]) == {name.removesuffix(".weight") for name in r0["converted"]}
    for name, p in r0["projections"].items():
        assert torch.equal(p, r1["projections"][name]), name
        # Built from data (window 1's), not the seeded orthogonal placeholder both ranks start from.
        n, r = p.shape
        k = resolve_principal_rank(0.5, r)
        assert rel_err(p.t() @ p, torch.diag(torch.tensor([1.0] * k + [(n - k) / (r - k)] * (r - k)))) < 1e-5
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), name


def test_cli_keys_reach_the_layers():
    from pathlib import Path

    from lightning_compact.cli import CompActCLI

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "pretrain_llama_tiny.yaml"
    cli = CompActCLI(args=["--config", str(recipe), "--compact.projection=principal", "--compact.principal_rank=3"],
                     run=False)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, CompActCallback)]
    assert cb.compact.config.projection == "principal" and cb.compact.config.principal_rank == 3
    model = _mlp()
    cb.compact.convert(model)
    assert cb.compact.layers and all(layer.principal_k == min(3, layer.rank - 1) for layer in cb.compact.layers.values())


def test_all_principal_projection_is_the_top_subspace_in_float64():
    """principal_rank=1.0: P = U_r, orthonormal, spanning the input's top-r right singular subspace."""
    g = torch.Generator().manual_seed(3)
    n, r, tokens = 48, 6, 400
    signal = torch.randn(tokens, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    x = 10 * signal + 0.01 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    p = principal_projection(x, r, r, torch.tensor([5, 9], dtype=torch.int32), dtype=torch.float64)
    assert p.shape == (n, r)
    assert rel_err(p.t() @ p, torch.eye(r, dtype=torch.float64)) < 1e-12
    v = torch.linalg.svd(x, full_matrices=False).Vh[:r].t()
    assert rel_err(p @ p.t(), v @ v.t()) < 1e-6  # the same subspace as the exact SVD's
