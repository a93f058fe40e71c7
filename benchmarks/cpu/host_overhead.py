"""Host overhead of a CompAct step: step time and aten op count against the baseline, side by side.

One process, one model, the same batch for every configuration. Each configuration runs
whole training steps (projection schedule, forward, backward, optimizer step, zero_grad)
through :class:`lightning_compact.CompAct`, as a plain training loop would; the timed
steps of the configurations are interleaved, so load from other processes falls on all
of them alike, and the median per configuration is reported. The aten op count is the
number of ``aten::`` events the profiler records in one steady-state step (nested ops
included, the same way for every configuration).

    # The issue's tiny shape: compute is negligible, the step measures host overhead.
    python benchmarks/cpu/host_overhead.py --shape tiny --threads 1
    # The paper-prototype shape on CPU (d=512, 8 layers, vocab 32000, batch 8 x 256).
    python benchmarks/cpu/host_overhead.py --shape paper-cpu --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_compact import CompAct
from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402
from shapes import CPU_SHAPES  # noqa: E402

SHAPES = {
    # 24 blocks of width 64, batch 1 x 8.
    "tiny": (LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=24, num_attention_heads=4), 1, 8),
    "paper-cpu": CPU_SHAPES["paper-cpu"],
}

# name -> (rank, grad_mode, cache_projections)
CONFIGS: dict[str, tuple[float | None, str | None, bool | None]] = {
    "baseline": (None, None, None),
    "n/4 compressed": (0.25, "compressed", True),
    "n/4 compressed, no cache": (0.25, "compressed", False),
    "n/4 decompressed": (0.25, "decompressed", True),
    "n/4 decompressed, no cache": (0.25, "decompressed", False),
    "n/8 compressed": (0.125, "compressed", True),
    "n/8 decompressed": (0.125, "decompressed", True),
}


class Run:
    """A model, its optimizer and its CompAct driver (or none, for the baseline)."""

    def __init__(self, config: LlamaConfig, rank: float | None, grad_mode: str | None, cache: bool | None) -> None:
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config).train()
        self.compact = None
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        if rank is not None:
            self.compact = CompAct(rank, grad_mode=grad_mode, cache_projections=cache, update_proj_gap=50)
            self.compact.convert(self.model)
            opt = self.compact.optimizer(torch.optim.AdamW(self.model.parameters(), lr=1e-3))
        self.optimizer = opt
        self.steps = 0

    def step(self, tokens: torch.Tensor) -> None:
        if self.compact is not None:
            self.compact.step(self.steps)
        self.model(tokens, labels=tokens).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


def aten_ops(run: Run, tokens: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run.step(tokens)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per configuration (after 2 warm-ups)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"any of {list(CONFIGS)}")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, batch, seq = SHAPES[args.shape]
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    runs = {name: Run(config, *CONFIGS[name]) for name in args.configs}
    for run in runs.values():
        for _ in range(2):
            run.step(tokens)
    ops = {name: aten_ops(run, tokens) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run.step(tokens)
            times[name].append(time.perf_counter() - t0)
    base = "baseline" if "baseline" in runs else next(iter(runs))
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    print(f"shape={args.shape} batch={batch}x{seq} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'configuration':<28}{'step ms':>9}{'x base':>8}{'aten ops':>10}{'x base':>8}{'P cache KiB':>13}")
    for name, run in runs.items():
        cache = run.compact.projection_cache_bytes / 1024 if run.compact is not None else 0.0
        row = dict(
            configuration=name,
            step_ms=1e3 * median[name],
            time_ratio=median[name] / median[base],
            aten_ops=ops[name],
            ops_ratio=ops[name] / ops[base],
            projection_cache_KiB=cache,
        )
        rows.append(row)
        print(f"{name:<28}{row['step_ms']:>9.2f}{row['time_ratio']:>8.2f}{ops[name]:>10d}{row['ops_ratio']:>8.2f}{cache:>13.1f}")
    result = dict(
        shape=args.shape,
        batch=[batch, seq],
        repeats=args.repeats,
        rows=rows,
        provenance=provenance("cpu", argv),
    )
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
