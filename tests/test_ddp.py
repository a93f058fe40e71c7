import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_two_process_cpu_ddp_keeps_ranks_identical(tmp_path):
    script = Path(__file__).with_name("ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["converted"] == r1["converted"] == 12
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), name
    changed = [n for n, w in r0["state"].items() if not torch.equal(w, r0["init"][n])]
    assert "model.model.layers.0.mlp.up_proj.weight" in changed and len(changed) == len(r0["state"])
    # The memory monitor's figures are reduced (max) across ranks, so both ranks agree.
    assert r0["history"] and r0["history"] == r1["history"]
    assert r0["history"][0]["memory/saved_activations_MiB"] > 0
