import pytest
import torch

from helpers import run_two_ranks


@pytest.mark.slow
def test_two_process_cpu_ddp_keeps_ranks_identical(tmp_path):
    r0, r1 = run_two_ranks("ddp_train.py", tmp_path, port_base=29500)
    assert r0["converted"] == r1["converted"] == 14
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), name
    changed = [n for n, w in r0["state"].items() if not torch.equal(w, r0["init"][n])]
    assert "model.model.layers.0.mlp.up_proj.weight" in changed and len(changed) == len(r0["state"])
    # The memory monitor's figures are reduced (max) across ranks, so both ranks agree.
    assert r0["history"] and r0["history"] == r1["history"]
    assert r0["history"][0]["memory/saved_activations_MiB"] > 0
