"""Per-category step accounting (StepMemoryTracker) and PeakMemoryMonitor's breakdown."""

import pytest
import torch
from torch import nn

from helpers import PlainLM, RecordingLogger, make_trainer, token_loader
from lightning_compact import CompActConfig, PeakMemoryMonitor, convert_to_compact
from lightning_compact.memory import (
    CUDA_ALLOCATION_ROUNDING,
    MemoryBreakdown,
    MemTrackerUnavailable,
    StepMemoryTracker,
    measure_step,
    require_mem_tracker,
)
from lightning_compact.memory import tracker as tracker_module
from lightning_compact.memory.breakdown import CATEGORIES


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _mlp(n=64, hidden=128, out=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, out, bias=False))


def _train_step(model, optimizer, x):
    def step():
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def test_categories_add_up_to_memtrackers_own_total():
    model, x = _mlp(), torch.randn(512, 64)
    opt = torch.optim.AdamW(model.parameters())
    _train_step(model, opt, x)()
    with StepMemoryTracker(modules=[model], optimizers=[opt], tensors=[x]) as tracker:
        _train_step(model, opt, x)()
    peak = tracker.result().peak
    # MemTracker's own running total at the peak; a category dropped in the mapping would show here.
    raw = next(iter(tracker._tracker.get_tracker_snapshot("peak").values()))
    assert peak.total == raw["Total"] > 0
    assert sum(peak.as_dict().values()) == pytest.approx(2 * peak.total)  # categories + "total"


def test_known_sizes_land_in_their_categories():
    model, x = _mlp(), torch.randn(512, 64)
    opt = torch.optim.AdamW(model.parameters())
    _train_step(model, opt, x)()  # the steady state: optimizer state exists
    result = measure_step(_train_step(model, opt, x), modules=[model], optimizers=[opt], tensors=[x])
    params = _nbytes(model.parameters())
    steps = _nbytes(s["step"] for s in opt.state.values())
    assert result.peak.parameters == params
    assert result.peak.optimizer_states == 2 * params + steps  # exp_avg and exp_avg_sq
    assert result.peak.other == _nbytes([x])
    assert result.largest.gradients == params  # every .grad alive at the end of the backward


def test_storage_shared_by_q_k_v_views_is_counted_once():
    class SharedInput(nn.Module):
        def __init__(self, n=256):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(n, 1, bias=False) for _ in range(3))

        def forward(self, x):
            h = x * 2  # one activation; q, k and v each save a different view of it
            return self.q(h) + self.k(h.view(-1, h.shape[-1])).view_as(self.q(h)) + self.v(h.reshape(h.shape))

    model, x = SharedInput(), torch.randn(8, 64, 256)
    with StepMemoryTracker(modules=[model], tensors=[x]) as tracker:
        out = model(x)
    h_bytes = _nbytes([x])
    activations = tracker.result().peak.activations
    # Outputs are [8, 64, 1]: a few KiB beside h's 512 KiB. Three copies of h would be 1.5 MiB.
    assert h_bytes <= activations < 1.05 * h_bytes
    del out


def test_optimizer_state_appears_after_the_first_step():
    model, x = _mlp(), torch.randn(4096, 64)  # large activations: the peak is in the backward
    opt = torch.optim.AdamW(model.parameters())
    first = measure_step(_train_step(model, opt, x), modules=[model], optimizers=[opt], tensors=[x])
    second = measure_step(_train_step(model, opt, x), modules=[model], optimizers=[opt], tensors=[x])
    params = _nbytes(model.parameters())
    assert first.peak.optimizer_states == 0
    assert first.largest.optimizer_states >= 2 * params  # created inside the first step
    assert second.peak.optimizer_states >= 2 * params


def test_compressed_gradients_are_counted_as_gradients_not_temporaries():
    n, m, r, tokens = 64, 32, 8, 256
    model = nn.Sequential(nn.Linear(n, m, bias=False))
    convert_to_compact(model, config=CompActConfig(rank=r, grad_mode="compressed", cache_projections=False))
    x = torch.randn(tokens, n)
    with StepMemoryTracker(modules=[model], tensors=[x]) as tracker:
        model(x).square().mean().backward()
    largest = tracker.result().largest
    assert largest.gradients == m * r * 4  # the [out, rank] buffer, not an [out, in] .grad
    assert model[0].weight.grad is None


def test_compressed_gradients_left_by_earlier_micro_batches_are_gradients():
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    convert_to_compact(model, config=CompActConfig(rank=8, grad_mode="compressed", cache_projections=False))
    x = torch.randn(16, 64)
    model(x).sum().backward()  # micro-batch 1, outside the tracker
    with StepMemoryTracker(modules=[model], tensors=[x]) as tracker:
        pass
    assert tracker.result().peak.gradients == 32 * 8 * 4


def test_cuda_rounding_rounds_every_allocation_up_to_512_bytes():
    model = nn.Linear(3, 5)  # weight 60 B, bias 20 B
    x = torch.randn(2, 3)
    with StepMemoryTracker(modules=[model], tensors=[x], round_to=CUDA_ALLOCATION_ROUNDING) as tracker:
        pass
    assert tracker.result().peak.parameters == 2 * CUDA_ALLOCATION_ROUNDING


def test_missing_mem_tracker_names_the_torch_version_to_install(monkeypatch):
    from lightning_compact import _torch_private

    def clear() -> None:
        tracker_module._mem_tracker_api.cache_clear()
        _torch_private._load.cache_clear()

    clear()
    monkeypatch.setitem(__import__("sys").modules, "torch.distributed._tools.mem_tracker", None)
    try:
        with pytest.raises(MemTrackerUnavailable, match=r"torch 2\.11-2\.14.*this is torch"):
            require_mem_tracker()
        # Every private import says the same through the one module that makes them.
        with pytest.raises(_torch_private.PrivateTorchAPIError, match=r"mem_tracker\.MemTracker is missing.*torch>=2\.11,<2\.15"):
            _torch_private.mem_tracker()
    finally:
        monkeypatch.undo()
        clear()
    require_mem_tracker()  # available again


def test_breakdown_table_lists_every_category_and_the_total():
    b = MemoryBreakdown(parameters=2**30, gradients=2**29)
    text = b.table()
    for title in CATEGORIES.values():
        assert title in text
    assert "1.50" in text  # the total, GiB
    assert b.total == 2**30 + 2**29


BREAKDOWN_KEYS = [f"memory/breakdown/{k}_MiB" for k in (*CATEGORIES, "total")]


def test_monitor_logs_the_breakdown_of_one_steady_state_step_per_epoch(tmp_path):
    logger = RecordingLogger()
    monitor = PeakMemoryMonitor(breakdown=True)
    trainer = make_trainer(tmp_path, callbacks=[monitor], logger=logger, max_epochs=2, max_steps=-1)
    model = PlainLM()
    trainer.fit(model, token_loader())
    logged = [m for _, m in logger.metrics if BREAKDOWN_KEYS[0] in m]
    assert len(logged) == 2  # one per epoch
    for metrics in logged:
        assert set(BREAKDOWN_KEYS) <= set(metrics)
        parts = sum(metrics[k] for k in BREAKDOWN_KEYS[:-1])
        assert metrics["memory/breakdown/total_MiB"] == pytest.approx(parts)
        # A steady-state step: the Adam moments exist (two per parameter).
        params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        assert metrics["memory/breakdown/optimizer_states_MiB"] >= 2 * params_mib
        assert metrics["memory/breakdown/parameters_MiB"] == pytest.approx(params_mib)
    assert "Step peak by category" in monitor.summary()


def test_monitor_breakdown_matches_the_same_step_in_a_plain_loop(tmp_path):
    # Lightning runs the forward and backward inside optimizer.step(closure); they are
    # still activations and temporaries, not optimizer state.
    logger = RecordingLogger()
    torch.manual_seed(0)
    model = PlainLM()
    make_trainer(tmp_path, callbacks=[PeakMemoryMonitor(breakdown=True)], logger=logger, max_steps=2).fit(
        model, token_loader()
    )
    logged = next(m for _, m in logger.metrics if BREAKDOWN_KEYS[0] in m)

    torch.manual_seed(0)
    plain = PlainLM().model
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    (tokens,) = next(iter(token_loader()))
    for _ in range(2):
        with StepMemoryTracker(modules=[plain], optimizers=[opt], tensors=[tokens]) as tracker:
            plain(tokens, labels=tokens).backward()
            opt.step()
            opt.zero_grad()
    expected = tracker.result().peak.as_dict("MiB")
    for key in ("optimizer_states", "activations", "parameters"):
        assert logged[f"memory/breakdown/{key}_MiB"] == pytest.approx(expected[key], rel=0.05, abs=0.01), key
    assert logged["memory/breakdown/activations_MiB"] > 0


def test_monitor_logs_no_breakdown_unless_asked(tmp_path):
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, callbacks=[PeakMemoryMonitor()], logger=logger, max_epochs=1, max_steps=-1)
    trainer.fit(PlainLM(), token_loader())
    assert logger.metrics
    assert not any(k.startswith("memory/breakdown/") for _, m in logger.metrics for k in m)


def test_monitor_breakdown_with_lean_activations_shows_the_estimators_saving(tmp_path):
    # The monitor measures the real step (whatever LeanActivations swapped); the estimator
    # models the same configurations on fake tensors. Lightning runs forward and backward
    # inside optimizer.step (its closure), so the monitor files some of them under the
    # optimizer: compare the step's total, not each category. Lightning's own tensors
    # (the previous step's gradients until zero_grad, the logged loss) differ between the
    # two by the same amount with and without lean, so the saving must agree closely.
    import dataclasses

    from lightning_compact import LeanActivations
    from lightning_compact.memory.estimator import LEAN_OPTIONS, Variant, estimate
    from lightning_compact.memory.recipe import RunShape
    from lightning_compact.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "lean"}
    shape = RunShape(model="llama_60m", config_overrides=fields, batch_size=8, seq_len=64, precision="32-true", device_type="cpu")
    logged, estimated = {}, {}
    for lean in (False, True):
        logger = RecordingLogger()
        callbacks = [PeakMemoryMonitor(breakdown=True)] + ([LeanActivations()] if lean else [])
        trainer = make_trainer(tmp_path, callbacks=callbacks, logger=logger, max_epochs=1, max_steps=-1)
        trainer.fit(PlainLM(config), token_loader(n_samples=16, seq_len=64, batch_size=8, vocab=512))
        logged[lean] = next(m for _, m in logger.metrics if BREAKDOWN_KEYS[0] in m)
        estimated[lean] = estimate(shape, Variant(lean=LEAN_OPTIONS if lean else ())).peak.as_dict("MiB")
    for lean in (False, True):
        assert logged[lean]["memory/breakdown/total_MiB"] == pytest.approx(estimated[lean]["total"], rel=0.1)
    saving = logged[False]["memory/breakdown/total_MiB"] - logged[True]["memory/breakdown/total_MiB"]
    assert saving == pytest.approx(estimated[False]["total"] - estimated[True]["total"], rel=0.05)
    assert logged[True]["memory/saved_activations_MiB"] < logged[False]["memory/saved_activations_MiB"]


def test_private_torch_modules_are_imported_in_one_place():
    # torch's private modules (torch._subclasses, torch.utils._pytree, torch.distributed._tools,
    # torch.testing._internal, ...) change between releases: lightning_compact/_torch_private.py
    # is the one module that imports them, so a torch upgrade is checked in one place.
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    private = re.compile(r"^\s*(from|import)\s+torch(\.\w+)*\._\w+", re.MULTILINE)
    offenders = [
        str(path.relative_to(root))
        for folder in ("lightning_compact", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "_torch_private.py" and private.search(path.read_text())
    ]
    assert offenders == []
    assert private.search((root / "lightning_compact" / "_torch_private.py").read_text()) is None  # it imports lazily
    assert "torch._subclasses.fake_tensor" in (root / "lightning_compact" / "_torch_private.py").read_text()
