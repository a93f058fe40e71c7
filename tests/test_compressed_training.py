"""CompActCallback in compressed mode: optimizer swap, fallback, accumulation, clipping, resume."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from helpers import PlainLM, make_trainer, token_loader
from lightning_compact import CompActAdamW, CompActCallback


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class ScheduledLM(PlainLM):
    """Returns Adam/AdamW with a per-step LR schedule in one of Lightning's accepted forms."""

    def __init__(self, form: str = "dict", optimizer: str = "adamw") -> None:
        super().__init__(optimizer=optimizer)
        self.form = form

    def configure_optimizers(self):
        opt_cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        opt = opt_cls(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        if self.form == "single":
            return opt
        if self.form == "lists":
            return [opt], [sched]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("form, optimizer", [("dict", "adamw"), ("lists", "adam"), ("single", "adamw")])
def test_adam_and_adamw_are_replaced_and_the_lr_scheduler_keeps_driving_the_replacement(tmp_path, form, optimizer):
    cb = CompActCallback(rank=4)
    module = ScheduledLM(form, optimizer)
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # One batch per epoch, so per-step ("dict") and per-epoch ("lists") schedules both step 3 times.
        trainer.fit(module, token_loader(n_samples=4))
    assert not [w for w in caught if "lr_scheduler" in str(w.message) or "optimizer.step()" in str(w.message)]
    (opt,) = trainer.optimizers
    assert isinstance(opt, CompActAdamW) and module.optimizers().optimizer is opt
    assert len(cb.compressed_layers) == 14  # q, k, v, o, gate, up, down in each of 2 blocks
    if form == "single":
        return
    (config,) = trainer.lr_scheduler_configs
    sched = config.scheduler
    assert sched.optimizer is opt
    assert sched.base_lrs == [module.lr] and sched.last_epoch == 3
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups] == [module.lr / 4]


def test_gradients_and_moments_of_converted_weights_hold_r_times_m_elements(tmp_path):
    cb = CompActCallback(rank=4)
    module = PlainLM()
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(module, token_loader())
    opt = trainer.optimizers[0]
    for layer in cb.layers.values():
        r, m = layer.rank, layer.out_features
        assert layer.weight.grad is None
        assert layer.weight_delta.grad.numel() == r * m
        # After fit the optimizer holds the restored weight again, its moments still compressed
        # (r·m elements) until it is stepped again (then decompressed: CompAct.restore).
        assert layer.weight_delta not in opt.state
        state = opt.state[layer.weight]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == r * m
        assert state["compact_projection"].shape == (layer.in_features, r)
    lm_head = module.model.lm_head.weight  # not converted: full-size gradient and moments
    assert lm_head.grad.shape == lm_head.shape and opt.state[lm_head]["exp_avg"].shape == lm_head.shape


def test_other_optimizers_get_decompressed_gradients_before_the_step_with_one_warning(tmp_path):
    cb = CompActCallback(rank=4)
    module = PlainLM(optimizer="sgd")
    up = module.model.model.layers[0].mlp.up_proj.weight
    before = up.detach().clone()
    with pytest.warns(UserWarning, match="decompressed to full size before the optimizer step") as record:
        make_trainer(tmp_path, [cb], max_steps=2).fit(module, token_loader())
    assert sum("decompressed to full size" in str(w.message) for w in record) == 1
    layer = cb.layers["model.model.layers.0.mlp.up_proj"]
    assert not cb.compressed_layers and layer.weight_delta.grad is None
    assert up.grad.shape == up.shape and not torch.equal(up, before)


def test_decompressing_before_the_step_gives_sgd_the_decompressed_gradient(tmp_path):
    # With SGD(lr) and one step, W₁ = W₀ − lr·Ĝ Pᵀ in both routes to a full-size gradient:
    # decompressed in the backward (grad_mode="decompressed") or before the step ("auto").
    results = []
    for mode in ("auto", "decompressed"):
        torch.manual_seed(0)
        module = PlainLM(optimizer="sgd")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(tmp_path / mode, [CompActCallback(rank=4, grad_mode=mode)], max_steps=1, precision="64-true").fit(
                module, token_loader()
            )
        results.append(module.state_dict())
    for name, w in results[1].items():
        assert rel_err(results[0][name], w) < 1e-12 or torch.equal(results[0][name], w), name


def test_grad_mode_compressed_with_an_unsupported_optimizer_is_an_error(tmp_path):
    with pytest.raises(MisconfigurationException, match="SGD has no compressed counterpart"):
        make_trainer(tmp_path, [CompActCallback(rank=4, grad_mode="compressed")], max_steps=1).fit(
            PlainLM(optimizer="sgd"), token_loader()
        )


def test_grad_mode_decompressed_keeps_the_users_optimizer(tmp_path):
    cb = CompActCallback(rank=4, grad_mode="decompressed")
    module = PlainLM()
    trainer = make_trainer(tmp_path, [cb], max_steps=1)
    trainer.fit(module, token_loader())
    assert type(trainer.optimizers[0]) is torch.optim.AdamW and not cb.compressed_layers


@pytest.mark.parametrize(
    "kwargs, message", [(dict(grad_mode="yes"), "grad_mode"), (dict(scale=0), "scale")]
)
def test_bad_mode_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        CompActCallback(rank=4, **kwargs)


def _fit_weights(tmp_path, batch_size, accumulate, **kwargs):
    torch.manual_seed(0)
    module = PlainLM()
    cb = CompActCallback(rank=4, update_proj_gap=2)
    trainer = make_trainer(
        tmp_path, [cb], max_steps=3, precision="64-true", accumulate_grad_batches=accumulate, **kwargs
    )
    trainer.fit(module, token_loader(n_samples=24, batch_size=batch_size))
    assert cb.compressed_layers
    return module.state_dict()


def test_accumulated_micro_batches_equal_one_batch_k_times_larger(tmp_path):
    # Same samples per step and the same P per step (the projection changes at step 2):
    # only the summation order differs, so float64 results agree to rounding.
    accumulated = _fit_weights(tmp_path / "a", batch_size=4, accumulate=2)
    single = _fit_weights(tmp_path / "b", batch_size=8, accumulate=1)
    for name, w in single.items():
        assert rel_err(accumulated[name] - 0, w) < 1e-10, name


class GradientRecorder(pl.Callback):
    """Clones every gradient (.grad and Ĝ) before Lightning clips, and again after the step."""

    def __init__(self):
        self.before, self.after = [], []

    @staticmethod
    def _grads(trainer):
        out = {}
        deltas = {id(layer.weight_delta) for layer in trainer.callbacks[0].layers.values()}
        for i, p in enumerate(trainer.optimizers[0].param_groups[0]["params"]):
            if p.grad is not None:
                out[f"{i}.compressed" if id(p) in deltas else f"{i}"] = p.grad.clone()
        return out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self._grads(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._grads(trainer))


def _joint_norm(grads):
    return torch.stack([g.double().norm() for g in grads.values()]).norm().item()


def test_norm_clipping_scales_gradients_and_compressed_gradients_by_one_joint_coefficient(tmp_path):
    clip = 1e-3  # far below the gradient norm: every step is clipped
    rec = GradientRecorder()
    make_trainer(tmp_path, [CompActCallback(rank=4), rec], max_steps=2, gradient_clip_val=clip).fit(
        PlainLM(), token_loader()
    )
    for before, after in zip(rec.before, rec.after):
        assert sum(k.endswith("compressed") for k in before) == 14
        norm = _joint_norm(before)
        coef = clip / (norm + 1e-6)  # torch's formula, applied once to everything
        # float32 rounding of the norm and of the products: relative 1e-6 is ample.
        assert abs(_joint_norm(after) - clip) / clip < 1e-5
        for key, g in before.items():
            assert rel_err(after[key], g * coef) < 1e-5, key


def test_value_clipping_clamps_compressed_gradients(tmp_path):
    rec = GradientRecorder()
    make_trainer(
        tmp_path,
        [CompActCallback(rank=4), rec],
        max_steps=1,
        gradient_clip_val=1e-4,
        gradient_clip_algorithm="value",
    ).fit(PlainLM(), token_loader())
    (after,) = rec.after
    (before,) = rec.before
    assert max(g.abs().max().item() for k, g in before.items() if k.endswith("compressed")) > 1e-4
    assert max(g.abs().max().item() for g in after.values()) <= 1e-4


def test_resume_from_a_mid_window_checkpoint_continues_bit_exactly(tmp_path):
    # 3 steps per epoch; the checkpoint at step 3 lies inside the window of steps 2-3.
    loader = token_loader(n_samples=12, batch_size=4)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)

    torch.manual_seed(0)
    full = ScheduledLM()
    full_trainer = make_trainer(
        tmp_path / "full", [CompActCallback(rank=4, update_proj_gap=2), ckpts], max_steps=6, enable_checkpointing=True
    )
    full_trainer.fit(full, loader)

    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    ckpt = torch.load(path, weights_only=True)  # tensors and numbers only
    shapes = [s["exp_avg"].shape for s in ckpt["optimizer_states"][0]["state"].values()]
    assert sum(len(s) == 2 and s[1] == 4 for s in shapes) == 14  # compressed moments: [out, rank]

    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    resumed = ScheduledLM()
    trainer = make_trainer(tmp_path / "b", [CompActCallback(rank=4, update_proj_gap=2)], max_steps=6)
    trainer.fit(resumed, loader, ckpt_path=path)
    for name, w in full.state_dict().items():
        assert torch.equal(w, resumed.state_dict()[name]), name
    state_a, state_b = full_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()
    for i, s in state_a["state"].items():
        assert all(torch.equal(s[k], state_b["state"][i][k]) for k in s), i
    last_lr = [t.lr_scheduler_configs[0].scheduler.get_last_lr() for t in (full_trainer, trainer)]
    assert last_lr[0] == last_lr[1]


def test_lightning_grad_norm_counts_the_compressed_gradients(tmp_path):
    from lightning.pytorch.utilities import grad_norm

    norms = {}

    class Norms(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.update(grad_norm(pl_module, norm_type=2))

    cb = CompActCallback(rank=4)
    make_trainer(tmp_path, [cb, Norms()], max_steps=1).fit(PlainLM(), token_loader())
    assert "grad_2.0_norm/model.model.layers.0.mlp.up_proj.weight_delta" in norms
    assert "grad_2.0_norm/model.model.layers.0.mlp.up_proj.weight" not in norms  # no full-size gradient
