"""gpu_quality.py's training: one run of one arm and seed (``train_run``), and what it is built from.

The model's config, the fixed validation windows, the next-token loss, the evaluation and
the schedule. Needs only torch, lightning and this package (the GPU machine has no
``datasets`` or ``jsonargparse``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

ARMS = ("baseline", "compact")
# Fixed: the evaluation windows do not depend on any run's seed.
WARMUP_RATIO, MIN_LR_RATIO = 0.1, 0.1


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
