"""The speed benchmarks run end to end (CPU, tiny shapes: the script, not the figures, is checked)."""

import math

import pytest

import gpu_speed  # benchmarks/gpu/ and cpu/ are on sys.path (conftest.py)
import host_overhead
import torch


def test_host_overhead_reports_every_configuration_against_the_baseline(tmp_path):
    result = host_overhead.main(
        ["--shape", "tiny", "--repeats", "1", "--configs", "baseline", "n/4 compressed", "n/4 compressed, no cache",
         "--out", str(tmp_path / "r.json")]
    )
    rows = {row["configuration"]: row for row in result["rows"]}
    assert rows["baseline"]["time_ratio"] == 1.0 and rows["baseline"]["ops_ratio"] == 1.0
    # The cache removes the per-forward projection build: fewer ops than building P each time.
    assert rows["n/4 compressed"]["aten_ops"] < rows["n/4 compressed, no cache"]["aten_ops"]
    assert rows["n/4 compressed"]["projection_cache_KiB"] > 0 == rows["n/4 compressed, no cache"]["projection_cache_KiB"]
    assert (tmp_path / "r.json").exists()


def test_lightning_overhead_times_every_configuration_through_the_trainer(tmp_path):
    import json

    import lightning_overhead

    assert lightning_overhead.main(["--rounds", "1", "--steps", "7", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["ratio_to_baseline"]) == list(lightning_overhead.CONFIGS)
    assert result["ratio_to_baseline"]["baseline"] == 1.0
    assert all(len(times) == 1 and times[0] > 0 for times in result["median_step_seconds"].values())
    assert result["provenance"]["device"].startswith("cpu")


def test_step_phases_times_forward_backward_and_step_of_every_configuration():
    import step_phases  # benchmarks/diagnostics/

    for name in step_phases.CONFIGS:
        assert all(ms > 0 for ms in step_phases.phases(name, steps=12)), name


def test_gpu_speed_script_runs_every_configuration_on_cpu():
    result = gpu_speed.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "1",
                             "--warmup", "1", "--no-compile"])
    assert [r["configuration"] for r in result["rows"]] == list(gpu_speed.CONFIGS)
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in result["rows"])


def test_interleaved_times_warm_up_once_then_run_round_by_round_and_pair_ratios_per_round():
    import timing

    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = timing.interleaved_times(steps, repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert timing.interleaved_times(steps, repeats=0) == {"a": [], "b": []} and len(calls) == 8
    # a takes twice b's time; round 2 is slow for both, and b has a hiccup in round 3. The
    # paired ratio (median of 2, 2, 0.44) stays 2; the ratio of medians (2.2 / 5) does not.
    a, b = [2.0, 20.0, 2.2], [1.0, 10.0, 5.0]
    assert timing.paired_ratio(a, b) == 2.0
    assert timing.median(a) / timing.median(b) == 2.2 / 5.0
    assert math.isnan(timing.paired_ratio([], []))


def test_the_t_quantile_table_equals_scipys_to_its_three_decimals_and_is_used_without_scipy(monkeypatch):
    import sys

    import stats
    from scipy.stats import t

    with_scipy = stats.t_interval([1.0, 2.0, 4.0])
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as on the device machine
    for df in range(1, 31):
        assert stats.t975(df) == round(float(t.ppf(0.975, df)), 3), df
    with pytest.raises(ValueError, match="pip install scipy"):
        stats.t975(31)
    lo, hi = stats.t_interval([1.0, 2.0, 4.0])  # mean 7/3, s = 1.5275, df 2: half-width 4.303 · s / √3
    assert (hi - lo) / 2 == pytest.approx(4.303 * 1.5275252 / math.sqrt(3), rel=1e-6)
    # The table rounds t to 3 decimals: at most 5e-4 on t >= 2.042, 2.5e-4 relative on the half-width.
    assert (with_scipy[1] - with_scipy[0]) / 2 == pytest.approx((hi - lo) / 2, rel=2.5e-4)
    assert stats.t_interval([1.0]) is None


def test_provenance_names_the_device_and_arguments_and_json_is_written_whole(tmp_path):
    import json

    from provenance import provenance, write_json

    info = provenance("cpu", ["--steps", "3"])
    assert info["device"] == f"cpu ({torch.get_num_threads()} threads)" and info["argv"] == ["--steps", "3"]
    assert info["torch"] == torch.__version__ and info["lightning_compact"]
    write_json(None, info)  # no path: nothing written, no error
    write_json(tmp_path / "sub" / "r.json", {"provenance": info})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"provenance": info}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]  # the temporary file is gone
