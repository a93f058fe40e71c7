"""Saved-activation bytes and step time: baseline vs lean activations (and with CompAct), side by side.

Lean = :func:`lightning_compact.lean.apply_lean` (RMSNorm and SwiGLU saving only their
inputs, chunked lm_head + cross-entropy). One process; per shape the same batch for
every configuration; step times are medians over interleaved repetitions (forward,
backward, AdamW step), so ratios compare like with like ("paired": the median of each
round's ratio; ``timing.py``).

    python benchmarks/cpu/lean_memory.py                        # tiny and paper-cpu, fp32 and bf16 autocast
    python benchmarks/cpu/lean_memory.py --shapes tiny --quick  # a smoke run
    python benchmarks/cpu/lean_memory.py --precisions bf16 --repeats 0   # saved bytes only (bf16 is slow on CPU)
    python benchmarks/cpu/lean_memory.py --out benchmarks/results/lean_memory_cpu.json

Saved activations: unique storages kept for backward in one step
(:class:`lightning_compact.memory.SavedActivationTracker`), parameters and their
autocast copies excluded.
"""

from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from lightning_compact import CompActConfig, convert_to_compact
from lightning_compact.lean import apply_lean
from lightning_compact.memory import SavedActivationTracker
from lightning_compact.models.llama import LlamaForCausalLM

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402
from shapes import CPU_SHAPES  # noqa: E402
from timing import interleaved_times, median, paired_ratio  # noqa: E402

SHAPES = {name: CPU_SHAPES[name] for name in ("tiny", "paper-cpu")}
ALL = {"norms": True, "mlp": True, "loss": True}
CONFIGS = {  # name: (apply_lean options or None, CompAct rank)
    "baseline": (None, None),
    "lean": (ALL, None),
    "compact r=n/8": (None, 0.125),
    "lean + compact r=n/8": (ALL, 0.125),
}
BREAKDOWN = {f"lean {part} only": ({k: k == part for k in ALL}, None) for part in ALL}
MIB = 2**20


def build(base: LlamaForCausalLM, lean: dict[str, bool] | None, rank: float | None) -> LlamaForCausalLM:
    model = copy.deepcopy(base)
    if rank is not None:
        convert_to_compact(model, config=CompActConfig(rank=rank))
    if lean is not None:
        apply_lean(model, **lean)
    return model.train()


def step(model: LlamaForCausalLM, tokens: torch.Tensor, optimizer: torch.optim.Optimizer, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        loss = model(tokens, labels=tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_shape(shape: str, bf16: bool, repeats: int, breakdown: bool = False) -> dict:
    config, batch, seq = SHAPES[shape]
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    configs = {**CONFIGS, **(BREAKDOWN if breakdown else {})}
    models = {name: build(base, lean, rank) for name, (lean, rank) in configs.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    saved, losses = {}, {}
    for name, model in models.items():
        with SavedActivationTracker(exclude=[model]) as tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = model(tokens, labels=tokens)
        loss.backward()
        model.zero_grad(set_to_none=True)
        saved[name], losses[name] = tracker.result().bytes, float(loss.detach())
    times = interleaved_times({name: partial(step, model, tokens, optims[name], bf16) for name, model in models.items()},
                              repeats)
    base_bytes, base_time = saved["baseline"], median(times["baseline"])
    rows = [
        {
            "config": name,
            "saved_activations_MiB": saved[name] / MIB,
            "saved_ratio": saved[name] / base_bytes,
            "step_s": median(times[name]),
            "step_ratio": median(times[name]) / base_time,
            "step_ratio_paired": paired_ratio(times[name], times["baseline"]),
            "step_times_s": times[name],
            "first_loss": losses[name],
        }
        for name in models
    ]
    precision = "bf16 autocast" if bf16 else "fp32"
    print(f"\nLLaMA {shape}: d={config.hidden_size}, layers={config.num_hidden_layers}, ffn={config.intermediate_size}, "
          f"vocab={config.vocab_size}, batch={batch}, seq={seq}, {precision}")
    print(f"{'config':<22}{'saved for backward':>20}{'ratio':>8}{'step (median)':>16}{'ratio':>8}{'paired':>8}{'loss':>9}")
    for r in rows:
        print(f"{r['config']:<22}{r['saved_activations_MiB']:>16.1f} MiB{r['saved_ratio']:>8.3f}"
              f"{r['step_s']:>14.3f} s{r['step_ratio']:>8.3f}{r['step_ratio_paired']:>8.3f}{r['first_loss']:>9.4f}")
    return {"shape": shape, "precision": precision, "batch": batch, "seq": seq, "config": config.__dict__, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "paper-cpu"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (after 1 warm-up); 0: saved bytes only")
    parser.add_argument("--quick", action="store_true", help="1 timed step: a smoke run")
    parser.add_argument("--breakdown", action="store_true", help="also each lean option alone (norms, mlp, loss)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    info = provenance("cpu", argv)
    print(f"torch {info['torch']}, lightning {info['lightning']}, {info['device']}")
    results = [run_shape(s, p == "bf16", repeats, args.breakdown) for s in args.shapes for p in args.precisions]
    out = {"runs": results, "repeats": repeats, "provenance": info}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
