import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_compressed_train import LOCAL_BATCH, N_SAMPLES, SETTINGS, WORLD
from helpers import PlainLM, make_trainer, token_loader
from lightning_compact import CompActCallback


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_two_process_ddp_matches_one_process_on_the_global_batch(tmp_path, optimizer):
    """DDP's reducer averages the compressed gradients (δ.grad): AdamW steps with them, SGD gets them decompressed."""
    script = Path(__file__).with_name("ddp_compressed_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(30500 + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), optimizer], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))

    # The converted weights get no .grad, so DDP leaves them alone; their compressed
    # gradients are reduced instead, r·m per weight and step (r/n = 4/32 or 4/64 of the
    # full gradient here), with either optimizer (SGD's are decompressed after the reduction).
    assert len(r0["converted"]) == 12 and r0["ignored_by_ddp"] == r0["converted"]
    assert r0["compressed"] == (r0["converted"] if optimizer == "adamw" else [])
    assert r0["sent"] == [r0["compressed_numel"]] * SETTINGS["max_steps"]
    assert r0["full_numel"] > 8 * r0["compressed_numel"]

    # Same initialisation (rank 0's), same samples per step, same P: the single-process run
    # on the global batch differs only in float64 summation order.
    torch.manual_seed(0)
    single = PlainLM(optimizer=optimizer)
    make_trainer(tmp_path / "single", [CompActCallback(rank=4, update_proj_gap=2)], **SETTINGS).fit(
        single, token_loader(n_samples=N_SAMPLES, batch_size=LOCAL_BATCH * WORLD)
    )
    for name, ref in single.state_dict().items():
        for result in (r0, r1):
            out = result["state"][name]
            assert ((out - ref).norm() / ref.norm()).item() < 1e-10, name

