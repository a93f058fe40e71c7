"""float16 autocast with a GradScaler in compressed mode: Ĝ unscaled like any gradient, overflow steps skipped."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision

from helpers import TINY_LLAMA, PlainLM, make_trainer, token_loader
from lightning_compact import CompAct, CompActAdamW, CompActCallback
from lightning_compact.models.llama import LlamaForCausalLM

TOKENS = torch.randint(0, TINY_LLAMA.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))


def _run(model, compact, steps, scaler=None, overflow_at=None, clip=None):
    """fp16 autocast on CPU; the loss is made inf at ``overflow_at``. Returns per-step weights and optimizer states."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if compact is not None:
        compact.convert(model)
        opt = compact.optimizer(opt)
    history = []
    for step in range(steps):
        if compact is not None:
            compact.step(step)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(TOKENS, labels=TOKENS)
        if step == overflow_at:
            loss = loss * math.inf
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()} for k, st in enumerate(opt.state.values())}
        history.append(([p.detach().clone() for p in model.parameters()], state))
    return history, opt


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(model, grad_mode, scaler=None, autocast=True):
    compact = CompAct(rank=4, grad_mode=grad_mode)
    compact.convert(model)
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    compact.step(0)  # the same P in every run
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = model(TOKENS, labels=TOKENS)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("grad_mode", ["compressed", "decompressed"])
def test_unscaled_fp16_gradients_match_the_float64_reference(grad_mode):
    """After unscale_, every gradient (Ĝ included) is the float64 one to within a few fp16 roundings; without the
    scale, fp16's narrow range flushes small gradient terms and the error is several times larger."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(TINY_LLAMA)
    reference = _grads(copy.deepcopy(base).double(), grad_mode, autocast=False)
    scaled = _grads(copy.deepcopy(base), grad_mode, torch.amp.GradScaler("cpu", init_scale=2.0**12))
    unscaled = _grads(copy.deepcopy(base), grad_mode)
    assert scaled.keys() == reference.keys()
    assert any(n.endswith("weight_delta") for n in scaled) == (grad_mode == "compressed")
    errors = {n: _rel(scaled[n], reference[n]) for n in reference}
    assert max(errors.values()) < 4 * 2.0**-11, errors  # fp16's unit roundoff is 2^-11
    assert max(errors.values()) < max(_rel(unscaled[n], reference[n]) for n in reference)


@pytest.mark.parametrize("grad_mode", ["compressed", "decompressed"])
def test_an_overflow_step_is_skipped_and_leaves_the_moments_alone(grad_mode):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_LLAMA)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    history, opt = _run(model, CompAct(rank=4, grad_mode=grad_mode), 4, scaler=scaler, overflow_at=2)
    if grad_mode == "compressed":
        assert isinstance(opt, CompActAdamW)
    (w1, s1), (w2, s2), (w3, _) = history[1], history[2], history[3]
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))  # step 2 skipped: weights unchanged
    assert s1.keys() == s2.keys()
    for k in s1:
        for name, value in s1[k].items():
            assert torch.equal(value, s2[k][name]) if torch.is_tensor(value) else value == s2[k][name], name
    assert not all(torch.equal(a, b) for a, b in zip(w2, w3))  # and step 3 trains again
    assert all(torch.isfinite(p).all() for p in w3)
    assert scaler.get_scale() == 2.0**7


class OverflowAt(PlainLM):
    """Its loss is inf at one step."""

    def __init__(self, step):
        super().__init__()
        self.overflow_step = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if self.trainer.global_step == self.overflow_step else loss


class Weights(Callback):
    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append([p.detach().clone() for p in pl_module.parameters()])


def test_lightning_16_mixed_with_a_scaler_trains_compressed_and_skips_an_overflow(tmp_path):
    torch.manual_seed(0)
    module = OverflowAt(step=2)
    cb, weights = CompActCallback(rank=4, grad_mode="compressed"), Weights()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000))
    trainer = make_trainer(tmp_path, [cb, weights], max_steps=4, plugins=[plugin], gradient_clip_val=1.0)
    trainer.fit(module, token_loader())
    assert isinstance(trainer.optimizers[0], CompActAdamW)
    assert cb.compressed_layers  # nothing fell back to decompressed
    after = weights.after
    assert all(torch.equal(a, b) for a, b in zip(after[1], after[2]))  # the overflow step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(after[2], after[3]))
    assert plugin.scaler.get_scale() == 2.0**7


def test_the_gpu_precision_script_runs_on_a_cpu_without_the_data_dependencies(tmp_path):
    """benchmarks/gpu/gpu_precision.py, as the device machine runs it (no datasets, no jsonargparse), on a CPU."""
    import json

    from helpers import WITHOUT_DATA_DEPS, run_python

    out = tmp_path / "precision.json"
    proc = run_python("-c", WITHOUT_DATA_DEPS, "benchmarks/gpu/gpu_precision.py", "--device", "cpu", "--steps", "5",
                      "--batch", "2", "--seq", "32", "--overflow-at", "2", "--seeds", "2", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert rows["16-mixed compressed"]["overflow_step"]["weights_unchanged"] is True
    assert rows["16-mixed compressed"]["overflow_step"]["scale_after"] == rows["16-mixed compressed"]["overflow_step"]["scale_before"] / 2
    assert all(r["finite"] for r in result["rows"])
    paired = result["fp16_vs_bf16_over_seeds"]  # seed 1 reruns the two compressed mixed-precision arms only
    assert [r["seed"] for r in result["rows"]] == [0, 0, 0, 0, 1, 1]
    assert len(paired["fp16_minus_bf16"]) == 2
    lo, hi = paired["t95_interval"]
    assert lo <= paired["mean_difference"] <= hi
