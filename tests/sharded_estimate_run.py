"""Run by test_sharded_estimate.py with ``torch.distributed.run``: one real FSDP2 step per rank, measured."""

import dataclasses
import sys

import torch
import torch.distributed as dist

from lightning_compact.memory.estimator import Variant, estimate
from lightning_compact.memory.recipe import RunShape

# Shared with the test: a small LLaMA, real float32 tensors on the CPU.
SHAPE = RunShape(
    model="llama_60m", batch_size=2, seq_len=32, precision="32-true", device_type="cpu",
    config_overrides={"vocab_size": 256, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                      "num_attention_heads": 4},
)
VARIANTS = {"baseline": Variant(), "compressed_n4": Variant(0.25, "compressed")}

if __name__ == "__main__":
    dist.init_process_group("gloo")
    out = {}
    for name, variant in VARIANTS.items():
        shape = dataclasses.replace(SHAPE, world_size=dist.get_world_size(), strategy="fsdp2")
        result = estimate(shape, variant, fake=False)
        out[name] = result.peak.as_dict()
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
    # Leave together: a rank that tears gloo down while another is still writing its
    # results can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
