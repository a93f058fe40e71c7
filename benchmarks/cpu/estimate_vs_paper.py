"""The estimator beside the paper's Table 2: LLaMA-350M and 1B, batch 128, seq 256, bf16.

The paper (arXiv 2410.15352, Table 2) reports the peak GPU memory of pretraining at
these sizes; its setting, as reproduced in docs/PAPER.md, is micro-batch 128 of 256
tokens in pure bf16 (weights, gradients and Adam moments in bf16), vocabulary 32000.
This script estimates the same steps on fake tensors (no GPU) with
``device_type="cuda"``, for the baseline and CompAct at n/2, n/4, n/8 in both gradient
modes, and prints both side by side in GB (10^9 bytes, the paper's unit).

Absolute peaks differ by what the two models do outside the layers CompAct touches
(our RMSNorm computes in float32; the loss path holds different logits-sized
buffers), so compare the *savings*: each row's drop from the first row the paper
reports for that size (full rank for 350M; r = n/2 for 1B, whose full-rank run did
not fit in 81 GB).

    python benchmarks/cpu/estimate_vs_paper.py --out estimate_vs_paper.json
    python benchmarks/cpu/estimate_vs_paper.py --beyond --out estimate_beyond_paper.json

``--beyond`` estimates, at the same setting, what this project adds past the paper's
rows: lean activations (``LeanActivations``: norms, MLP activation and loss saving only
their inputs), lean + CompAct, full activation checkpointing of each decoder layer
(``checkpointing="blocks"``, the usual memory lever) and lean + CompAct inside it, and
prints each as a ratio of the same estimator's baseline beside the paper's ratios
(CompAct / full rank; none for 1B, whose full-rank run did not fit in 81 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lightning_compact.memory.estimator import Variant, estimate
from lightning_compact.memory.recipe import RunShape

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

GB = 10**9
# Table 2 of the paper, peak memory in GB (None: did not fit in 81 GB).
PAPER_TABLE2: dict[str, dict[str, float | None]] = {
    "llama_350m": {"baseline": 39.97, "n/2": 37.94, "n/4": 34.71, "n/8": 33.03},
    "llama_1b": {"baseline": None, "n/2": 72.82, "n/4": 65.57, "n/8": 61.88},
}
RANKS = {"n/2": 0.5, "n/4": 0.25, "n/8": 0.125}


def paper_shape(model: str) -> RunShape:
    return RunShape(model=model, config_overrides={"vocab_size": 32000}, batch_size=128, seq_len=256,
                    precision="bf16-true", device_type="cuda")


def run(model: str) -> list[dict]:
    shape = paper_shape(model)
    paper = PAPER_TABLE2[model]
    rows = []
    for key in ("baseline", *RANKS):
        ours = {}
        modes = ("baseline",) if key == "baseline" else ("compressed", "decompressed")
        for mode in modes:
            variant = Variant() if key == "baseline" else Variant(RANKS[key], mode)
            result = estimate(shape, variant)
            ours[mode] = result.peak.total
            print(f"  {model} {variant.label}: {result.peak.total / GB:.2f} GB ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
        rows.append({"model": model, "row": key, "paper_GB": paper[key], "ours_bytes": ours})
    return rows


# Past the paper's rows: (label, Variant); the paper-faithful compressed mode throughout.
LEAN = ("norms", "mlp", "loss")
BEYOND: tuple[tuple[str, Variant], ...] = (
    ("baseline", Variant()),
    ("n/4", Variant(0.25)),
    ("n/8", Variant(0.125)),
    ("lean", Variant(lean=LEAN)),
    ("lean + n/4", Variant(0.25, lean=LEAN)),
    ("lean + n/8", Variant(0.125, lean=LEAN)),
    ("checkpoint blocks", Variant(checkpointing="blocks")),
    ("lean + n/4 + checkpoint blocks", Variant(0.25, lean=LEAN, checkpointing="blocks")),
)


def run_beyond(model: str) -> list[dict]:
    shape = paper_shape(model)
    rows = []
    for key, variant in BEYOND:
        result = estimate(shape, variant)
        print(f"  {model} {variant.label}: {result.peak.total / GB:.2f} GB ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
        rows.append({"model": model, "row": key, "variant": variant.label, "paper_GB": PAPER_TABLE2[model].get(key),
                     "ours_bytes": result.peak.total, "recomputes_matmuls": variant.checkpointing == "blocks"})
    return rows


def _aligned(lines: list[list[str]]) -> str:
    """Rows of cells as right-aligned columns."""
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines)


def render_beyond(rows: list[dict]) -> str:
    header = ["model", "row", "paper GB", "paper ratio", "ours GB", "ours ratio", "recomputes matmuls"]
    lines = [header]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        paper_ref = mine[0]["paper_GB"]  # the paper's full-rank run (None for 1B: it did not fit)
        ours_ref = mine[0]["ours_bytes"]  # the baseline
        for r in mine:
            paper = r["paper_GB"]
            lines.append([model, r["row"], f"{paper:.2f}" if paper else ("OOM" if r["row"] == "baseline" else "-"),
                          f"{paper / paper_ref:.3f}" if paper and paper_ref else "-", f"{r['ours_bytes'] / GB:.2f}",
                          f"{r['ours_bytes'] / ours_ref:.3f}", "yes" if r["recomputes_matmuls"] else "no"])
    return _aligned(lines)


def render(rows: list[dict]) -> str:
    header = ["model", "row", "paper GB", "paper drop", "ours compressed", "drop", "ours decompress", "drop"]
    lines = [header]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ref = next(r for r in mine if r["paper_GB"] is not None)  # the first row the paper has

        def ours(row: dict, mode: str) -> float:
            # Results written before 0.2 spell the mode "decompress" (CHANGELOG, Breaking).
            found = row["ours_bytes"]
            old_name = {"decompressed": "decompress"}.get(mode, mode)
            return found.get(mode, found.get(old_name, found.get("baseline"))) / GB

        for r in mine:
            paper = r["paper_GB"]
            cells = [model, r["row"], f"{paper:.2f}" if paper is not None else "OOM", f"{ref['paper_GB'] - paper:.2f}" if paper else "-"]
            for mode in ("compressed", "decompressed"):
                cells += [f"{ours(r, mode):.2f}", f"{ours(ref, mode) - ours(r, mode):.2f}"]
            lines.append(cells)
    return _aligned(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PAPER_TABLE2), choices=list(PAPER_TABLE2))
    parser.add_argument("--out", type=Path, help="JSON results")
    parser.add_argument("--from-json", type=Path, help="print the table of an earlier --out instead of estimating")
    parser.add_argument("--beyond", action="store_true", help="lean activations and checkpointing beside the paper's rows")
    args = parser.parse_args(argv)
    table = render_beyond if args.beyond else render
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        print((render_beyond if data.get("beyond") else render)(data["rows"]))
        return 0
    start = time.perf_counter()
    rows = [row for model in args.models for row in (run_beyond if args.beyond else run)(model)]
    print("Peak memory of one pretraining step, GB: paper's Table 2 vs this estimator (batch 128, seq 256, bf16, CUDA model)")
    if args.beyond:
        print("ratios against each side's full-rank baseline (the paper has none for 1B: it did not fit in 81 GB)\n")
    else:
        print("'drop' = saving against the first row the paper reports for that size (350M: baseline; 1B: n/2)\n")
    print(table(rows))
    info = {"provenance": provenance("cpu", argv), "seconds": time.perf_counter() - start}
    print(f"\n{info}")
    if args.out:
        write_json(args.out, {"info": info, "beyond": args.beyond, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
