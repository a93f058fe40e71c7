import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from helpers import PlainLM, make_trainer, token_loader
from lightning_compact import CompActCallback, CompActLinear
from lightning_compact.callbacks.compact import _check_strategy


def test_plain_lightning_module_trains_with_the_callback(tmp_path, caplog):
    torch.manual_seed(0)
    caplog.set_level("INFO")
    module = PlainLM()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = CompActCallback(rank=0.25)
    seen = LayerTypes()
    make_trainer(tmp_path, [cb, seen], max_steps=3).fit(module, token_loader())
    assert seen.types["model.model.layers.0.mlp.up_proj"] is CompActLinear
    assert seen.types["model.lm_head"] is torch.nn.Linear
    assert cb.layers["model.model.layers.0.mlp.up_proj"].rank == 8
    # The module leaves fit as it came: plain nn.Linear layers.
    assert type(module.model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    for name, p in module.named_parameters():
        assert not torch.equal(p, before[name]), name
    table = caplog.text
    assert "model.model.layers.0.mlp.up_proj" in table and "skipped: output head" in table


class LayerTypes(pl.Callback):
    """The type of every linear layer during training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.types = {n: type(m) for n, m in pl_module.named_modules() if isinstance(m, torch.nn.Linear)}


class SeedRecorder(pl.Callback):
    """Records the projection seed each micro-batch used (after CompActCallback set it)."""

    def __init__(self):
        self.seeds = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layer = pl_module.model.model.layers[0].mlp.up_proj
        self.seeds.append((trainer.global_step, layer.window, layer.seed))


def test_projection_is_shared_by_accumulated_micro_batches_and_advances_every_gap(tmp_path):
    rec = SeedRecorder()
    cb = CompActCallback(rank=4, update_proj_gap=2)
    make_trainer(tmp_path, [cb, rec], max_steps=5, accumulate_grad_batches=2).fit(PlainLM(), token_loader(n_samples=40))
    steps = [s for s, _, _ in rec.seeds]
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [w for _, w, _ in rec.seeds] == [s // 2 for s in steps]
    by_step = {}
    for step, _, seed in rec.seeds:
        by_step.setdefault(step, set()).add(seed)
    assert all(len(v) == 1 for v in by_step.values())  # micro-batches of one step share P
    assert by_step[0] == by_step[1] and by_step[1] != by_step[2]


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_mid_window_reproduces_the_uninterrupted_run(tmp_path):
    # 3 steps per epoch; the checkpoint at step 3 lies inside the first projection window (steps 0-3).
    loader = token_loader(n_samples=12, batch_size=4)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)

    torch.manual_seed(0)
    full = PlainLM()
    cb = CompActCallback(rank=4, update_proj_gap=4, seed=3)
    make_trainer(tmp_path / "full", [cb, ckpts], max_steps=6, enable_checkpointing=True).fit(full, loader)

    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    resumed = PlainLM()
    # A different seed in the new callback is overridden (with a warning) by the checkpoint's.
    with pytest.warns(UserWarning, match="checkpoint's"):
        make_trainer(tmp_path / "b", [CompActCallback(rank=4, update_proj_gap=4, seed=99)], max_steps=6).fit(
            resumed, loader, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
        )
    for name, w in _weights(full).items():
        assert torch.equal(w, resumed.state_dict()[name]), name


def test_checkpoint_loads_into_the_plain_model(tmp_path):
    module = PlainLM()
    trainer = make_trainer(tmp_path, [CompActCallback(rank=4)], max_steps=2)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]
    plain = PlainLM()
    plain.load_state_dict(state, strict=True)
    assert torch.equal(plain.model.model.layers[0].mlp.up_proj.weight, module.model.model.layers[0].mlp.up_proj.weight)


def test_frozen_layers_are_not_updated(tmp_path):
    module = PlainLM()
    frozen = module.model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    make_trainer(tmp_path, [CompActCallback(rank=4)], max_steps=2).fit(module, token_loader())
    assert torch.equal(module.model.model.layers[0].mlp.up_proj.weight, before)
    assert not torch.equal(module.model.model.layers[0].mlp.gate_proj.weight, before)


def test_bf16_mixed_and_bf16_true_precision_train(tmp_path):
    for precision in ("bf16-mixed", "bf16-true"):
        module = PlainLM()
        make_trainer(tmp_path, [CompActCallback(rank=4)], max_steps=2, precision=precision).fit(module, token_loader())
        w = module.model.model.layers[0].mlp.up_proj.weight
        assert w.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
        assert torch.isfinite(w.float()).all()


class LateModule(PlainLM):
    """Builds its model in configure_model, after Callback.setup."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        self.model = None
        self.lr, self.optimizer_name = 1e-2, "adamw"

    def configure_model(self):
        if self.model is None:
            from helpers import TINY_LLAMA
            from lightning_compact.models.llama import LlamaForCausalLM

            self.model = LlamaForCausalLM(TINY_LLAMA)


def test_layers_made_in_configure_model_are_converted(tmp_path):
    module = LateModule()
    cb = CompActCallback(rank=4)
    make_trainer(tmp_path, [cb], max_steps=1).fit(module, token_loader())
    assert "model.model.layers.1.self_attn.v_proj" in cb.compressed_layers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-1), "rank"),
        (dict(rank=1.5), r"\(0, 1\)"),
        (dict(rank=1.0), "rank=1 means r = 1"),
        (dict(rank=4, scale=float("inf")), "finite"),
        (dict(rank=4, grad_mode="yes"), "grad_mode"),
        (dict(rank=4, exclude_modules="o_proj"), "list of name patterns"),
        (dict(rank=4, update_proj_gap=-1), "update_proj_gap"),
        (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
        (dict(rank=4, projection="sparse"), "projection"),
        (dict(rank=4, seed=1.5), "seed"),
        (dict(rank=4, target_modules="q_proj"), "list of name patterns"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        CompActCallback(**kwargs)


def test_target_pattern_matching_nothing_fails_before_training(tmp_path):
    cb = CompActCallback(rank=4, target_modules=["q_proj", "qkv"])
    with pytest.raises(MisconfigurationException, match=r"\['qkv'\] match no linear layer"):
        make_trainer(tmp_path, [cb], max_steps=1).fit(PlainLM(), token_loader())


def test_target_and_exclude_patterns_select_layers(tmp_path):
    cb = CompActCallback(rank=4, target_modules=["mlp"], exclude_modules=["down_proj"])
    make_trainer(tmp_path, [cb], max_steps=1).fit(PlainLM(), token_loader())
    assert {n.rsplit(".", 1)[-1] for n in cb.layers} == {"gate_proj", "up_proj"}


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_sharded_strategies_are_refused(strategy):
    try:
        instance = strategy()
    except Exception:  # e.g. deepspeed not installed: test the class check alone
        instance = strategy.__new__(strategy)
    with pytest.raises(MisconfigurationException, match="not support.*ModelParallelStrategy"):
        _check_strategy(instance)


def test_fsdp2_through_model_parallel_strategy_is_accepted():
    from lightning.pytorch.strategies import ModelParallelStrategy

    _check_strategy(ModelParallelStrategy())  # no exception: FSDP2 is supported (tests/test_fsdp.py trains with it)


def _converted_weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("proj.weight") and "o_proj" not in n}


@pytest.mark.parametrize("second", ["no callback", "decompressed", "sgd"])
def test_a_later_fit_without_compact_trains_every_weight(tmp_path, second):
    # Issue 9, defect 1: the layers used to stay converted after fit, so a later fit left
    # every converted weight frozen (its gradient went to a compressed side channel).
    module = PlainLM()
    make_trainer(tmp_path / "a", [CompActCallback(rank=4)], max_steps=2).fit(module, token_loader())
    assert not any(isinstance(m, CompActLinear) for m in module.modules())
    before = _converted_weights(module)
    callbacks = [] if second == "no callback" else [CompActCallback(rank=4, grad_mode="decompressed")]
    if second == "sgd":
        module.optimizer_name = "sgd"
    make_trainer(tmp_path / "b", callbacks, max_steps=3).fit(module, token_loader())
    after = _converted_weights(module)
    assert all(not torch.equal(after[n], before[n]) for n in before), [n for n in before if torch.equal(after[n], before[n])]


def test_a_second_callback_uses_its_own_settings(tmp_path):
    # Issue 9, defect 2: a second callback's rank and projection were silently ignored.
    module = PlainLM()
    make_trainer(tmp_path / "a", [CompActCallback(rank=4)], max_steps=1).fit(module, token_loader())
    cb = CompActCallback(rank=2, projection="rademacher")
    make_trainer(tmp_path / "b", [cb], max_steps=1).fit(module, token_loader())
    up = cb.layers["model.model.layers.0.mlp.up_proj"]
    assert (up.rank, up.projection) == (2, "rademacher")


class Boom(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("boom")


def test_the_module_is_restored_when_fit_fails(tmp_path):
    module = PlainLM()
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [CompActCallback(rank=4), Boom()], max_steps=3).fit(module, token_loader())
    assert not any(isinstance(m, CompActLinear) for m in module.modules())


def test_scale_with_decompressed_gradients_is_refused_instead_of_ignored():
    with pytest.raises(MisconfigurationException, match="does not use"):
        CompActCallback(rank=4, grad_mode="decompressed", scale=0.25)


def test_resuming_a_compact_checkpoint_without_the_callback_names_the_callback(tmp_path):
    # Without the callback no CompAct code runs at resume: Lightning's own warning names the
    # missing callback before torch's optimizer fails on the checkpoint's moments, which have
    # each weight_delta's shape [out, r] where the weight is [out, in] (r < in always).
    module = PlainLM()
    trainer = make_trainer(tmp_path, [CompActCallback(rank=4)], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    with pytest.warns(UserWarning, match="CompActCallback"), pytest.raises(RuntimeError, match="size of tensor"):
        make_trainer(tmp_path / "b", [], max_steps=2).fit(PlainLM(), token_loader(), ckpt_path=tmp_path / "c.ckpt")
