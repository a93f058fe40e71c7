"""The 95% Student-t interval of a mean over seeds, for the benchmarks that pair arms per seed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# t(0.975, df) for df = 1..30, to three decimals: where scipy is missing (the device machine).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (scipy's, else the table up to df 30)."""
    try:
        from scipy.stats import t
    except ImportError:
        if not 1 <= df <= len(_T975):
            raise ValueError(f"t(0.975, {df}) without scipy: the table stops at df {len(_T975)}; pip install scipy")
        return _T975[df - 1]
    return float(t.ppf(0.975, df))


def t_interval(values: Sequence[float]) -> list[float] | None:
    """Two-sided 95% Student-t interval of the mean of ``values`` (e.g. per-seed paired differences); None below 2."""
    if len(values) < 2:
        return None
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.fmean(values)
    return [mean - half, mean + half]
