"""Step times of several configurations measured side by side, in one process.

One warm-up step each, then rounds that run every configuration once, so that a
drift of the machine's speed (other jobs, clocks) falls on every configuration alike.
Two ratios to a reference: of the medians, and the median over rounds of each round's
ratio (paired: robust to a slow round, which slows every configuration of that round).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def interleaved_times(steps: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each step, round by round (no warm-up either when ``repeats`` is 0)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values() if repeats else ():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def median(times: Sequence[float]) -> float:
    """The median, NaN for no times."""
    return statistics.median(times) if times else float("nan")


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / reference[i]`` (NaN for no times)."""
    return median([t / r for t, r in zip(times, reference, strict=True)])
