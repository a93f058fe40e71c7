"""Engineer Q2's small check of CompActAdamW's update rules (issue 20 part 2), not the benchmark.

The quickstart-sized LLaMA of benchmarks/cpu/peers.py (d=256, 4 layers, KJV bytes through
PretrainDataModule, 8 x 128, warm-up then cosine, weight decay 0), reusing its ``train``:
update_rule adam / channel / tensor at r = n/4, plus channel with APOLLO's norm-growth
limiter switched off (the module constant ``_NORM_GROWTH_LIMIT``), at a few learning rates,
one seed, one thread. Writes one JSON line per run to ``sweep.jsonl`` next to this file.

    OMP_NUM_THREADS=1 python benchmarks/results/update_rules/sweep.py --steps 150 --lrs 2e-3,4e-3,8e-3
    OMP_NUM_THREADS=1 python benchmarks/results/update_rules/sweep.py --steps 150 --runs channel:4e-3,tensor:4e-3
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "cpu"))  # benchmarks/cpu/, for peers.py
import peers  # noqa: E402

import lightning_compact.optim as optim  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lrs", default="2e-3,4e-3,8e-3")
    parser.add_argument("--rules", default="adam,channel,tensor,channel_nolimit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", help="rule:lr pairs instead of the grid, e.g. channel:4e-3,tensor:8e-3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = dataclasses.replace(peers.Settings(), steps=args.steps, warmup=max(1, args.steps // 10))
    data = peers.load_blocks(s)
    out = HERE / "sweep.jsonl"
    grid = [(rule, float(lr)) for rule in args.rules.split(",") for lr in args.lrs.split(",")]
    if args.runs:
        grid = [(pair.split(":")[0], float(pair.split(":")[1])) for pair in args.runs.split(",")]
    for rule, lr in grid:
        optim._NORM_GROWTH_LIMIT = None if rule.endswith("_nolimit") else 1.01
        method = peers.Method(f"compact_n4_{rule}", "compact",
                              dict(peers.PAPER, rank=0.25, update_rule=rule.removesuffix("_nolimit")))
        result = peers.train(method, args.seed, lr, s, data)
        row = {k: result[k] for k in ("method", "seed", "lr", "val_loss", "best_val_loss", "diverged", "train_seconds")}
        row.update(steps=s.steps, warmup=s.warmup, torch=torch.__version__)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
