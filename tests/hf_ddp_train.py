"""Run by test_hf_trainer.py: transformers.Trainer with CompActTrainerCallback under DDP, 2 gloo processes on CPU.

Each process sets the torchrun environment and runs the Trainer; accelerate shards each global batch between
the two. Every rank saves its final weights as rank<r>.pt.
"""

import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))


def worker(rank: int, out_dir: str, port: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    from test_hf_trainer import InOrder, Tokens, tiny_llama, training_args

    from lightning_compact.integrations.hf import CompActTrainerCallback

    model = tiny_llama()
    args = training_args(out_dir, per_device_train_batch_size=4, ddp_backend="gloo")
    callback = CompActTrainerCallback(rank=4, update_proj_gap=2)  # decompressed: any optimizer, DDP's reducer
    trainer = InOrder(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    converted = len(callback.report.converted)
    torch.save({"state": model.state_dict(), "world_size": args.world_size, "converted": converted},
               Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], os.environ.get("MASTER_PORT", "39500")), nprocs=2, join=True)
