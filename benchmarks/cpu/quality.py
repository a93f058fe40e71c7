"""Quality of CompAct against the baseline: validation loss/perplexity over several seeds.

The quickstart's model and data (``recipes/quickstart/pretrain_llama_tiny.yaml``): the
3.3M-parameter LLaMA (d=256, 4 layers, SwiGLU 688, byte vocabulary) from
``lightning_compact.models.CausalLMModule`` on the King James Bible through
``lightning_compact.data.PretrainDataModule``, AdamW with 10% linear warm-up and cosine
to 0.1x. Every run of one seed has the same initialisation and the same batches; the
seed also selects CompAct's projections.

Runs (``--runs``):

* ``baseline``: no CompAct;
* ``compressed_n4`` / ``compressed_n8``: the paper's full method (compressed gradients
  and Adam moments, ``CompActAdamW``), r = n/4 or n/8;
* ``decompress_n4`` / ``decompress_n8``: gradient decompression (full-size ``.grad``,
  plain AdamW);
* beyond the paper: ``orth_n4`` / ``orth_n8`` (``projection="orthogonal"``, the
  orthogonalised Gaussian), ``orth_decompress_*``, and ``*_T10`` (resampled every 10
  steps), ``compressed_n4_carry`` / ``compressed_n4_T10_carry`` (``CompActAdamW``'s
  ``moment_carry``: the first moment moved into the new basis at each resample; the
  prototype's ``carry_n4`` of RESULTS §7 ran at commit 0c26872). (The rank-schedule
  ablation of the prototype is not ported.)

Each finished run is written to ``<out>/runs/<run>_seed<k>.json`` (kept: a rerun with
the same settings skips it, so the script can be resumed), then the table, the JSON
summary ``<out>/quality_<preset>.json`` and the PNG of the loss curves.

Usage::

    python benchmarks/cpu/quality.py --preset smoke            # minutes: the plumbing
    python benchmarks/cpu/quality.py --preset standard --jobs 2
    python benchmarks/cpu/quality.py --runs baseline,compressed_n4 --seeds 0 --steps 200 --batch-size 16 --seq-len 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))

ROOT = Path(__file__).resolve().parents[2]

# The quickstart's model (recipes/quickstart/pretrain_llama_tiny.yaml).
MODEL_OVERRIDES = dict(
    vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4
)

# The paper's method, which every run below but the defaults_* ones measures (and did before 0.3
# made the channel rule and converted attention outputs the defaults): the Adam update N Pᵀ,
# o_proj left exact. Decompressed runs have no update rule (plain AdamW on Ĝ Pᵀ).
PAPER = dict(update_rule="adam", exclude_modules=["o_proj"])
PAPER_DECOMPRESSED = dict(exclude_modules=["o_proj"])

# name -> (CompActCallback arguments or None for the baseline, ablation options or None)
RUNS: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {
    "baseline": (None, None),
    "compressed_n4": (dict(rank=0.25, grad_mode="compressed", **PAPER), None),
    "decompress_n4": (dict(rank=0.25, grad_mode="decompressed", **PAPER_DECOMPRESSED), None),
    "compressed_n8": (dict(rank=0.125, grad_mode="compressed", **PAPER), None),
    "decompress_n8": (dict(rank=0.125, grad_mode="decompressed", **PAPER_DECOMPRESSED), None),
    # The 0.3 defaults: CompActCallback(rank) and nothing else.
    "defaults_n4": (dict(rank=0.25), None),
    "defaults_n8": (dict(rank=0.125), None),
}
for _r, _frac in (("n4", 0.25), ("n8", 0.125)):
    # Beyond the paper: the orthogonalised Gaussian projection (projection="orthogonal").
    RUNS[f"orth_{_r}"] = (dict(rank=_frac, grad_mode="compressed", projection="orthogonal", **PAPER), None)
    RUNS[f"orth_decompress_{_r}"] = (
        dict(rank=_frac, grad_mode="decompressed", projection="orthogonal", **PAPER_DECOMPRESSED), None
    )
# The resample period against the run's length: the quickstart's T=50 gives 4-6 windows.
RUNS["compressed_n4_T10"] = (dict(rank=0.25, grad_mode="compressed", update_proj_gap=10, **PAPER), None)
RUNS["decompress_n4_T10"] = (dict(rank=0.25, grad_mode="decompressed", update_proj_gap=10, **PAPER_DECOMPRESSED), None)
# Beyond the paper: CompActAdamW(moment_carry=True), turned on after the callback's optimizer swap.
RUNS["compressed_n4_carry"] = (dict(rank=0.25, grad_mode="compressed", **PAPER), dict(moment_carry=True))
RUNS["compressed_n4_T10_carry"] = (
    dict(rank=0.25, grad_mode="compressed", update_proj_gap=10, **PAPER), dict(moment_carry=True)
)


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    gap: int
    val_every: int
    val_batches: int
    warmup_ratio: float = 0.1
    scale: float = 1.0


PRESETS: dict[str, Settings] = {
    # The plumbing, in a few minutes.
    "smoke": Settings(steps=60, batch_size=8, seq_len=128, lr=3e-3, gap=20, val_every=20, val_batches=4),
    # The quickstart exactly (200 steps of 16 x 256).
    "quickstart": Settings(steps=200, batch_size=16, seq_len=256, lr=3e-3, gap=50, val_every=50, val_batches=10),
    # Long enough for the baseline to flatten, small enough for 2 shared CPU cores.
    # Sized for 2 CPU cores shared with other jobs (about 5 min a run, two at a time).
    "standard": Settings(steps=200, batch_size=8, seq_len=64, lr=3e-3, gap=50, val_every=50, val_batches=16),
}


def _run_path(out: Path, name: str, seed: int, settings: Settings) -> Path:
    tag = f"s{settings.steps}_b{settings.batch_size}_l{settings.seq_len}_lr{settings.lr:g}_T{settings.gap}_a{settings.scale:g}"
    return out / "runs" / tag / f"{name}_seed{seed}.json"


def run_one(name: str, seed: int, settings: Settings, threads: int = 1) -> dict[str, Any]:
    """Train one run; returns its validation curve and final figures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_compact import CompActAdamW, CompActCallback
    from lightning_compact.data import PretrainDataModule
    from lightning_compact.models import CausalLMModule

    torch.set_num_threads(threads)
    callback_args, ablation = RUNS[name]
    s = settings

    class Curve(Callback):
        def __init__(self) -> None:
            self.points: list[tuple[int, float]] = []
            self.train: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train.append((trainer.global_step, float(loss)))

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
                self.points.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))
                print(f"  {name} seed {seed} step {trainer.global_step}: val loss {self.points[-1][1]:.4f}", flush=True)

    pl.seed_everything(seed, verbose=False)
    overrides = dict(MODEL_OVERRIDES, max_position_embeddings=s.seq_len)
    module = CausalLMModule(model="llama_60m", config_overrides=overrides, lr=s.lr, warmup_ratio=s.warmup_ratio,
                            min_lr_ratio=0.1)
    data = PretrainDataModule(dataset="kjv", tokenizer="byte", seq_len=s.seq_len, batch_size=s.batch_size,
                              val_fraction=0.02, max_val_blocks=s.val_batches * s.batch_size, seed=0)
    class MomentCarry(Callback):
        # After CompActCallback.on_fit_start has swapped CompActAdamW in.
        def on_train_start(self, trainer, pl_module):
            (optimizer,) = trainer.optimizers
            assert isinstance(optimizer, CompActAdamW), type(optimizer)
            optimizer.moment_carry = True

    curve = Curve()
    callbacks: list[Any] = [curve]
    if callback_args is not None:
        callbacks.append(CompActCallback(**{"update_proj_gap": s.gap, "seed": seed, "scale": s.scale, **callback_args}))
    if ablation and ablation.get("moment_carry"):
        callbacks.append(MomentCarry())
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=s.steps, val_check_interval=s.val_every,
        check_val_every_n_epoch=None, limit_val_batches=s.val_batches, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    if not curve.points or curve.points[-1][0] != s.steps:
        (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
        curve.points.append((s.steps, float(metrics["val/loss"])))
    final = curve.points[-1][1]
    transfers = getattr(trainer.optimizers[0], "transfers", None)
    return {
        "run": name, "seed": seed, "settings": dataclasses.asdict(s), "val_curve": curve.points,
        "train_curve": curve.train[:: max(1, s.steps // 100)], "val_loss": final, "val_ppl": math.exp(final),
        "train_seconds": seconds, "ablation": ablation and {k: str(v) for k, v in ablation.items()}, "moment_transfers": transfers,
    }


def _worker(job: tuple[str, int, Settings, str]) -> str:
    name, seed, settings, path = job
    result = run_one(name, seed, settings)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"done {name} seed {seed}: val loss {result['val_loss']:.4f} ({result['train_seconds']:.0f} s)", flush=True)
    return path


def summarize(results: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per run: mean and spread (sample std, min, max) of the final loss and perplexity over seeds."""
    base = [r for r in results if r["run"] == "baseline"]
    base_by_seed = {r["seed"]: r["val_ppl"] for r in base}
    rows = []
    for name in names:
        rs = sorted((r for r in results if r["run"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        losses, ppls = [r["val_loss"] for r in rs], [r["val_ppl"] for r in rs]
        paired = [r["val_ppl"] / base_by_seed[r["seed"]] for r in rs if r["seed"] in base_by_seed]
        rows.append({
            "run": name, "seeds": [r["seed"] for r in rs],
            "val_loss_mean": statistics.fmean(losses), "val_loss_std": statistics.stdev(losses) if len(rs) > 1 else 0.0,
            "val_ppl_mean": statistics.fmean(ppls), "val_ppl_std": statistics.stdev(ppls) if len(rs) > 1 else 0.0,
            "val_ppl_min": min(ppls), "val_ppl_max": max(ppls),
            # Against the baseline's mean over the same seeds (runs may have fewer seeds).
            "ppl_ratio_to_baseline": (
                statistics.fmean(ppls) / statistics.fmean(base_by_seed[r["seed"]] for r in rs)
                if all(r["seed"] in base_by_seed for r in rs) else None
            ),
            "paired_ratio_min": min(paired) if paired else None, "paired_ratio_max": max(paired) if paired else None,
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | seeds | val loss (mean ± std) | val ppl (mean ± std) | ppl / baseline | per-seed ratio range | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "–" if r["ppl_ratio_to_baseline"] is None or r["run"] == "baseline" else f"{r['ppl_ratio_to_baseline']:.4f}"
        rng = (
            "–" if r["paired_ratio_min"] is None or r["run"] == "baseline"
            else f"{r['paired_ratio_min']:.3f} – {r['paired_ratio_max']:.3f}"
        )
        lines.append(
            f"| {r['run']} | {len(r['seeds'])} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{r['val_ppl_mean']:.3f} ± {r['val_ppl_std']:.3f} | {ratio} | {rng} | {r['train_seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(names):
        rs = [r for r in results if r["run"] == name]
        if not rs:
            continue
        steps = [p[0] for p in rs[0]["val_curve"]]
        curves = [[p[1] for p in r["val_curve"]] for r in rs if len(r["val_curve"]) == len(steps)]
        mean = [statistics.fmean(c[j] for c in curves) for j in range(len(steps))]
        lo = [min(c[j] for c in curves) for j in range(len(steps))]
        hi = [max(c[j] for c in curves) for j in range(len(steps))]
        color = f"C{i}"
        ax.plot(steps, mean, marker="o", ms=3, color=color, label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lows = [p[1] for r in results for p in r["val_curve"] if p[0] >= 0.25 * r["settings"]["steps"]]
    if lows:
        ax.set_ylim(min(lows) - 0.05, max(lows) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    parser.add_argument("--runs", default="baseline,compressed_n4,decompress_n4,compressed_n8,decompress_n8,compressed_n4_T10,orth_n4",
                        help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--seeds", default="0,1,2")
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type={"int": int, "float": float}[field.type],
                            help=f"override the preset's {field.name}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    parser.add_argument("--name", help="file stem of the summary JSON and PNG (default: quality_<preset>)")
    parser.add_argument("--report-only", action="store_true", help="summarize the runs already on disk")
    args = parser.parse_args(argv)

    settings = PRESETS[args.preset]
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None}
    settings = dataclasses.replace(settings, **changes)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    jobs = [(n, k, settings, str(_run_path(args.out, n, k, settings))) for k in seeds for n in names]
    # The first seed of every run first, then the other seeds run by run in --runs order:
    # an interrupted benchmark still has complete rows for the runs listed first.
    jobs.sort(key=lambda j: (j[1] != seeds[0], names.index(j[0]), seeds.index(j[1])))
    todo = [j for j in jobs if not Path(j[3]).exists()]
    if todo and not args.report_only:
        print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} already on disk), {args.jobs} at a time", flush=True)
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(_worker, todo))
        else:
            for job in todo:
                _worker(job)
    results = [json.loads(Path(j[3]).read_text()) for j in jobs if Path(j[3]).exists()]
    rows = summarize(results, names)

    from provenance import provenance, write_json  # imports torch: here, after the workers

    s = settings
    title = (
        f"KJV bytes, LLaMA d=256x4, {s.steps} steps of {s.batch_size}x{s.seq_len}, lr {s.lr:g}, T={s.gap}, "
        f"alpha={s.scale:g}; mean of seeds {','.join(map(str, seeds))} (band: min-max)"
    )
    stem = args.name or f"quality_{args.preset}"
    summary = {
        "title": title, "settings": dataclasses.asdict(s), "seeds": seeds, "rows": rows,
        "provenance": provenance("cpu", argv),
        "runs": results,
    }
    write_json(args.out / f"{stem}.json", summary)
    plot(results, names, args.out / f"{stem}.png", title)
    print(title)
    print(format_table(rows))
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
