"""The speed benchmarks run end to end (CPU, tiny shapes: the script, not the figures, is checked)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu_speed  # noqa: E402
import host_overhead  # noqa: E402


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


def test_gpu_speed_script_runs_every_configuration_on_cpu():
    result = gpu_speed.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "1",
                             "--warmup", "1", "--no-compile"])
    assert [r["configuration"] for r in result["rows"]] == list(gpu_speed.CONFIGS)
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in result["rows"])
