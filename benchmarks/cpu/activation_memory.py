"""Saved-activation bytes and step time: baseline vs CompAct (r = n/4, n/8; per layer or shared), side by side.

One process, one model shape, the same batch for every configuration; step times are
medians over interleaved repetitions, so the ratios compare like with like ("paired":
the median of each round's ratio; ``timing.py``).

    python benchmarks/cpu/activation_memory.py                  # small LLaMA, ~1 minute on 2 cores
    python benchmarks/cpu/activation_memory.py --preset paper-cpu   # d=512, 8 layers, vocab 32000, b=8, l=256
    python benchmarks/cpu/activation_memory.py --out results.json

"shared" is ``share_projection=True``: one projection (and one stored ``x·P``) for
q/k/v and one for gate/up. Saved activations are the unique storages kept for the backward pass in one step
(:class:`lightning_compact.memory.SavedActivationTracker`); parameters excluded.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

from lightning_compact import CompActConfig, convert_to_compact
from lightning_compact.memory import SavedActivationTracker
from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402
from shapes import CPU_SHAPES  # noqa: E402
from timing import interleaved_times, median, paired_ratio  # noqa: E402

SHAPES = {
    "small": CPU_SHAPES["tiny"],  # named before the shapes were shared
    "paper-cpu": CPU_SHAPES["paper-cpu"],
}
MIB = 2**20


def build(config: LlamaConfig, rank: float | None, share: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if rank is not None:
        convert_to_compact(model, config=CompActConfig(rank=rank, share_projection=share))
    return model.train()


def step(model: LlamaForCausalLM, tokens: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    model(tokens, labels=tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(SHAPES), default="small")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--quick", action="store_true", help="2 timed steps: a smoke run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats

    config, batch, seq = SHAPES[args.preset]
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    configs = {
        "baseline": (None, False),
        "compact r=n/4": (0.25, False),
        "compact r=n/8": (0.125, False),
        "shared r=n/4": (0.25, True),
        "shared r=n/8": (0.125, True),
    }
    models = {name: build(config, rank, share) for name, (rank, share) in configs.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}

    saved = {}
    for name, model in models.items():
        with SavedActivationTracker(exclude=[model]) as tracker:
            step(model, tokens, optims[name])
        saved[name] = tracker.result()

    times = interleaved_times({name: partial(step, model, tokens, optims[name]) for name, model in models.items()}, repeats)

    base_bytes = saved["baseline"].bytes
    base_time = median(times["baseline"])
    rows = []
    for name in models:
        t = median(times[name])
        rows.append(
            {
                "config": name,
                "saved_activations_MiB": saved[name].bytes / MIB,
                "saved_ratio": saved[name].bytes / base_bytes,
                "step_s": t,
                "step_ratio": t / base_time,
                "step_ratio_paired": paired_ratio(times[name], times["baseline"]),
                "step_times_s": times[name],
            }
        )
    linear_inputs = saved["compact r=n/4"].replaced_input_bytes
    result = {
        "preset": args.preset,
        "shape": {"batch": batch, "seq": seq, **config.__dict__},
        "rows": rows,
        "linear_input_share_of_baseline": linear_inputs / base_bytes,
        "repeats": repeats,
        "provenance": provenance("cpu", argv),
    }

    print(f"LLaMA {args.preset}: d={config.hidden_size}, layers={config.num_hidden_layers}, ffn={config.intermediate_size}, "
          f"vocab={config.vocab_size}, batch={batch}, seq={seq}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<16}{'saved for backward':>20}{'ratio':>8}{'step (median)':>16}{'ratio':>8}{'paired':>8}")
    for r in rows:
        print(f"{r['config']:<16}{r['saved_activations_MiB']:>16.1f} MiB{r['saved_ratio']:>8.3f}{r['step_s']:>14.3f} s{r['step_ratio']:>8.3f}{r['step_ratio_paired']:>8.3f}")
    print(f"compressed linear inputs (unique storages) are {100 * result['linear_input_share_of_baseline']:.1f}% of the baseline's saved activations")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
