import pytest
import torch
from torch import nn

from helpers import PlainLM, RecordingLogger, make_trainer, token_loader
from lightning_compact import CompActCallback, PeakMemoryMonitor, convert_to_compact
from lightning_compact.memory import SavedActivationTracker


def test_tracker_counts_the_input_for_plain_and_x_p_for_compact_linear():
    n, r, tokens = 64, 16, 10
    model = nn.Sequential(nn.Linear(n, 32, bias=False))
    x = torch.randn(tokens, n)
    with SavedActivationTracker(exclude=[model]) as plain:
        model(x).sum().backward()
    assert plain.result().bytes == tokens * n * 4

    convert_to_compact(model, rank=r)
    with SavedActivationTracker(exclude=[model]) as compact:
        model(x).sum().backward()
    result = compact.result()
    assert result.bytes == tokens * r * 4
    assert result.uncompressed_bytes == tokens * n * 4
    assert result.compressed_layers == 1


def test_an_activation_at_the_address_of_a_buffer_freed_inside_the_block_is_counted(monkeypatch):
    # cache_projections="auto" drops a layer's projection cache at its first forward: the freed
    # address can come back as an activation, which the exclusion of the model must not hide
    # (it did: a converted model's first step was under-counted by a few KiB, run to run).
    # The allocator hands a freed block back at will; stand in for that with storages keyed by
    # size, so that the freed buffer and a later activation of its size share a key.
    from lightning_compact.memory import saved_activations

    monkeypatch.setattr(saved_activations, "_storage_key", lambda t: (str(t.device), t.untyped_storage().nbytes()))
    model = nn.Linear(32, 8, bias=False)  # weight: 1 KiB, no activation's size
    model.register_buffer("cache", torch.ones(32, 32))  # 4 KiB
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.full((32, 32), 0.5, requires_grad=True)  # 4 KiB: the buffer's key
    with SavedActivationTracker(exclude=[model]) as tracker:
        model.cache = None  # freed inside the block
        (x @ w).sum().backward()  # saves x and w
    assert tracker.result().bytes == (4 * 32 + 32 * 32) * 4
    # While the buffer lives, its key is excluded (the model's storages are not activations).
    model.register_buffer("cache", torch.ones(32, 32))
    with SavedActivationTracker(exclude=[model]) as tracker:
        (x @ w).sum().backward()
    assert tracker.result().bytes == 4 * 32 * 4


def test_mixed_precision_weight_copies_are_reported_apart_from_activations():
    n, m, tokens = 64, 32, 10
    model = nn.Sequential(nn.Linear(n, m, bias=False))
    x = torch.randn(tokens, n, requires_grad=True)  # so the weight is saved too, for ∂L/∂x
    with SavedActivationTracker(exclude=[model]) as tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    result = tracker.result()
    assert result.bytes == tokens * n * 2  # the bf16 copy of the input
    assert result.parameter_copy_bytes == m * n * 2  # the bf16 copy of the weight


def test_shared_inputs_are_counted_once():
    # Three layers reading one input (like q, k, v) keep one tensor alive, not three.
    layers = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(3))
    x = torch.randn(8, 16)
    with SavedActivationTracker(exclude=[layers]) as tracker:
        sum(layer(x).sum() for layer in layers).backward()
    assert tracker.result().bytes == 8 * 16 * 4


def _fit(tmp_path, callbacks, **kwargs):
    torch.manual_seed(0)
    logger = RecordingLogger()
    make_trainer(tmp_path, callbacks, logger=logger, max_epochs=2, max_steps=-1, **kwargs).fit(
        PlainLM(), token_loader(n_samples=8, seq_len=32)
    )
    return logger


def test_cpu_run_logs_saved_activations_and_no_cuda_figure(tmp_path):
    monitor = PeakMemoryMonitor()
    logger = _fit(tmp_path, [monitor])
    assert len(monitor.history) == 2  # one row per epoch
    logged = [m for _, m in logger.metrics if "memory/saved_activations_MiB" in m]
    assert len(logged) == 2
    for m in logged:
        assert m["memory/saved_activations_MiB"] > 0
        assert "memory/cuda_max_allocated_MiB" not in m
        assert "memory/saved_activations_uncompressed_MiB" not in m  # no CompAct layer ran


def test_uncompressed_figure_equals_a_real_baseline_run(tmp_path):
    baseline = PeakMemoryMonitor()
    _fit(tmp_path / "base", [baseline])
    compact = PeakMemoryMonitor()
    _fit(tmp_path / "compact", [CompActCallback(rank=0.25), compact])
    base_row, compact_row = baseline.history[0], compact.history[0]
    # What CompAct says the plain layers would have stored is what the plain model did store.
    assert compact_row["memory/saved_activations_uncompressed_MiB"] == base_row["memory/saved_activations_MiB"]
    assert compact_row["memory/saved_activations_MiB"] < base_row["memory/saved_activations_MiB"]


def test_summary_is_printed_without_a_logger(tmp_path, caplog):
    caplog.set_level("INFO")
    monitor = PeakMemoryMonitor()
    make_trainer(tmp_path, [CompActCallback(rank=4), monitor], max_epochs=1, max_steps=-1).fit(PlainLM(), token_loader())
    assert "Peak memory per training epoch" in caplog.text
    assert "without CompAct" in caplog.text and "CompAct saves" in caplog.text


def test_nothing_measured_means_nothing_logged(tmp_path):
    monitor = PeakMemoryMonitor(track_saved_activations=False)
    logger = _fit(tmp_path, [monitor])
    assert monitor.history == []
    assert not any(k.startswith("memory/") for _, m in logger.metrics for k in m)


def test_history_round_trips_through_state_dict():
    monitor = PeakMemoryMonitor()
    monitor.history = [{"epoch": 0, "memory/saved_activations_MiB": 1.5}]
    other = PeakMemoryMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.history == monitor.history


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_logged_on_gpu(tmp_path):
    monitor = PeakMemoryMonitor()
    make_trainer(tmp_path, [monitor], accelerator="gpu", max_epochs=1, max_steps=-1).fit(PlainLM(), token_loader())
    assert monitor.history[0]["memory/cuda_max_allocated_MiB"] > 0


def test_shared_projection_saves_more_and_still_reports_the_true_baseline(tmp_path):
    baseline = PeakMemoryMonitor()
    _fit(tmp_path / "base", [baseline])
    per_layer, shared = PeakMemoryMonitor(), PeakMemoryMonitor()
    _fit(tmp_path / "per_layer", [CompActCallback(rank=0.25), per_layer])
    _fit(tmp_path / "shared", [CompActCallback(rank=0.25, share_projection=True), shared])
    key, base_key = "memory/saved_activations_MiB", "memory/saved_activations_uncompressed_MiB"
    assert shared.history[0][key] < per_layer.history[0][key] < baseline.history[0][key]
    assert shared.history[0][base_key] == baseline.history[0][key]


def _memory_steps(logger: RecordingLogger) -> list[int]:
    return [step for step, m in logger.metrics if "memory/saved_activations_MiB" in m]


@pytest.mark.parametrize(
    ("every", "trainer_every", "accumulate", "expected"),
    [
        (2, 50, 1, [2, 4, 6]),  # the epoch-end log at step 6 is not sent twice
        (2, 50, 2, [2, 3]),  # 3 optimizer steps (global_step counts windows), then the epoch end
        (None, 3, 1, [3, 6]),  # follows Trainer(log_every_n_steps)
        (0, 1, 1, [6]),  # per epoch only
    ],
)
def test_logs_every_n_optimizer_steps_as_well_as_per_epoch(tmp_path, every, trainer_every, accumulate, expected):
    logger = RecordingLogger()
    monitor = PeakMemoryMonitor(log_every_n_steps=every)
    trainer = make_trainer(
        tmp_path, [monitor], logger=logger, max_epochs=1, max_steps=-1,
        log_every_n_steps=trainer_every, accumulate_grad_batches=accumulate,
    )
    trainer.fit(PlainLM(), token_loader(n_samples=24, seq_len=16, batch_size=4))  # 6 batches
    assert _memory_steps(logger) == expected
    assert len(monitor.history) == 1
    values = [m["memory/saved_activations_MiB"] for _, m in logger.metrics if "memory/saved_activations_MiB" in m]
    assert values == sorted(values)  # a running peak since the epoch started
    assert values[-1] == monitor.history[0]["memory/saved_activations_MiB"]


class _CrashesAtStep(PlainLM):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.crash_step = step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_step:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().training_step(batch, batch_idx)


def test_a_run_that_crashes_mid_epoch_has_logged_its_memory(tmp_path):
    # A streamed run with max_steps is one epoch: per-epoch logging alone would log nothing here.
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, [PeakMemoryMonitor(log_every_n_steps=2)], logger=logger, max_steps=100, max_epochs=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit(_CrashesAtStep(3), token_loader(n_samples=40, seq_len=16, batch_size=4))
    assert _memory_steps(logger) == [2]


@pytest.mark.parametrize("every", [-1, 1.5, True])
def test_log_every_n_steps_must_be_a_non_negative_int(every):
    with pytest.raises(ValueError, match="log_every_n_steps"):
        PeakMemoryMonitor(log_every_n_steps=every)


@pytest.mark.parametrize("option", ["track_saved_activations", "breakdown"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_flags_must_be_bools(option, value):
    with pytest.raises(ValueError, match=rf"PeakMemoryMonitor\({option}={value!r}\): expected True or False"):
        PeakMemoryMonitor(**{option: value})
