"""benchmarks/quickstart_seeds.py: reading the CSV logger back and the paired summary (no training)."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quickstart_seeds.py"


@pytest.fixture(scope="module")
def qs():
    spec = importlib.util.spec_from_file_location("quickstart_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
