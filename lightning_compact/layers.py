"""``CompActLinear`` and ``convert_to_compact``: put CompAct into an existing model.

The swap follows torchao's float8 layer swap: one public verb with a module filter and
a frozen config, a post-order walk, and a ``from_linear`` constructor that reuses the
original ``Parameter`` objects. Reusing them keeps optimizers (built before or after
the swap), DDP's registered parameters, and ``state_dict`` keys exactly as they were,
so a checkpoint loads into the plain model with ``strict=True``.

A layer runs in one of two gradient modes. By default (gradient decompression) its
weight gets a full-size ``.grad`` that any optimizer can use. With ``compress_grad``
(the paper's full method) the weight's gradient stays compressed: it is kept in a
:class:`~lightning_compact.functional.CompressedGrad` attached to the weight Parameter
(see :func:`compressed_grad_of`), ``weight.grad`` stays ``None``, and an optimizer that
understands it (:class:`~lightning_compact.optim.CompActAdamW`) applies the update.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compact.functional import CompressedGrad, compact_linear
from lightning_compact.projection import PROJECTIONS, Projection, layer_seed

__all__ = [
    "CompActConfig",
    "CompActLinear",
    "ConversionReport",
    "DEFAULT_EXCLUDED_MODULES",
    "compressed_grad_of",
    "convert_to_compact",
    "matches_any",
    "resolve_rank",
]

# Left uncompressed by default, with the reason shown in the conversion table.
# Output heads: small inputs, large outputs, and the paper leaves them exact.
# Poolers (BERT-style) see one token per sequence: nothing to save, only noise to add.
# Attention output projections: their input is the attention output, which the
# attention op already saves, so compressing it saves nothing and only adds noise.
DEFAULT_EXCLUDED_MODULES: dict[str, str] = {
    "lm_head": "output head",
    "classifier": "output head",
    "score": "output head",
    "head": "output head",
    "pooler": "pooler (one token per sequence)",
    "o_proj": "attention output",
    "out_proj": "attention output",
    "attention.output.dense": "attention output",
}


# The attribute of a weight Parameter that holds its CompressedGrad (the analogue of ``.grad``).
_COMPRESSED_GRAD_ATTR = "compressed_grad"


def compressed_grad_of(param: torch.Tensor) -> CompressedGrad | None:
    """The :class:`~lightning_compact.functional.CompressedGrad` of a weight in compressed mode, else ``None``."""
    return getattr(param, _COMPRESSED_GRAD_ATTR, None)


def matches_any(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that names ``name``, else ``None``.

    A pattern matches a fully qualified module name if it equals the name, equals a
    run of its dotted components (``"q_proj"``, ``"attention.output.dense"``,
    ``"layers.0"``), or matches it as a glob (``"*.mlp.*"``).
    """
    parts = name.split(".")
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
        pat_parts = pattern.split(".")
        k = len(pat_parts)
        if any(parts[i : i + k] == pat_parts for i in range(len(parts) - k + 1)):
            return pattern
    return None


def resolve_rank(rank: int | float, in_features: int) -> int:
    """The one place a configured rank becomes a layer's rank.

    An ``int`` is absolute; a ``float`` in (0, 1] is a fraction of the layer's own
    ``in_features``, rounded, at least 1.
    """
    if isinstance(rank, bool):
        raise TypeError("rank must be an int or a float, not a bool")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be >= 1 when given as an int, got {rank}")
        return rank
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(
                f"rank as a float is a fraction of each layer's in_features and must be in (0, 1], got {rank}; "
                "pass an int for an absolute rank"
            )
        return max(1, round(rank * in_features))
    raise TypeError(f"rank must be an int or a float, got {type(rank).__name__}")


@dataclasses.dataclass(frozen=True)
class CompActConfig:
    """How layers are converted.

    Attributes:
        rank: int (absolute) or float in (0, 1] (fraction of each layer's ``in_features``).
        projection: ``"gaussian"`` (the paper's) or ``"rademacher"``.
        seed: base seed; each layer's seed mixes it with the layer's name and the window.
        exclude_modules: name patterns left alone (see :func:`matches_any`).
        compress_grad: keep each converted weight's gradient compressed (``[out, rank]``,
            for :class:`~lightning_compact.optim.CompActAdamW`) instead of decompressing
            it into a full-size ``.grad``.
        share_projection: layers with the same parent module and input size (q/k/v,
            gate/up) use one projection per window, and when they read the very same
            input tensor they keep one ``x·P`` between them instead of one each. Each
            weight's gradient stays unbiased; their estimation noise becomes correlated.
    """

    rank: int | float
    projection: Projection = "gaussian"
    seed: int = 0
    exclude_modules: tuple[str, ...] = tuple(DEFAULT_EXCLUDED_MODULES)
    compress_grad: bool = False
    share_projection: bool = False

    def __post_init__(self) -> None:
        resolve_rank(self.rank, in_features=1)  # validates type and range
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))


class CompActLinear(nn.Linear):
    """An ``nn.Linear`` whose training forward saves ``x·P`` instead of ``x``.

    Still an ``nn.Linear`` (``isinstance`` checks, ``state_dict`` keys and ``repr`` fields
    are unchanged). In eval mode or under ``torch.no_grad`` it is a plain linear layer.
    The seed is plain Python state, not a buffer, so checkpoints are untouched.

    With :attr:`compress_grad` set (see :meth:`set_compress_grad`) the weight's
    gradient is accumulated compressed in ``weight.compressed_grad`` and
    ``weight.grad`` stays ``None``.
    """

    rank: int
    projection: Projection
    base_seed: int
    layer_name: str
    window: int
    compress_grad: bool
    share_projection: bool
    seed_name: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, name: str, config: CompActConfig) -> CompActLinear:
        """Wrap ``linear``'s own Parameters (no copy) in a new ``CompActLinear``."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        new.bias = linear.bias
        # Keep hooks users or other libraries put on the original module.
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
            getattr(new, attr).update(getattr(linear, attr))
        new.train(linear.training)
        new.rank = rank
        new.projection = config.projection
        new.base_seed = config.seed
        new.layer_name = name
        new.share_projection = config.share_projection
        # The seed's name key: the layer itself, or its group of siblings on one input size.
        parent = name.rpartition(".")[0]
        new.seed_name = f"{parent}:in={linear.in_features}" if config.share_projection else name
        new.window = 0
        new.compress_grad = False
        new.set_compress_grad(config.compress_grad)
        return new

    @property
    def seed(self) -> int:
        """The seed of the current resample window."""
        return layer_seed(self.base_seed, self.seed_name, self.window)

    def set_compress_grad(self, enabled: bool) -> None:
        """Keep the weight gradient compressed (``True``) or decompress it into ``weight.grad`` (``False``)."""
        if enabled:
            self._grad_sink()
        elif self.compress_grad:
            sink = compressed_grad_of(self.weight)
            if sink is not None and sink.value is not None:
                raise RuntimeError(f"{self.layer_name}: a compressed gradient is pending; step or zero it first")
            if sink is not None:
                delattr(self.weight, _COMPRESSED_GRAD_ATTR)
        self.compress_grad = bool(enabled)

    def _grad_sink(self) -> CompressedGrad:
        sink = compressed_grad_of(self.weight)
        if sink is None or sink.rank != self.rank:
            # Created on first use too: a deep copy of the model keeps the layer but not the
            # attributes of its Parameters.
            sink = CompressedGrad(self.in_features, self.rank, self.projection)
            setattr(self.weight, _COMPRESSED_GRAD_ATTR, sink)
        return sink

    @property
    def compressed_grad(self) -> torch.Tensor | None:
        """The weight's accumulated compressed gradient ``Ĝ`` (``[out_features, rank]``), if any."""
        sink = compressed_grad_of(self.weight)
        return None if sink is None else sink.value

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            sink = self._grad_sink() if self.compress_grad and self.weight.requires_grad else None
            return compact_linear(
                input,
                self.weight,
                self.bias,
                rank=self.rank,
                seed=self.seed,
                projection=self.projection,
                grad_sink=sink,
                share_compressed=self.share_projection,
            )
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        mode = ", compress_grad=True" if self.compress_grad else ""
        return f"{super().extra_repr()}, rank={self.rank}, projection={self.projection}{mode}"


@dataclasses.dataclass
class ConversionReport:
    """Which linear layers were converted (with their rank) and which were skipped (with why)."""

    converted: dict[str, CompActLinear] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def merge(self, other: ConversionReport) -> None:
        self.converted.update(other.converted)
        self.skipped.update(other.skipped)
        self.shapes.update(other.shapes)


def _skip_reason(name: str, module: nn.Linear, rank: int, config: CompActConfig) -> str | None:
    excluded_by = matches_any(name, config.exclude_modules)
    if excluded_by is not None:
        why = DEFAULT_EXCLUDED_MODULES.get(excluded_by, "excluded")
        return f"{why} ({excluded_by!r})"
    if rank >= module.in_features:
        return f"rank {rank} >= in_features {module.in_features}"
    return None


def convert_to_compact(
    module: nn.Module,
    *,
    rank: int | float | None = None,
    config: CompActConfig | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> ConversionReport:
    """Swap ``module``'s ``nn.Linear`` layers for :class:`CompActLinear`, in place.

    Args:
        module: the model (or any submodule tree).
        rank: shorthand for ``config=CompActConfig(rank=rank)``.
        config: projection, base seed and exclusions; see :class:`CompActConfig`.
        module_filter_fn: ``fn(linear, fully_qualified_name) -> bool``; only layers it
            accepts are converted (and those also pass the exclusions).

    Returns:
        A :class:`ConversionReport`. Layers already converted are left as they are and
        listed again, so calling this twice (e.g. after ``configure_model``) is safe.
    """
    if (rank is None) == (config is None):
        raise ValueError("pass exactly one of rank=... or config=CompActConfig(...)")
    config = config if config is not None else CompActConfig(rank=rank)
    report = ConversionReport()

    def visit(parent: nn.Module, prefix: str) -> None:
        # Post-order: children first, then swap them in their parent.
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            visit(child, name)
            if not isinstance(child, nn.Linear):
                continue
            report.shapes[name] = (child.in_features, child.out_features)
            if isinstance(child, CompActLinear):
                report.converted[name] = child
                continue
            if module_filter_fn is not None and not module_filter_fn(child, name):
                report.skipped[name] = "not selected by the filter"
                continue
            layer_rank = resolve_rank(config.rank, child.in_features)
            reason = _skip_reason(name, child, layer_rank, config)
            if reason is not None:
                report.skipped[name] = reason
                continue
            new = CompActLinear.from_linear(child, rank=layer_rank, name=name, config=config)
            setattr(parent, child_name, new)
            report.converted[name] = new

    if isinstance(module, nn.Linear) and not isinstance(module, CompActLinear):
        raise TypeError("convert_to_compact swaps layers inside a module; wrap a bare nn.Linear in a container first")
    visit(module, "")
    return report
