"""benchmarks/cpu/quickstart_seeds.py: reading the CSV logger back and the paired summary (no training)."""

import importlib
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu" / "quickstart_seeds.py"


@pytest.fixture(scope="module")
def qs():
    return importlib.import_module("quickstart_seeds")  # benchmarks/cpu/ is on sys.path (conftest.py)


def test_metrics_csv_is_read_back_per_metric_skipping_empty_cells(qs, tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/loss\n0,9,3.0,\n0,49,,2.5\n0,99,,2.25\n")
    series = qs.read_metrics(path)
    assert series == {"train/loss": [(9, 3.0)], "val/loss": [(49, 2.5), (99, 2.25)]}


def test_summary_pairs_seeds_and_gives_a_t_interval(qs):
    runs = [
        {"arm": arm, "seed": seed, "final": {"val/loss": value}}
        for arm, seed, value in [("baseline", 0, 2.0), ("compact", 0, 2.04), ("baseline", 1, 2.2), ("compact", 1, 2.2),
                                 ("compact", 2, 9.9)]  # seed 2 has no baseline: left out
    ]
    m = qs.summarize(runs, ["val/loss"])["metrics"]["val/loss"]
    assert m["paired_ratios"] == pytest.approx([1.02, 1.0])
    assert m["ratio_of_means"] == pytest.approx(4.24 / 4.2)
    # n = 2: half-width t(0.975, 1) · s / √2 with t = 12.706, s = 0.02 / √2.
    lo, hi = m["paired_ratio_ci95"]
    assert (hi - lo) / 2 == pytest.approx(12.7062 * (0.02 / math.sqrt(2)) / math.sqrt(2), rel=1e-4)
    assert "paired ratio" in qs.format_table(qs.summarize(runs, ["val/loss"]))


def test_report_only_reads_every_seed_on_disk_unless_seeds_are_named(qs, tmp_path, capsys):
    # Seeds 3 and 5 only (a fresh-seed folder): the default 0,1,2 would report nothing.
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    for arm, seed, value in [("baseline", 3, 2.0), ("compact", 3, 2.1), ("baseline", 5, 1.8), ("compact", 5, 1.8)]:
        (run_dir / f"{arm}_seed{seed}.json").write_text(json.dumps(
            {"arm": arm, "seed": seed, "final": {"val/loss": value}, "series": {}}))
    qs.main(["--report-only", "--name", "fresh", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "fresh.json").read_text())
    assert summary["seeds"] == [3, 5]
    assert summary["metrics"]["val/loss"]["paired_ratios"] == pytest.approx([1.05, 1.0])
    qs.main(["--report-only", "--name", "fresh", "--out", str(tmp_path), "--seeds", "5"])
    assert json.loads((tmp_path / "fresh.json").read_text())["seeds"] == [5]


def test_stall_diagnostic_records_every_step_of_the_shipped_recipe(tmp_path, monkeypatch):
    # benchmarks/diagnostics/quickstart_stall.py on the quickstart recipe, 2 steps of 2 x 32 bytes.
    root = SCRIPT.parents[2]
    stall = importlib.import_module("quickstart_stall")
    monkeypatch.chdir(tmp_path)
    out = stall.main(["--recipe", str(root / "recipes" / "quickstart" / "pretrain_llama_tiny.yaml"), "--seed", "1",
                      "--steps", "2", "--out", str(tmp_path / "stall.json"), "--",
                      "--data.init_args.batch_size", "2", "--data.init_args.seq_len", "32"])
    assert [r["step"] for r in out["rows"]] == [1, 2]
    for row in out["rows"]:
        assert set(row["relative_update"]) == set(stall.GROUPS)
        assert all(0 < v < 1 for v in row["relative_update"].values())  # every group moved, by less than its norm
        assert row["residual_rms"] > 0 and 0 < row["embed_share"]
    assert (tmp_path / "stall.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stall.json"]  # no config.yaml, no logs
