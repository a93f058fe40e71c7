"""Tokens/s and peak memory: baseline, CompAct (n/4, n/8, both modes, orthogonal P), full checkpointing; eager and compiled.

Every configuration runs in this one process, one after the other, on the same model
shape, batch and precision, as a plain training loop (projection schedule, forward under
autocast, backward, optimizer step, zero_grad). Per configuration: ``--warmup`` steps (the
compiled ones compile there), then ``--steps`` timed steps between CUDA synchronisations;
the peak is ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps, after
the previous configuration's memory was freed. Ratios are to the baseline of the same
mode (eager or compiled).

    # One H100/H200, LLaMA-350M, bf16-mixed, 32 x 256 (the issue's setting; ~5 minutes):
    PYTHONPATH=. python benchmarks/gpu/gpu_speed.py --out gpu_speed.json
    # Quicker: eager only, or a subset
    PYTHONPATH=. python benchmarks/gpu/gpu_speed.py --no-compile --configs baseline "n/4 compressed"
    # CPU smoke test of the script itself (a tiny model; the numbers mean nothing):
    python benchmarks/gpu/gpu_speed.py --device cpu --preset tiny --steps 2 --warmup 1 --no-compile

Needs only torch and this package (no ``datasets``, no ``jsonargparse``).
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

import torch

from lightning_compact import CompAct
from lightning_compact.checkpointing import apply_checkpointing
from lightning_compact.models.llama import LLAMA_PRESETS, LlamaConfig, LlamaForCausalLM

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

PRESETS = {
    **LLAMA_PRESETS,
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4),
}

# name -> (rank, grad_mode, activation-checkpointing granularity, projection)
CONFIGS: dict[str, tuple[float | None, str | None, str | None, str]] = {
    "baseline": (None, None, None, "gaussian"),
    "n/4 compressed": (0.25, "compressed", None, "gaussian"),
    "n/8 compressed": (0.125, "compressed", None, "gaussian"),
    "n/8 orthogonal": (0.125, "compressed", None, "orthogonal"),  # beyond the paper: a QR per window
    "n/4 decompressed": (0.25, "decompressed", None, "gaussian"),
    "n/8 decompressed": (0.125, "decompressed", None, "gaussian"),
    "full checkpointing": (None, None, "blocks", "gaussian"),
}
COMPILED_BY_DEFAULT = ("baseline", "n/4 compressed", "n/8 compressed", "n/8 orthogonal", "full checkpointing")


def build(config: LlamaConfig, name: str, device: torch.device, compiled: bool):
    rank, grad_mode, granularity, projection = CONFIGS[name]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.train()
    compact = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if rank is not None:
        compact = CompAct(rank, grad_mode=grad_mode, projection=projection, cache_projections=True, update_proj_gap=50)
        compact.convert(model)
        compact.set_projection_dtype(torch.bfloat16 if device.type == "cuda" else None)
        optimizer = compact.optimizer(optimizer)
    if granularity is not None:
        apply_checkpointing(model, granularity)
    forward = torch.compile(model, fullgraph=True) if compiled else model
    return model, forward, optimizer, compact


def run(config, name, device, compiled, batch, seq, warmup, steps) -> dict:
    model, forward, optimizer, compact = build(config, name, device, compiled)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> None:
        if compact is not None:
            compact.step(i)
        with autocast:
            loss = forward(tokens, labels=tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    row = dict(
        configuration=name,
        compiled=compiled,
        step_ms=1e3 * elapsed / steps,
        tokens_per_s=batch * seq * steps / elapsed,
        warmup_s=warm_s,
        peak_MiB=(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        model_and_state_MiB=(base_alloc / 2**20) if cuda else None,
        projection_cache_MiB=(compact.projection_cache_bytes / 2**20) if compact is not None else 0.0,
    )
    return row  # the model, optimizer and batch go with this frame; main() frees the memory


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama_350m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"any of {list(CONFIGS)}")
    parser.add_argument("--compiled", nargs="*", default=list(COMPILED_BY_DEFAULT), help="configurations also run compiled")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = dataclasses.replace(PRESETS[args.preset], max_position_embeddings=max(args.seq, 256))
    plan = [(name, False) for name in args.configs]
    if not args.no_compile:
        plan += [(name, True) for name in args.configs if name in args.compiled]
    rows = []
    for name, compiled in plan:
        try:
            rows.append(run(config, name, device, compiled, args.batch, args.seq, args.warmup, args.steps))
        except Exception as err:  # one failing configuration must not lose the others' figures
            traceback.print_exc()
            rows.append(dict(configuration=name, compiled=compiled, error=repr(err)))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.preset} batch {args.batch}x{args.seq} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"{'configuration':<22}{'mode':>9}{'tokens/s':>11}{'x base':>8}{'peak MiB':>10}{'x base':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['configuration']:<22}{'compiled' if row['compiled'] else 'eager':>9}  failed: {row['error'][:60]}")
            continue
        base = next((r for r in rows if r["configuration"] == "baseline" and r["compiled"] == row["compiled"] and "error" not in r), None)
        tok_ratio = row["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        peak = row["peak_MiB"]
        peak_ratio = peak / base["peak_MiB"] if base and peak and base["peak_MiB"] else float("nan")
        print(
            f"{row['configuration']:<22}{'compiled' if row['compiled'] else 'eager':>9}{row['tokens_per_s']:>11.0f}"
            f"{tok_ratio:>8.2f}{(peak or 0):>10.0f}{peak_ratio:>8.2f}"
        )
    result = dict(
        preset=args.preset,
        batch=[args.batch, args.seq],
        rows=rows,
        provenance=provenance(device, argv),
    )
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
