"""A stacked bar chart of memory breakdowns (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning_compact.memory.breakdown import _UNITS, CATEGORIES, MemoryBreakdown

__all__ = ["plot_breakdowns"]

_LABELS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "temporaries": "temporaries",
    "other": "other",
}


def plot_breakdowns(rows: Mapping[str, MemoryBreakdown], path: str | Path, *, title: str = "", units: str = "GiB") -> Path:
    """Write one horizontal stacked bar per breakdown (categories at the peak) to ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # a no-op if a backend is already in use
    import matplotlib.pyplot as plt

    scale = _UNITS[units]
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(labels) + 1.8))
    left = [0.0] * len(labels)
    for name in CATEGORIES:
        widths = [getattr(rows[label], name) / scale for label in labels]
        ax.barh(labels, widths, left=left, label=_LABELS[name])
        left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()  # first row on top, as in the table
    ax.set_xlabel(f"peak memory of one training step ({units})")
    ax.set_title(title, fontsize=9)
    # Below the axis, so it never hides a bar or its total.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(labels)), ncol=len(CATEGORIES), fontsize=8, frameon=False)
    ax.set_xlim(0, max(left, default=1) * 1.12 or 1)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
