"""gpu_quality.py's report: the paired perplexity ratios CompAct / baseline, the Markdown table, the plot."""

from __future__ import annotations

import statistics
import time
from typing import Any

# The paper's Table 2, LLaMA-60M on C4 (t5-base tokenizer, 10k steps of 512 x 256, T = 50, alpha = 0.25, lr 0.01).
PAPER_60M = {"baseline_ppl": 34.06, "compact_ppl": 34.41, "ratio": round(34.41 / 34.06, 4), "gap_pct": 1.03}


def paired_ratios(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per seed, ``key`` of CompAct / baseline, over seeds where both finished; their mean and spread."""
    by_seed: dict[int, dict[str, float]] = {}
    for run in runs:
        if run.get("status") == "finished":
            by_seed.setdefault(run["seed"], {})[run["arm"]] = run[key]
    per_seed = {str(s): arms["compact"] / arms["baseline"] for s, arms in sorted(by_seed.items())
                if "compact" in arms and "baseline" in arms}
    values = list(per_seed.values())
    return {
        "per_seed": per_seed,
        "mean": statistics.fmean(values) if values else None,
        "stdev": statistics.stdev(values) if len(values) > 1 else None,
        "mean_gap_pct": 100 * (statistics.fmean(values) - 1) if values else None,
        "n_seeds": len(values),
    }


def markdown_table(result: dict[str, Any]) -> str:
    rows = ["| seed | arm | status | steps | final val loss | final ppl | best ppl (step) | tokens/s | peak MiB | wall s |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        if "final_val_loss" not in r:
            rows.append(f"| {r['seed']} | {r['arm']} | {r['status']} | - | - | - | - | - | - | - |")
            continue
        rate = r.get("tokens_per_s_after_step_10") or r.get("tokens_per_s")  # past the warm-up when there is one
        tps = f"{rate:,.0f}" if rate else "-"
        peak = f"{r['peak_allocated_MiB']:,.0f}" if r.get("peak_allocated_MiB") is not None else "-"
        rows.append(
            f"| {r['seed']} | {r['arm']} | {r['status']} | {r['steps_done']} | {r['final_val_loss']:.4f} | "
            f"{r['final_val_ppl']:.2f} | {r['best_val_ppl']:.2f} ({r['best_val_step']}) | {tps} | {peak} | "
            f"{r['wall_seconds']:.0f} |"
        )
    lines = ["\n".join(rows), ""]
    for label, key in (("final", "ratio_final_ppl"), ("best", "ratio_best_ppl")):
        ratio = result[key]
        if ratio["mean"] is None:
            lines.append(f"Perplexity ratio CompAct / baseline ({label}): no seed with both arms finished.")
            continue
        per_seed = ", ".join(f"seed {s}: {v:.4f}" for s, v in ratio["per_seed"].items())
        spread = f" ± {ratio['stdev']:.4f}" if ratio["stdev"] is not None else ""
        lines.append(f"Perplexity ratio CompAct / baseline ({label}): {ratio['mean']:.4f}{spread} "
                     f"({ratio['mean_gap_pct']:+.2f}%; {per_seed})")
    lines.append(f"Paper (Table 2, LLaMA-60M on C4): {PAPER_60M['compact_ppl']} / {PAPER_60M['baseline_ppl']} = "
                 f"{PAPER_60M['ratio']} (+{PAPER_60M['gap_pct']}%)")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> bool:
    """Validation and training loss curves of every run; ``False`` (no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in result["runs"]:
        if not r.get("val_curve"):
            continue
        style = "-" if r["arm"] == "baseline" else "--"
        label = f"{r['arm']} seed {r['seed']}"
        ax_val.plot([p["step"] for p in r["val_curve"]], [p["loss"] for p in r["val_curve"]], style, marker=".", label=label)
        ax_train.plot([p["step"] for p in r["train_curve"]], [p["mean_since_last"] for p in r["train_curve"]], style,
                      label=label, linewidth=0.8)
    ax_val.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title="validation")
    ax_train.set(xlabel="optimizer step", ylabel="training loss (mean over 10 steps)", title="training")
    for ax in (ax_val, ax_train):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    config = result["config"]
    fig.suptitle(f"{config['preset']} on KJV (WordPiece): baseline vs CompAct r={config['rank']} compressed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summarize(result: dict[str, Any], t0: float) -> None:
    """The paired ratios over the runs so far, and the time since ``t0``, into ``result``."""
    result["ratio_final_ppl"] = paired_ratios(result["runs"], "final_val_ppl")
    result["ratio_best_ppl"] = paired_ratios(result["runs"], "best_val_ppl")
    result["total_seconds"] = time.perf_counter() - t0
