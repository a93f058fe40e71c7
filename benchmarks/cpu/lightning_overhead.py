"""Host overhead through the Lightning Trainer: CompAct's median step against the baseline's, in one process.

Issue 22's check: the tiny 24-block shape (d = 64, batch 1 x 8 tokens, one thread) where
compute is negligible and a step measures host work (hooks, projection schedule, Python).
Each configuration fits the same module for ``--steps`` steps with ``CompActCallback``'s
defaults (or none: the baseline); a callback times each training batch (start to end,
optimizer step included). Configurations run in interleaved rounds so that load from other
processes falls on all of them alike; the ratio is the median of the per-round ratios of
median step times.

    python benchmarks/cpu/lightning_overhead.py --rounds 5 --steps 60 --out benchmarks/results/lightning_overhead_tiny.json

``--accelerator gpu`` runs the same fits on one GPU (each batch's time ends with a
``torch.cuda.synchronize()``, so queued kernels are counted): whether the host still bounds
a small micro-batch there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compact import CompActCallback
from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=24, num_attention_heads=4)

# name -> CompActCallback kwargs (None: the baseline)
CONFIGS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "compressed (defaults)": dict(rank=0.25),
    "decompressed (defaults)": dict(rank=0.25, grad_mode="decompressed"),
    # What cache_projections="auto" chose at this shape before it weighed the cache against the weight.
    "compressed, no cache": dict(rank=0.25, cache_projections=False),
    "decompressed, no cache": dict(rank=0.25, grad_mode="decompressed", cache_projections=False),
}


class LM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(TINY)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(tokens, labels=tokens)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StepTimer(pl.Callback):
    def __init__(self, cuda: bool = False) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self._cuda = cuda

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def fit_once(config: dict[str, Any] | None, steps: int, batch: int, seq: int, accelerator: str = "cpu") -> float:
    """Median seconds of a training batch over ``steps`` steps (the first 5 dropped as warm-up)."""
    tokens = torch.randint(0, TINY.vocab_size, (steps * batch, seq), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(tokens), batch_size=batch)
    timer = StepTimer(cuda=accelerator == "gpu")
    callbacks: list[pl.Callback] = [timer] + ([CompActCallback(**config)] if config is not None else [])
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(LM(), loader)
    return statistics.median(timer.times[5:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    medians: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, config in CONFIGS.items():
            medians[name].append(fit_once(config, args.steps, args.batch, args.seq, args.accelerator))
        print(f"  round {round_}: " + ", ".join(f"{n} {medians[n][-1] * 1e3:.2f} ms" for n in CONFIGS), flush=True)
    ratios = {name: statistics.median(m / b for m, b in zip(medians[name], medians["baseline"])) for name in CONFIGS}
    for name in CONFIGS:
        print(f"{name}: median step {statistics.median(medians[name]) * 1e3:.2f} ms, {ratios[name]:.3f}x the baseline")
    if args.out is not None:
        device = "cuda" if args.accelerator == "gpu" else "cpu"
        write_json(args.out, {"provenance": provenance(device, argv), "settings": {k: str(v) for k, v in vars(args).items()},
                              "median_step_seconds": medians, "ratio_to_baseline": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
