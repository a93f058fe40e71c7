"""Smoke test of benchmarks/gpu/multi_gpu.py on 2 CPU processes (gloo): it runs and reports every row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multi_gpu_benchmark_runs_on_two_cpu_processes(tmp_path):
    out = tmp_path / "mg.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(33500 + os.getpid() % 1000), str(ROOT / "benchmarks" / "gpu" / "multi_gpu.py"),
        "--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "16",
        "--strategies", "ddp", "fsdp2", "--configs", "baseline", "n/4 compressed", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["meta"]["world_size"] == 2
    rows = {(r["strategy"], r["config"]): r for r in result["rows"]}
    assert set(rows) == {(s, c) for s in ("ddp", "fsdp2") for c in ("baseline", "n/4 compressed")}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and len(row["peak_gib_per_rank"]) == 2
        assert 0 < row["final_loss"] < 10
    assert rows[("fsdp2", "baseline")]["speed_vs_baseline"] == 1.0
