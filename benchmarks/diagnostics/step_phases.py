"""Where a small micro-batch's host time goes: forward, backward and optimizer step, timed apart.

A plain loop over the tiny 24-block LLaMA of ``benchmarks/cpu/lightning_overhead.py`` (d = 64,
1 x 8 tokens, one thread), for the baseline (torch's AdamW) and CompAct n/4 with the defaults
in both gradient modes (``CompAct.optimizer`` in compressed mode). Each configuration runs
``--steps`` steps twice (the first pass warms up); each phase's time is the median over the
second pass's steps after the first 10. Behind RESULTS.md's "Host overhead (CPU)" paragraph on
what the host cost consists of.

    python benchmarks/diagnostics/step_phases.py --steps 80
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cpu"))
import lightning_overhead  # noqa: E402  (the shape and configurations)

from lightning_compact import CompAct  # noqa: E402
from lightning_compact.models.llama import LlamaForCausalLM  # noqa: E402

CONFIGS = ["baseline", "compressed (defaults)", "decompressed (defaults)"]


def phases(name: str, steps: int) -> tuple[float, float, float]:
    """Median milliseconds of (forward, backward, optimizer step and zero_grad) of one configuration."""
    config = lightning_overhead.CONFIGS[name]
    torch.manual_seed(0)
    model = LlamaForCausalLM(lightning_overhead.TINY)
    compact = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if config is not None:
        compact = CompAct(**config)
        compact.convert(model)
        optimizer = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    tokens = torch.randint(0, lightning_overhead.TINY.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    times: list[tuple[float, float, float]] = []
    for step in range(steps):
        if compact is not None:
            compact.step(step)
        t0 = time.perf_counter()
        loss = model(tokens, labels=tokens)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return tuple(statistics.median(t[i] for t in times[10:]) * 1e3 for i in range(3))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in CONFIGS:
        phases(name, args.steps)  # warm-up pass
        forward, backward, step = phases(name, args.steps)
        print(f"{name:26s} forward {forward:6.2f} ms  backward {backward:6.2f} ms  optimizer {step:6.2f} ms  "
              f"total {forward + backward + step:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
