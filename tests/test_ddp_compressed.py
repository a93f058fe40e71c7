import pytest
import torch

from ddp_compressed_train import LOCAL_BATCH, N_SAMPLES, SETTINGS, WORLD
from helpers import PlainLM, make_trainer, run_two_ranks, token_loader
from lightning_compact import CompActCallback


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_two_process_ddp_matches_one_process_on_the_global_batch(tmp_path, optimizer):
    """DDP's reducer averages the compressed gradients (δ.grad): AdamW steps with them, SGD gets them decompressed."""
    assert WORLD == 2
    r0, r1 = run_two_ranks("ddp_compressed_train.py", tmp_path, optimizer, port_base=30500)

    # The converted weights get no .grad, so DDP leaves them alone; their compressed
    # gradients are reduced instead, r·m per weight and step (r/n = 4/32 or 4/64 of the
    # full gradient here), with either optimizer (SGD's are decompressed after the reduction).
    assert len(r0["converted"]) == 14 and r0["ignored_by_ddp"] == r0["converted"]
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

