"""benchmarks/cpu/peers.py: the --quick smoke run, its JSON and the figures' properties."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_python

peers = pytest.importorskip("peers")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("peers")
    proc = run_python("benchmarks/cpu/peers.py", "--quick", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "peers_quick.json").read_text()), out


def test_quick_run_has_a_row_or_a_skip_reason_for_every_method(quick):
    result, out = quick
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) | set(result["skipped"]) == set(peers.METHODS)
    assert not set(rows) & set(result["skipped"])
    assert all(isinstance(reason, str) and reason for reason in result["skipped"].values())
    for label in ("adamw", "compact_n4", "compact_n8", "compact_n4_orth", "compact_n4_lean"):
        assert label in rows  # these exist in every checkout
    for r in rows.values():
        assert r["seeds"] == [0] and r["best_lr"] == 4e-3
        assert torch.isfinite(torch.tensor(r["val_loss_mean"]))
        assert r["val_loss_mean"] < 5.6  # below ln(256): the model learned something in 12 steps
    assert result["provenance"]["torch"] == torch.__version__
    assert (out / "peers_quick.png").stat().st_size > 0
    assert "| compact_n4 |" in (out / "peers_quick_table.md").read_text()


def test_memory_categories_add_up_and_adamw_state_is_two_moments(quick):
    result, _ = quick
    rows = {r["method"]: r for r in result["rows"]}
    categories = ("weights", "grads", "optimizer_state", "projection_cache", "saved_activations")
    for r in rows.values():
        m = r["memory"]
        assert sum(m[k] for k in categories) == m["total"]
        assert all(m[k] >= 0 for k in categories)
    base = rows["adamw"]["memory"]
    n = base["trainable_params"]
    n_tensors = sum(1 for _ in peers.build(peers.METHODS["adamw"], peers.QUICK, 0, 1e-3).model.parameters())
    # exp_avg and exp_avg_sq in fp32, plus one 0-dim fp32 step counter per parameter tensor.
    assert base["optimizer_state"] == 2 * n * 4 + 4 * n_tensors
    assert base["weights"] == n * 4 and base["grads"] == n * 4
    assert rows["adamw"]["total_memory_ratio"] == 1.0
    for label in ("compact_n4", "compact_n8"):
        m = rows[label]["memory"]
        assert m["optimizer_state"] < base["optimizer_state"]
        assert m["grads"] < base["grads"]
        assert m["saved_activations"] < base["saved_activations"]
        # The same weights; each compressed layer's δ adds a one-element broadcast zero.
        assert 0 <= m["weights"] - base["weights"] <= 4 * 16
    assert rows["compact_n8"]["memory"]["optimizer_state"] < rows["compact_n4"]["memory"]["optimizer_state"]
    assert rows["compact_n4_lean"]["memory"]["saved_activations"] < rows["compact_n4"]["memory"]["saved_activations"]
    for r in rows.values():
        assert r["step_time_ratio"] > 0


def test_resume_trains_nothing_again(quick):
    result, out = quick
    files = sorted((out / "runs").rglob("*.json"))
    assert len(files) == len(result["rows"])
    before = {p: p.stat().st_mtime_ns for p in files}
    proc = run_python("benchmarks/cpu/peers.py", "--quick", "--resume", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done " not in proc.stdout and "measuring" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "runs").rglob("*.json"))} == before


def test_every_method_starts_from_the_same_weights():
    s = peers.QUICK
    ref = peers.build(peers.METHODS["adamw"], s, 3, 1e-3).model.state_dict()
    for label in ("compact_n4", "galore_n4"):
        if peers.skip_reason(peers.METHODS[label]):
            continue
        other = peers.build(peers.METHODS[label], s, 3, 1e-3).model.state_dict()
        for key, value in ref.items():
            assert torch.equal(other[key], value), (label, key)


def test_batches_depend_on_the_seed_only():
    s = peers.QUICK
    a, b, c = (peers.batch_order(100, s, k) for k in (0, 0, 1))
    assert a.shape == (s.steps, s.batch_size) and torch.equal(a, b) and not torch.equal(a, c)


def test_projector_matrices_count_as_optimizer_state():
    method = peers.METHODS["galore_n4"]
    if peers.skip_reason(method):
        pytest.skip(peers.skip_reason(method))
    run = peers.build(method, peers.QUICK, 0, 1e-3)
    batch = torch.randint(0, 256, (2, 16))
    run.step(batch, 0)
    memory = peers.measure_memory(run, batch, 1)
    moments = sum(t.untyped_storage().nbytes() for st in run.optimizer.state.values() for k, t in st.items()
                  if isinstance(t, torch.Tensor))
    projectors = [st["projector"].ortho_matrix for st in run.optimizer.state.values() if "projector" in st]
    assert projectors
    assert memory["optimizer_state"] == moments + sum(p.untyped_storage().nbytes() for p in projectors)


def test_a_missing_option_is_skipped_with_its_reason():
    method = peers.Method("x", "compact", dict(rank=0.25, no_such_option=1))
    assert "no_such_option" in peers.skip_reason(method)
    assert "projection" in peers.skip_reason(peers.Method("y", "compact", dict(rank=0.25, projection="nope")))


def test_sweep_extends_past_the_end_the_best_lr_sits_at():
    def runs(losses: dict[float, float]) -> dict[float, dict]:
        return {lr: {"val_loss": v} for lr, v in losses.items()}

    assert peers.next_lrs(runs({1e-3: 3.0, 2e-3: 2.9, 4e-3: 2.8}), 0, 2) == [8e-3]
    assert peers.next_lrs(runs({1e-3: 2.7, 2e-3: 2.9, 4e-3: 2.8}), 0, 2) == [5e-4]
    assert peers.next_lrs(runs({1e-3: 3.0, 2e-3: 2.7, 4e-3: 2.8}), 0, 2) == []
    assert peers.next_lrs(runs({1e-3: 3.0, 2e-3: 2.9, 4e-3: 2.8}), 2, 2) == []  # extended enough
    assert peers.best_lr(runs({1e-3: float("inf"), 2e-3: 2.9})) == 2e-3  # a diverged run never wins


def test_report_only_keeps_the_measured_memory_columns(quick):
    """--report-only (without --resume) summarizes what is on disk, the memory measurement included."""
    result, out = quick
    proc = run_python("benchmarks/cpu/peers.py", "--quick", "--report-only", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads((out / "peers_quick.json").read_text())
    before = {r["method"]: r["memory"]["total"] for r in result["rows"]}
    after = {r["method"]: r.get("memory", {}).get("total") for r in again["rows"]}
    assert after == before
