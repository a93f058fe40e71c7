"""16-mixed with a GradScaler in compressed mode against bf16-mixed, and which attention outputs SDPA keeps, on a GPU.

Issue 22's GPU check (CPU tests cover the unscale and the skipped step only). One process,
this project's LLaMA at the quickstart's size (d=256, 4 layers, byte vocabulary), trained on
the bytes of this repository's own source and docs (real text; the device machine has no
``datasets``), the same init and batches for every arm, through the ``CompAct`` controller in
a plain loop:

* fp32 baseline (AdamW), bf16-mixed CompAct n/4 (compressed), 16-mixed CompAct n/4
  (compressed, ``torch.amp.GradScaler``), 16-mixed CompAct n/4 decompressed;
* in the 16-mixed compressed arm the loss is made inf at ``--overflow-at``: that step must be
  skipped (weights unchanged, the scale halved);
* with ``--seeds K`` the two compressed mixed-precision arms run again for seeds 1..K-1 (another
  init and another batch order each, the same for both arms): "within noise" is then judged
  against the seed-to-seed spread, on the paired per-seed differences.

Then, per model family, whether a converted attention output's input is SDPA's kept output on
this device (``functional.input_kept_elsewhere``). Results as JSON; ``--device cpu`` runs the
same code on a CPU (fp16 autocast), for a smoke test.

    python benchmarks/gpu/gpu_precision.py --steps 300 --seeds 3 --out gpu_out/precision.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402
from stats import t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def corpus_bytes(limit: int) -> torch.Tensor:
    """This repository's Python and Markdown files as one byte stream (int64), at most ``limit`` bytes."""
    data = bytearray()
    for path in sorted(list(ROOT.glob("lightning_compact/**/*.py")) + list(ROOT.glob("docs/**/*.md"))):
        data += path.read_bytes() + b"\n"
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def batches(stream: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq - 1, (steps, batch), generator=g)
    return stream[starts.unsqueeze(-1) + torch.arange(seq)]


def train(arm: str, base: torch.nn.Module, data: torch.Tensor, device: torch.device, lr: float,
          overflow_at: int | None) -> dict[str, Any]:
    from lightning_compact import CompAct

    model = copy.deepcopy(base).to(device)
    compact = None
    if arm != "fp32 baseline":
        compact = CompAct(rank=0.25, grad_mode="decompressed" if "decompressed" in arm else "compressed",
                          update_proj_gap=10)
        compact.convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if compact is not None:
        opt = compact.optimizer(opt)
    dtype = torch.float16 if arm.startswith("16-mixed") else torch.bfloat16 if arm.startswith("bf16") else None
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    if compact is not None:
        compact.set_projection_dtype(dtype)
    losses, skipped = [], None
    for step, tokens in enumerate(data):
        tokens = tokens.to(device)
        if compact is not None:
            compact.step(step)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(tokens, labels=tokens)
        losses.append(float(loss))
        if scaler is not None and step == overflow_at:
            loss = loss * math.inf
            before = [p.detach().clone() for p in model.parameters()]
            scale = scaler.get_scale()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        if scaler is not None and step == overflow_at:
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            skipped = {"weights_unchanged": unchanged, "scale_before": scale, "scale_after": scaler.get_scale()}
    tail = losses[-max(1, len(losses) // 10):]
    return {"arm": arm, "losses": losses, "final_loss_mean_last_10pct": sum(tail) / len(tail), "overflow_step": skipped,
            "finite": all(math.isfinite(x) for i, x in enumerate(losses) if i != overflow_at)}


def compare_precisions(final: dict[tuple[int, str], float], seeds: int) -> dict[str, Any] | None:
    """16-mixed against bf16-mixed (compressed) over seeds: paired differences of the final loss, and the noise.

    The noise is the seed-to-seed standard deviation of bf16-mixed's final loss (init and batch
    order); the difference is 16-mixed minus bf16-mixed on the same seed, with a 95% t-interval.
    """
    if seeds < 2:
        return None
    bf16 = [final[(s, "bf16-mixed compressed")] for s in range(seeds)]
    fp16 = [final[(s, "16-mixed compressed")] for s in range(seeds)]
    diffs = [a - b for a, b in zip(fp16, bf16)]
    return {
        "bf16_final": bf16, "fp16_final": fp16, "fp16_minus_bf16": diffs, "mean_difference": statistics.fmean(diffs),
        "t95_interval": t_interval(diffs), "bf16_seed_std": statistics.stdev(bf16),
        "worst_seed_difference": max(diffs, key=abs),
    }


def kept_attention_outputs(device: torch.device) -> dict[str, Any]:
    """For each family: does a converted attention output read SDPA's kept output on this device?"""
    from lightning_compact import CompActConfig, convert_to_compact
    from lightning_compact.functional import input_kept_elsewhere
    from lightning_compact.layers import DEFAULT_EXCLUDED_MODULES, matches_any

    out: dict[str, Any] = {}
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    builders = {
        "llama sdpa": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, attn_implementation="sdpa")), "o_proj"),
        "gpt2 sdpa, attn_pdrop 0.1": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=128, n_layer=1, n_head=2, n_positions=64, attn_implementation="sdpa")), "attn.c_proj"),
        "gpt2 sdpa, attn_pdrop 0": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=128, n_layer=1, n_head=2, n_positions=64, attn_pdrop=0.0,
            attn_implementation="sdpa")), "attn.c_proj"),
    }
    for name, (build, pattern) in builders.items():
        model = build().to(device=device, dtype=dtype).train()
        others = [p for p in DEFAULT_EXCLUDED_MODULES if p != pattern]
        convert_to_compact(model, config=CompActConfig(rank=0.25, default_exclusions=False, exclude_modules=others))
        seen: list[bool] = []
        for n, m in model.named_modules():
            if matches_any(n, [pattern]) and hasattr(m, "rank"):
                m.register_forward_pre_hook(lambda _m, args: seen.append(input_kept_elsewhere(args[0])))
        tokens = torch.randint(0, 64, (2, 32), device=device)
        model(input_ids=tokens, labels=tokens).loss.backward()
        out[name] = {"pattern": pattern, "kept": seen}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--overflow-at", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the paired bf16-mixed / 16-mixed compressed arms")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=args.seq)
    stream = corpus_bytes(4_000_000)
    arms = ["fp32 baseline", "bf16-mixed compressed", "16-mixed compressed", "16-mixed decompressed"]
    paired = ["bf16-mixed compressed", "16-mixed compressed"]
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = LlamaForCausalLM(config)
        data = batches(stream, args.steps, args.batch, args.seq, seed=seed)
        for arm in arms if seed == 0 else paired:
            row = train(arm, base, data, device, args.lr, args.overflow_at if arm == "16-mixed compressed" else None)
            row["seed"] = seed
            rows.append(row)
            print(f"seed {seed}, {arm}: final loss (last 10% of steps) {row['final_loss_mean_last_10pct']:.4f}, "
                  f"finite {row['finite']}, overflow step {row['overflow_step']}", flush=True)
    final = {(r["seed"], r["arm"]): r["final_loss_mean_last_10pct"] for r in rows}
    ratio = final[(0, "16-mixed compressed")] / final[(0, "bf16-mixed compressed")]
    print(f"16-mixed / bf16-mixed (compressed), final loss, seed 0: {ratio:.4f}")
    comparison = compare_precisions(final, args.seeds)
    if comparison is not None:
        print(json.dumps(comparison))
    kept = kept_attention_outputs(device)
    print(json.dumps(kept))
    if args.out is not None:
        write_json(args.out, {"provenance": provenance(device, argv), "settings": {k: str(v) for k, v in vars(args).items()},
                              "rows": rows, "fp16_over_bf16": ratio, "fp16_vs_bf16_over_seeds": comparison,
                              "kept_attention_outputs": kept})
    return 0


if __name__ == "__main__":
    sys.exit(main())
