"""On a GPU: peak memory and throughput of Lightning training, baseline vs CompAct, side by side.

Trains the paper's LLaMA-60M shape (or another preset) on synthetic tokens with
``PeakMemoryMonitor`` for each configuration in one process, and prints
``torch.cuda.max_memory_allocated``, the saved-activation bytes and tokens/s as ratios
to the baseline. Also checks, on the GPU, that projections equal the CPU's and that
bf16 ``compact_linear`` gradients match a float64 CPU reference.

Needs only torch, lightning and this package (no datasets / jsonargparse):

    PYTHONPATH=. python benchmarks/gpu/gpu_trainer_memory.py --out gpu_trainer_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compact import CompActCallback, PeakMemoryMonitor, compact_linear, make_projection
from lightning_compact.models.llama import LLAMA_PRESETS, LlamaForCausalLM

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

MIB = 2**20


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def check_kernels() -> dict:
    """Device-independence of P and bf16 accuracy of compact_linear on CUDA."""
    out = {}
    for projection in ("rademacher", "gaussian"):
        cpu = make_projection(1024, 256, 12345, projection=projection)
        gpu = make_projection(1024, 256, 12345, projection=projection, device="cuda")
        out[f"projection_{projection}_max_abs_diff_cuda_vs_cpu"] = (gpu.cpu() - cpu).abs().max().item()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, 512, generator=g, dtype=torch.float64)
    w = torch.randn(1024, 512, generator=g, dtype=torch.float64) / 512**0.5
    go = torch.randn(8, 256, 1024, generator=g, dtype=torch.float64)
    xb, wb = x.cuda().bfloat16().requires_grad_(), w.cuda().bfloat16().requires_grad_()
    compact_linear(xb, wb, rank=128, seed=7).backward(go.cuda().bfloat16())
    p = make_projection(512, 128, 7, dtype=torch.float64)
    x2, go2 = x.reshape(-1, 512), go.reshape(-1, 1024)
    out["bf16_grad_input_rel_err_vs_fp64"] = rel_err(xb.grad.reshape(-1, 512), go2 @ w)
    out["bf16_grad_weight_rel_err_vs_fp64_formula"] = rel_err(wb.grad, (go2.T @ (x2 @ p)) @ p.T)
    return out


class LM(pl.LightningModule):
    def __init__(self, preset: str) -> None:
        super().__init__()
        self.model = LlamaForCausalLM(LLAMA_PRESETS[preset])

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(tokens, labels=tokens)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Throughput(pl.Callback):
    """Tokens/s over the steps after ``skip`` warm-up steps (CUDA-synchronised)."""

    def __init__(self, tokens_per_step: int, skip: int = 3) -> None:
        self.tokens_per_step, self.skip, self.times = tokens_per_step, skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t)

    def tokens_per_s(self) -> float:
        return self.tokens_per_step * len(self.times) / sum(self.times)


def run(preset: str, rank: float | None, batch: int, seq: int, steps: int, precision: str) -> dict:
    torch.manual_seed(0)
    vocab = LLAMA_PRESETS[preset].vocab_size
    tokens = torch.randint(0, vocab, (batch * steps, seq))
    monitor, speed = PeakMemoryMonitor(), Throughput(batch * seq)
    callbacks = [monitor, speed] + ([CompActCallback(rank=rank)] if rank is not None else [])
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(LM(preset), DataLoader(TensorDataset(tokens), batch_size=batch))
    row = dict(monitor.history[-1])
    row["tokens_per_s"] = speed.tokens_per_s()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama_60m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"

    result = {
        "provenance": provenance("cuda", argv),
        "setting": vars(args),
        "kernels": check_kernels(),
        "runs": {},
    }
    print(json.dumps(result["kernels"], indent=1), flush=True)
    for name, rank in (("baseline", None), ("compact r=n/4", 0.25), ("compact r=n/8", 0.125)):
        gc.collect()
        torch.cuda.empty_cache()
        result["runs"][name] = run(args.preset, rank, args.batch, args.seq, args.steps, args.precision)
        print(name, result["runs"][name], flush=True)

    base = result["runs"]["baseline"]
    print(f"\n{args.preset}, batch {args.batch} x seq {args.seq}, {args.precision}, {result['provenance']['device']}")
    print(f"{'config':<15}{'cuda peak':>12}{'ratio':>7}{'saved act.':>12}{'ratio':>7}{'tokens/s':>11}{'ratio':>7}")
    for name, row in result["runs"].items():
        print(
            f"{name:<15}{row['memory/cuda_max_allocated_MiB']:>8.0f} MiB"
            f"{row['memory/cuda_max_allocated_MiB'] / base['memory/cuda_max_allocated_MiB']:>7.3f}"
            f"{row['memory/saved_activations_MiB']:>8.0f} MiB"
            f"{row['memory/saved_activations_MiB'] / base['memory/saved_activations_MiB']:>7.3f}"
            f"{row['tokens_per_s']:>11.0f}{row['tokens_per_s'] / base['tokens_per_s']:>7.3f}"
        )
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
