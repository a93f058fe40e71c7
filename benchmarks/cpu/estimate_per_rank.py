"""Per-rank peak memory of the FSDP2 recipes on 8 GPUs (and DDP for comparison), baseline vs CompAct n/4.

The estimator's FakeTensor step on rank 0 of a fake process group of 8 ranks (see
``lightning_compact.memory.sharded``), with each recipe's per-GPU micro-batch:
``recipes/pretrain/llama_1b_c4_fsdp.yaml`` (64 x 256, no accumulation) and
``llama_7b_c4_fsdp.yaml`` (16 x 256, 4 accumulated micro-batches), bf16-mixed, CUDA
kernels and allocator rounding modelled. Nothing is allocated; about 10 minutes on one CPU core.

    PYTHONPATH=. python benchmarks/cpu/estimate_per_rank.py benchmarks/results/estimate_per_rank_8gpu.json
"""

import dataclasses
import json
import sys
import time

from lightning_compact.memory.estimator import Variant, estimate
from lightning_compact.memory.recipe import RunShape

WORLD_SIZE = 8
RECIPES = (("llama_1b", 64, 1), ("llama_7b", 16, 4))  # model, per-GPU micro-batch, accumulation


def main(out_path: str) -> None:
    out = {}
    for model, batch, accum in RECIPES:
        shape = RunShape(model=model, batch_size=batch, seq_len=256, precision="bf16-mixed", device_type="cuda",
                         accumulate_grad_batches=accum, config_overrides={"vocab_size": 32100})
        for strategy in ("fsdp2", "ddp"):
            for variant in (Variant(), Variant(0.25, "compressed")):
                start = time.time()
                result = estimate(dataclasses.replace(shape, world_size=WORLD_SIZE, strategy=strategy), variant)
                row = {k: x / 2**30 for k, x in result.peak.as_dict().items()}
                key = f"{model} {strategy}x{WORLD_SIZE} {'baseline' if variant.rank is None else 'compact n/4 compressed'}"
                out[key] = row
                print(key, {k: round(x, 2) for k, x in row.items()}, f"{time.time() - start:.0f} s", flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
