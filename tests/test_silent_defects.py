"""Issue 24: nothing silently wrong (param groups, shared layers, hooks, pickling, optimizer reuse, resume).

Each test reproduces one defect of the issue and fails without its fix.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from helpers import PlainLM, make_trainer, token_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_compact import (
    CompAct,
    CompActAdamW,
    CompActCallback,
    CompActConfig,
    CompActLinear,
    compact_linear,
    convert_to_compact,
)
from lightning_compact.layers import conversion_report, delta_owner, restore_linear
from lightning_compact.optim import compress_moments_, decompress_moments_
from lightning_compact.projection import build_projection, layer_seed, make_projection, seed_keys


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _batches(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, compact: CompAct | None, steps: int = 30) -> None:
    for step, (x, y) in enumerate(_batches(steps)):
        if compact is not None:
            compact.step(step)
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


# -- 1. weight decay with groups split by name --------------------------------------------


def _groups_by_name(model: nn.Module, wd: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def _groups_by_ndim(model: nn.Module, wd: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def _compressed_run(split, wd: float) -> tuple[nn.Module, CompActAdamW]:
    model = _mlp()
    compact = CompAct(rank=4, update_proj_gap=10, default_exclusions=False)
    compact.convert(model)
    opt = compact.optimizer(torch.optim.AdamW(split(model, wd), lr=1e-2))
    _train(model, opt, compact)
    return model, opt


def test_each_delta_lands_in_its_weights_group_when_groups_are_split_by_name():
    model, opt = _compressed_run(_groups_by_name, wd=0.5)
    layers = [model[0], model[2]]
    # The decay group holds both δ (in place of their weights); the other group the biases only.
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(layer.weight_delta) for layer in layers]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(layer.bias) for layer in layers]
    by_ndim, _ = _compressed_run(_groups_by_ndim, wd=0.5)
    no_decay, _ = _compressed_run(_groups_by_name, wd=0.0)
    for a, b, c in zip(layers, [by_ndim[0], by_ndim[2]], [no_decay[0], no_decay[2]]):
        # Same groups' contents as the ndim split, so the same numbers; and decay did act:
        # 30 steps of (1 - lr·λ) = 0.995 shrink the weights by ~14% against the undecayed run.
        assert torch.equal(a.weight, b.weight)
        assert a.weight.norm() < 0.95 * c.weight.norm()


def test_a_delta_listed_on_its_own_yields_to_its_weights_group():
    model = _mlp()
    compact = CompAct(rank=4, default_exclusions=False)
    compact.convert(model)
    deltas = [model[0].weight_delta, model[2].weight_delta]
    groups = [{"params": [model[0].weight, model[2].weight], "lr": 1e-3}, {"params": deltas, "lr": 5.0}]
    opt = compact.optimizer(CompActAdamW(groups))
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(d) for d in deltas]
    assert opt.param_groups[1]["params"] == []


# -- 2. one Linear under two names ---------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class _SharedByTwoParents(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(16, 16, bias=False)
        self.p1, self.p2 = _Holder(lin), _Holder(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p2(torch.relu(self.p1(x)))

    def shared(self) -> nn.Module:
        return self.p1.lin


class _AliasedInOneParent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.alias = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(torch.relu(self.a(x)))

    def shared(self) -> nn.Module:
        return self.a


@pytest.mark.parametrize("cls", [_SharedByTwoParents, _AliasedInOneParent])
def test_a_layer_under_two_names_is_converted_once_and_updated_once_per_step(cls):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = cls()
    before = ref.shared().weight.detach().clone()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    ref(x).pow(2).sum().backward()
    opt.step()
    plain_update = (ref.shared().weight.detach() - before).norm()

    torch.manual_seed(0)
    model = cls()
    compact = CompAct(rank=4, default_exclusions=False, projection="orthogonal")
    compact.convert(model)
    assert len(compact.layers) == 1 and len(conversion_report(model).aliases) == 1
    layer = model.shared()
    assert isinstance(layer, CompActLinear)
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0))
    assert [p for g in opt.param_groups for p in g["params"]] == [layer.weight_delta]  # one δ
    compact.step(0)
    model(x).pow(2).sum().backward()
    opt.step()
    # Adam's first step is lr·sign(Ĝ) Pᵀ; with orthonormal columns scaled to PᵀP = (n/r)·I its
    # Frobenius norm is lr·√(m·n), exactly plain AdamW's lr·‖sign(G)‖ (eps aside). Two δ for the
    # one weight (the defect) gave two such updates: a ratio near √2.
    compact_update = (layer.weight.detach() - before).norm()
    assert compact_update / plain_update == pytest.approx(1.0, abs=1e-4)

    compact.restore(model)
    restored = model.shared()
    assert type(restored) is nn.Linear and restored.weight is layer.weight
    if cls is _SharedByTwoParents:
        assert model.p1.lin is model.p2.lin
    else:
        assert model.a is model.alias


# -- 3. full backward hooks -----------------------------------------------------------------


def test_full_backward_hooks_fire_during_compact_and_after_restore_and_their_handles_still_remove_them():
    model = _mlp()
    seen = []
    handle = model[0].register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].shape))
    x = torch.randn(4, 16, requires_grad=True)
    compact = CompAct(rank=4, default_exclusions=False)
    compact.convert(model)
    model(x).sum().backward()
    assert seen == [torch.Size([4, 32])]
    compact.restore(model)
    assert type(model[0]) is nn.Linear
    model(x).sum().backward()
    assert len(seen) == 2
    handle.remove()  # the user's handle reaches the hook on the layer that replaced the original
    convert_to_compact(model, config=CompActConfig(rank=4, default_exclusions=False))
    model(x).sum().backward()
    restore_linear(model)
    model(x).sum().backward()
    assert len(seen) == 2


# -- 7. a plain optimizer given the compressed gradients ----------------------------------


def test_plain_adamw_on_a_compressed_model_says_to_use_compact_optimizer():
    model = _mlp()
    CompAct(rank=4, default_exclusions=False).convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    with pytest.raises(RuntimeError, match=r"only CompActAdamW can apply.*compact\.optimizer\(opt\).*decompressed"):
        opt.step()


def test_a_plain_optimizer_is_untouched_when_compressed_gradients_are_decompressed_first():
    model = _mlp()
    compact = CompAct(rank=4, default_exclusions=False)
    compact.convert(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    compact.step(0)
    model(torch.randn(4, 16)).sum().backward()
    compact.decompress_grads_()  # δ.grad is None again: SGD may hold δ and still step
    opt.step()
    assert not torch.equal(model[0].weight, before)


# -- 8. pickling a compressed model ----------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_compressed_model_pickles_and_trains_after_loading_like_the_original(how):
    model = _mlp()
    CompAct(rank=4, default_exclusions=False).convert(model)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    else:
        clone = pickle.loads(pickle.dumps(model))
    for original, copy in ((model[0], clone[0]), (model[2], clone[2])):
        assert delta_owner(copy.weight_delta) is copy and delta_owner(original.weight_delta) is original
        assert copy.weight_delta.stride() == (0, 0)  # still a broadcast zero
    for m in (model, clone):
        compact = CompAct(rank=4, update_proj_gap=5, default_exclusions=False)
        compact.convert(m)  # already converted, same settings: taken over as is
        _train(m, compact.optimizer(torch.optim.AdamW(m.parameters(), lr=1e-2)), compact, steps=6)
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(clone[0].weight, _mlp()[0].weight)  # it did train


# -- 10. ranks and seeds -------------------------------------------------------------------------


def test_compact_linear_refuses_a_rank_above_in_features():
    with pytest.raises(ValueError, match="rank 16 exceeds in_features 8.*rank below 8"):
        compact_linear(torch.randn(2, 8), torch.randn(4, 8), rank=16, seed=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_projection(8, 2, 1.5),
        lambda: layer_seed(1.5, "a", 0),
        lambda: compact_linear(torch.randn(2, 8), torch.randn(4, 8), rank=2, seed=1.5),
        lambda: CompAct(rank=2, seed=1.5),
        lambda: CompAct(rank=2).set_seed(1.5),
        lambda: CompActConfig(rank=2, seed=1.5),
    ],
    ids=["make_projection", "layer_seed", "compact_linear", "CompAct", "set_seed", "CompActConfig"],
)
def test_a_float_seed_is_refused_with_a_clear_message_wherever_it_enters(call):
    with pytest.raises(TypeError, match=r"seed.*must be an int"):
        call()


def test_a_float_base_seed_for_a_layer_is_refused():
    model = _mlp()
    convert_to_compact(model, config=CompActConfig(rank=4, default_exclusions=False))
    with pytest.raises(TypeError, match="base_seed must be an int"):
        model[0].set_window(1, base_seed=2.0)


# -- 4. the optimizer after restore ------------------------------------------------------------


def test_the_optimizer_keeps_training_the_weights_after_restore_with_the_first_moment_decompressed():
    model = _mlp()
    compact = CompAct(rank=4, update_proj_gap=100, default_exclusions=False)
    compact.convert(model)
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train(model, opt, compact, steps=5)
    layer = model[0]
    m_compressed = opt.state[layer.weight_delta]["exp_avg"].clone()
    p = layer.projection_matrix(dtype=torch.float64)
    compact.restore(model)
    assert type(model[0]) is nn.Linear and model[0].weight is layer.weight
    assert [id(q) for q in opt.param_groups[0]["params"]][:2] == [id(model[0].weight), id(model[0].bias)]
    before = model[0].weight.detach().clone()
    x, y = _batches(1, seed=9)[0]
    (model(x) - y).pow(2).mean().backward()
    with pytest.warns(UserWarning, match="decompressed to full size"):
        opt.step()
    assert not torch.equal(model[0].weight, before)  # the restored weight is trained again
    # Its first moment continued from M·Pᵀ (float64 reference): exp_avg = β₁·M·Pᵀ + (1 − β₁)·G.
    g = model[0].weight.grad.double()
    expected = 0.9 * (m_compressed.double() @ p.t()) + 0.1 * g
    got = opt.state[model[0].weight]["exp_avg"].double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert opt.state[model[0].weight]["exp_avg_sq"].shape == model[0].weight.shape


# -- 6. optimizer state across a switch of gradient mode --------------------------------------


def test_moments_convert_exactly_between_compressed_and_full_for_the_first_moment():
    g = torch.Generator().manual_seed(0)
    full = {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 16, generator=g), "exp_avg_sq": torch.rand(8, 16, generator=g)}
    p = make_projection(16, 4, 5, dtype=torch.float64).float()
    delta = torch.zeros(8, 4)
    state = {k: v.clone() for k, v in full.items()}
    with pytest.warns(UserWarning, match="compressed for CompAct"):
        compress_moments_(state, delta, p)
    assert state["exp_avg"].shape == (8, 4)
    ref = full["exp_avg"].double() @ p.double()
    assert ((state["exp_avg"].double() - ref).norm() / ref.norm()).item() < 1e-6
    # The second moment's approximation keeps each row's total (E Σ_k Ĝ[i,k]² = ‖G[i]‖²), both ways.
    assert torch.allclose(state["exp_avg_sq"].sum(-1), full["exp_avg_sq"].sum(-1), rtol=1e-5)
    weight = torch.zeros(8, 16)
    with pytest.warns(UserWarning, match="decompressed to full size"):
        decompress_moments_(state, weight, p)
    assert state["exp_avg"].shape == (8, 16)
    ref = (full["exp_avg"].double() @ p.double()) @ p.double().t()
    assert ((state["exp_avg"].double() - ref).norm() / ref.norm()).item() < 1e-6
    assert torch.allclose(state["exp_avg_sq"].sum(-1), full["exp_avg_sq"].sum(-1), rtol=1e-5)
    assert torch.equal(state["step"], full["step"])


# -- 5 and 6. resume across settings and gradient modes (the callback) ---------------------------


def _fit_with_checkpoint(tmp_path, callbacks, steps: int = 2):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=steps, save_top_k=0)
    module = PlainLM()
    trainer = make_trainer(tmp_path, [*callbacks, ckpt], max_steps=steps, enable_checkpointing=True)
    trainer.fit(module, token_loader())
    return tmp_path / "ckpt" / "last.ckpt"


class _MomentsAtTrainStart(Callback):
    """Records, at on_train_start (after Lightning loaded the optimizer states), the first moment of q_proj."""

    def on_train_start(self, trainer, pl_module):
        layer = pl_module.model.model.layers[0].self_attn.q_proj
        opt = trainer.optimizers[0]
        key = layer.weight_delta if getattr(layer, "weight_delta", None) is not None else layer.weight
        self.layer, self.exp_avg = layer, opt.state[key]["exp_avg"].detach().clone()


def _q_proj_index(path) -> tuple[dict, int]:
    ckpt = torch.load(path, weights_only=True)
    names = [n for n, _ in PlainLM().named_parameters()]
    return ckpt, names.index("model.model.layers.0.self_attn.q_proj.weight")


def test_a_compressed_checkpoint_resumes_in_decompressed_mode_with_the_moments_decompressed(tmp_path):
    path = _fit_with_checkpoint(tmp_path, [CompActCallback(rank=4, update_proj_gap=100)])
    ckpt, index = _q_proj_index(path)
    saved = ckpt["optimizer_states"][0]["state"][index]["exp_avg"]
    assert saved.shape == (32, 4)
    probe = _MomentsAtTrainStart()
    cb = CompActCallback(rank=4, update_proj_gap=100, grad_mode="decompressed")
    with pytest.warns(UserWarning, match="decompressed to full size"):
        make_trainer(tmp_path / "b", [cb, probe], max_steps=4).fit(PlainLM(), token_loader(), ckpt_path=path)
    # The P of the checkpoint's last step (window 0 of seed 0), rebuilt here in float64.
    keys = torch.tensor(seed_keys(layer_seed(0, probe.layer.seed_name, 0)), dtype=torch.int32)
    p = build_projection(32, 4, keys, dtype=torch.float64)
    expected = saved.double() @ p.t()
    assert ((probe.exp_avg.double() - expected).norm() / expected.norm()).item() < 1e-6


def test_a_plain_checkpoint_resumes_with_the_callback_with_the_moments_compressed(tmp_path):
    path = _fit_with_checkpoint(tmp_path, [])
    ckpt, index = _q_proj_index(path)
    saved = ckpt["optimizer_states"][0]["state"][index]["exp_avg"]
    assert saved.shape == (32, 32)
    probe = _MomentsAtTrainStart()
    cb = CompActCallback(rank=4, update_proj_gap=100)
    with pytest.warns(UserWarning, match="compressed for CompAct"):
        make_trainer(tmp_path / "b", [cb, probe], max_steps=4).fit(PlainLM(), token_loader(), ckpt_path=path)
    p = cb.compact.projection_at(probe.layer, 0).double()  # the window of step 2 (T = 100)
    expected = saved.double() @ p
    assert probe.exp_avg.shape == (32, 4)
    assert ((probe.exp_avg.double() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize(
    ("resume_kwargs", "match"),
    [({"rank": 8}, r"rank=8.*gets rank 8 where the checkpoint's has 4.*Resume with rank=4"),
     ({"rank": 4, "projection": "rademacher"}, r"saved with projection='gaussian'.*Resume with projection='gaussian'")],
    ids=["rank", "projection"],
)
def test_resuming_with_another_rank_or_projection_is_refused_with_the_fix(tmp_path, resume_kwargs, match):
    path = _fit_with_checkpoint(tmp_path, [CompActCallback(rank=4)])
    with pytest.raises(MisconfigurationException, match=match):
        make_trainer(tmp_path / "b", [CompActCallback(**resume_kwargs)], max_steps=4).fit(
            PlainLM(), token_loader(), ckpt_path=path
        )


def test_resuming_with_another_scale_warns_and_continues_with_the_checkpoints(tmp_path):
    path = _fit_with_checkpoint(tmp_path, [CompActCallback(rank=4, scale=0.5)])
    cb = CompActCallback(rank=4, scale=2.0)
    trainer = make_trainer(tmp_path / "b", [cb], max_steps=4)
    with pytest.warns(UserWarning, match=r"scale=2.0 differs from the checkpoint's 0.5"):
        trainer.fit(PlainLM(), token_loader(), ckpt_path=path)
    assert cb.scale == 0.5 and {g["scale"] for g in trainer.optimizers[0].param_groups} == {0.5}
