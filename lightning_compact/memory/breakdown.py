"""``MemoryBreakdown``: the bytes of one training step, split by what they hold."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

__all__ = ["CATEGORIES", "MemoryBreakdown", "StepMemory", "format_bytes", "format_table"]

# Field name -> column title, in the order tables and charts show them.
CATEGORIES: dict[str, str] = {
    "parameters": "params",
    "gradients": "grads",
    "optimizer_states": "optim",
    "activations": "activ",
    "temporaries": "temp",
    "other": "other",
}

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def format_bytes(n: float, units: str = "GiB") -> str:
    """``n`` bytes in ``units`` (``B``, ``KiB``, ``MiB``, ``GiB``, ``KB``, ``MB``, ``GB``), two decimals."""
    if units not in _UNITS:
        raise ValueError(f"units must be one of {', '.join(_UNITS)}, got {units!r}")
    return f"{n / _UNITS[units]:.2f}"


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes alive on one device at one moment, by category (storages counted once).

    Attributes:
        parameters: model parameters.
        gradients: ``.grad`` of parameters and CompAct's compressed gradients.
        optimizer_states: tensors held by the optimizer (Adam moments, step counters),
            and whatever the optimizer allocates inside ``step``.
        activations: tensors made in the forward pass and still alive: what autograd
            saved for the backward, plus the forward's outputs (logits, loss).
        temporaries: tensors made in the backward that are not gradients
            (gradients of activations, workspaces).
        other: buffers, the batch, and other tensors made outside the step.
    """

    parameters: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    temporaries: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        """Sum of the categories."""
        return sum(getattr(self, name) for name in CATEGORIES)

    def as_dict(self, units: str = "B") -> dict[str, float]:
        """Categories and ``total`` in ``units`` (bytes by default)."""
        scale = _UNITS[units]
        values = {name: getattr(self, name) / scale for name in CATEGORIES}
        values["total"] = self.total / scale
        return values

    def table(self, units: str = "GiB", title: str = "") -> str:
        """A two-column table: one row per category, then the total."""
        return format_table({title or "bytes": self}, units=units, transpose=True)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """What one training step needed.

    Attributes:
        peak: the categories at the moment the total was largest; ``peak.total`` is the
            step's peak.
        largest: each category at its own largest over the step (their sum is not a
            peak: categories peak at different moments). Gradients, for instance, are
            largest at the end of the backward, while the total usually peaks at its start.
        device: the device the figures are for.
    """

    peak: MemoryBreakdown
    largest: MemoryBreakdown
    device: str = "cpu"


def format_table(rows: Mapping[str, MemoryBreakdown], units: str = "GiB", *, baseline: str | None = None, transpose: bool = False) -> str:
    """A text table of breakdowns, one row each (``transpose``: one column each).

    Args:
        rows: label -> breakdown.
        units: unit of every cell.
        baseline: a label of ``rows``; adds a column with each total's change against it.
        transpose: categories as rows instead of columns.
    """
    header = ["", *CATEGORIES.values(), "peak"]
    body: list[list[str]] = []
    for label, b in rows.items():
        cells = [label, *(format_bytes(getattr(b, name), units) for name in CATEGORIES), format_bytes(b.total, units)]
        body.append(cells)
    if baseline is not None:
        base = rows[baseline].total
        header.append("vs base")
        for cells, b in zip(body, rows.values()):
            cells.append(f"{100 * (b.total / base - 1):+.1f}%" if base else "-")
    table = [header, *body]
    if transpose:
        table = [list(col) for col in zip(*table)]
    return _render(table, f"({units})")


def _render(table: Sequence[Sequence[str]], corner: str) -> str:
    table = [list(r) for r in table]
    table[0][0] = table[0][0] or corner
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    return "\n".join(lines)
