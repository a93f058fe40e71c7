"""A shipped quickstart recipe, CompAct against its baseline, over several seeds.

Each run is the recipe through the CLI (``lightning_compact.cli.run_cli``, i.e.
``lightning-compact fit --config <recipe>``) with ``--seed_everything k --compact.seed k``
(the initialisation, the batch order and CompAct's projections all follow the seed) and,
for the baseline, ``--compact.enabled false``. Every run is a fresh process. With
``--test`` the fitted model is then evaluated on the test split
(``trainer.test``; the fine-tuning quickstart's 379 held-out reviews).

The figures are read back from the CSV logger's ``metrics.csv`` (last logged value of
each metric), each finished run is kept as ``<out>/<name>/<arm>_seed<k>.json`` (a rerun
skips it), then the per-seed table, the means, the paired ratios and differences go to
``<out>/<name>.json`` and the validation curves to ``<out>/<name>.png``.

Usage::

    python benchmarks/cpu/quickstart_seeds.py                       # the pretraining quickstart, seeds 0,1,2
    python benchmarks/cpu/quickstart_seeds.py --recipe recipes/quickstart/finetune_minilm.yaml \\
        --test --metrics test/acc,test/f1 --name finetune_minilm
    python benchmarks/cpu/quickstart_seeds.py --report-only         # the table from the runs on disk
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from stats import t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARMS = {"compact": [], "baseline": ["--compact.enabled", "false"]}


def cli_args(recipe: str, arm: str, seed: int, save_dir: str, name: str, extra: list[str]) -> list[str]:
    """The ``lightning-compact fit`` arguments of one run."""
    return [
        "fit", "--config", recipe, "--seed_everything", str(seed), "--compact.seed", str(seed), *ARMS[arm],
        "--trainer.logger.init_args.save_dir", save_dir, "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", f"{arm}_seed{seed}", "--trainer.enable_progress_bar", "false", *extra,
    ]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as {metric: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def worker(args: argparse.Namespace) -> None:
    """One run in this process: fit (and test), then write its JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lightning_compact.cli import run_cli
    from provenance import provenance, write_json

    argv = cli_args(args.recipe, args.arm, args.seed, args.save_dir, args.name, args.extra)
    start = time.perf_counter()
    cli = run_cli(argv)
    seconds = time.perf_counter() - start
    if args.test:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    log_dir = Path(cli.trainer.logger.log_dir)
    cli.trainer.logger.save()
    series = read_metrics(log_dir / "metrics.csv")
    result = {
        "arm": args.arm, "seed": args.seed, "recipe": args.recipe, "command": "lightning-compact " + " ".join(argv),
        "fit_seconds": seconds, "log_dir": str(log_dir), "series": series,
        "final": {key: values[-1][1] for key, values in series.items()},
        "provenance": provenance("cpu"), "load_average": os.getloadavg(),
    }
    write_json(args.result, result)


def summarize(results: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """Per metric: per-seed values of both arms, means, sample std, paired ratio and difference."""
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted({s for (_, s) in by if ("compact", s) in by and ("baseline", s) in by})
    out: dict[str, Any] = {"seeds": seeds, "metrics": {}}
    for metric in metrics:
        c = [by[("compact", s)]["final"].get(metric, math.nan) for s in seeds]
        b = [by[("baseline", s)]["final"].get(metric, math.nan) for s in seeds]
        if not seeds:
            continue
        std = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out["metrics"][metric] = {
            "compact": c, "baseline": b,
            "compact_mean": statistics.fmean(c), "baseline_mean": statistics.fmean(b),
            "compact_std": std(c), "baseline_std": std(b),
            "ratio_of_means": statistics.fmean(c) / statistics.fmean(b),
            "paired_ratios": [x / y for x, y in zip(c, b)],
            "paired_differences": [x - y for x, y in zip(c, b)],
            "mean_difference": statistics.fmean(c) - statistics.fmean(b),
            "paired_ratio_ci95": t_interval([x / y for x, y in zip(c, b)]),
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    lines = []
    for metric, m in summary["metrics"].items():
        lines += [f"{metric}:", "| seed | baseline | CompAct | CompAct / baseline | CompAct − baseline |", "|---|---|---|---|---|"]
        for s, x, y, q, d in zip(summary["seeds"], m["baseline"], m["compact"], m["paired_ratios"], m["paired_differences"]):
            lines.append(f"| {s} | {x:.4f} | {y:.4f} | {q:.4f} | {d:+.4f} |")
        lines.append(
            f"| mean ± std | {m['baseline_mean']:.4f} ± {m['baseline_std']:.4f} | {m['compact_mean']:.4f} ± "
            f"{m['compact_std']:.4f} | {m['ratio_of_means']:.4f} | {m['mean_difference']:+.4f} |"
        )
        if m.get("paired_ratio_ci95"):
            lo, hi = m["paired_ratio_ci95"]
            lines.append(f"paired ratio, mean of seeds: {statistics.fmean(m['paired_ratios']):.4f}, 95% t-interval {lo:.4f} – {hi:.4f}")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(results, key=lambda r: (r["arm"], r["seed"])):
        points = r["series"].get(metric, [])
        if points:
            style = "-" if r["arm"] == "compact" else "--"
            color = f"C{r['seed'] % 10}"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=3, color=color,
                    label=f"{r['arm']} seed {r['seed']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart/pretrain_llama_tiny.yaml")
    parser.add_argument("--seeds", help="comma-separated (default: 0,1,2; with --report-only, every seed on disk)")
    parser.add_argument("--arms", default="baseline,compact", help=f"from {', '.join(ARMS)}")
    parser.add_argument("--metrics", default="val/loss", help="comma-separated metrics of the table")
    parser.add_argument("--curve", default="val/loss", help="metric plotted against the step")
    parser.add_argument("--test", action="store_true", help="run trainer.test after fit")
    parser.add_argument("--name", default="quickstart_pretrain_seeds", help="stem of the outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    parser.add_argument("--save-dir", default="lightning_logs", help="the CSV logger's save_dir")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI arguments, for every run")
    # Internal: one run in this process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    arms = args.arms.split(",")
    run_dir = args.out / args.name
    if args.seeds is None and args.report_only:
        # Every seed with a result on disk, so that a report never drops runs it did not name.
        found = {int(p.stem.rsplit("_seed", 1)[1]) for p in run_dir.glob("*_seed*.json")}
        args.seeds = ",".join(str(s) for s in sorted(found))
    seeds = [int(s) for s in (args.seeds or "0,1,2").split(",") if s]
    jobs = [(arm, seed, run_dir / f"{arm}_seed{seed}.json") for seed in seeds for arm in arms]
    for arm, seed, path in jobs:
        if path.exists() or args.report_only:
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--recipe", args.recipe, "--arm", arm,
                   "--seed", str(seed), "--result", str(path), "--save-dir", args.save_dir, "--name", args.name]
        command += ["--test"] if args.test else []
        command += ["--extra", *args.extra] if args.extra else []
        print(f"{time.strftime('%H:%M:%S')} {arm} seed {seed} ...", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        final = json.loads(path.read_text())
        print(f"{time.strftime('%H:%M:%S')} {arm} seed {seed}: "
              + ", ".join(f"{m} {final['final'].get(m, math.nan):.4f}" for m in args.metrics.split(","))
              + f" (fit {final['fit_seconds']:.0f} s)", flush=True)
    results = [json.loads(path.read_text()) for _, _, path in jobs if path.exists()]
    summary = summarize(results, args.metrics.split(","))
    summary.update({
        "recipe": args.recipe, "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores", "runs": results,
    })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=1))
    if any(args.curve in r["series"] for r in results):
        plot(results, args.curve, args.out / f"{args.name}.png", f"{args.recipe}: {args.curve}, seeds {args.seeds}")
    print(format_table(summary))


if __name__ == "__main__":
    main()
