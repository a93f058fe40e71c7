"""``CompActLinear`` and ``convert_to_compact``: put CompAct into an existing model.

The swap follows torchao's float8 layer swap: one public verb with a module filter and
a frozen config that returns the module, a post-order walk, and a ``from_linear``
constructor that reuses the original ``Parameter`` objects. Reusing them keeps
optimizers (built before or after the swap), DDP's registered parameters, and
``state_dict`` keys exactly as they were, so a checkpoint loads into the plain model
with ``strict=True``; :func:`restore_linear` swaps the plain layers back.

A layer runs in one of two gradient modes (see :mod:`lightning_compact.functional`).
``"decompressed"`` (default): the weight gets a full-size, unbiased ``.grad`` that any
optimizer can use. ``"compressed"`` (the paper's full method): the layer owns a
``weight_delta`` Parameter ``δ`` (``[out, rank]``, a broadcast zero) whose ``.grad`` is
the compressed gradient ``Ĝ``; ``weight.grad`` stays ``None`` and an optimizer that
understands ``δ`` (:class:`~lightning_compact.optim.CompActAdamW`) updates the weight.
``δ`` never appears in ``state_dict``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compact._torch_private import adopt_module_hooks
from lightning_compact.distributed import is_dtensor
from lightning_compact.functional import GRAD_MODES, _compact_linear, _compact_linear_cached, compression_observed
from lightning_compact.principal import broadcast_basis_, principal_projection, resolve_principal_rank
from lightning_compact.projection import DEFAULT_PROJECTION, PROJECTIONS, Projection, build_projection, layer_seed, seed_keys

__all__ = [
    "CompActConfig",
    "CompActConv1D",
    "CompActLinear",
    "ConversionReport",
    "DEFAULT_EXCLUDED_MODULES",
    "FROZEN_REASON",
    "LITGPT_LORA_REASON",
    "canonical_name",
    "conversion_report",
    "convert_to_compact",
    "delta_owner",
    "matches_any",
    "resolve_rank",
    "restore_linear",
]

# Left uncompressed by default, with the reason shown in the conversion table.
# Output heads: small inputs, large outputs, and the paper leaves them exact.
# Poolers (BERT-style) see one token per sequence: nothing to save, only noise to add.
# Attention outputs (o_proj, out_proj, c_proj, attention.output.dense, T5's o, litgpt's
# attn.proj) are converted: where the SDPA kernel keeps the projection's input for its own
# backward (this project's LLaMA, transformers' Llama/Mistral/Qwen2 with SDPA), the layer
# saves that storage instead of x·P (functional.input_kept_elsewhere: no memory either way),
# and elsewhere the input is a fresh copy that x·P replaces (tests/test_attention_output.py
# measures each family both ways). Converted, they also keep their Adam moments in r-space and
# take the same update rule (and α) as every other attention and MLP weight, which is what
# brought CompAct level with GaLore on benchmarks/cpu/peers.py.
DEFAULT_EXCLUDED_MODULES: dict[str, str] = {
    "lm_head": "output head",
    "classifier": "output head",
    "score": "output head",
    "head": "output head",
    "pooler": "pooler (one token per sequence)",
    # PEFT's LoRA: the up-projection reads the r_lora-wide bottleneck (8-64 values a token):
    # there is almost nothing to compress. Its down-projection (lora_A) reads the n-wide
    # layer input, which is what CompAct compresses there.
    "lora_B": "LoRA up-projection (its input is the r_lora-wide bottleneck)",
}

# Name components that wrappers insert between a module and its children without being a
# layer of the model: torch.compile's OptimizedModule. Dropped from the names CompAct uses
# (report, seeds), so a module compiled after its conversion keeps its layers' names.
_WRAPPER_COMPONENTS = ("_orig_mod",)


def canonical_name(name: str) -> str:
    """``name`` without wrapper components (``model._orig_mod.fc`` -> ``model.fc``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)

# Each weight_delta's layer, by id(δ), held weakly. Kept here rather than as an attribute
# of δ, so that δ (and a model holding it) pickles; a stale id is told apart by checking
# that the layer still holds that very δ.
_DELTA_OWNERS: dict[int, weakref.ref] = {}


def delta_owner(param: torch.Tensor) -> CompActLinear | None:
    """The :class:`CompActLinear` whose ``weight_delta`` is ``param``, else ``None``."""
    ref = _DELTA_OWNERS.get(id(param))
    layer = ref() if ref is not None else None
    return layer if layer is not None and getattr(layer, "weight_delta", None) is param else None


def live_deltas() -> bool:
    """Whether any layer may still own a ``weight_delta`` (a cheap test before looking parameters up)."""
    return bool(_DELTA_OWNERS)


def _link(delta: torch.Tensor, layer: CompActLinear) -> None:
    key = id(delta)

    def forget(ref: weakref.ref) -> None:  # the layer died: drop its entry (unless a newer one took the id)
        if _DELTA_OWNERS.get(key) is ref:
            del _DELTA_OWNERS[key]

    _DELTA_OWNERS[key] = weakref.ref(layer, forget)


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

    An ``int`` is absolute; a ``float`` in (0, 1) is a fraction of the layer's own
    ``in_features``, rounded, at least 1. (``1.0`` is refused: it would mean r = n, which
    compresses nothing, and reads too much like ``1``.)
    """
    if isinstance(rank, bool):
        raise TypeError("rank must be an int or a float, not a bool")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be >= 1 when given as an int, got {rank}")
        return rank
    if isinstance(rank, float):
        if not 0.0 < rank < 1.0:
            raise ValueError(
                f"rank as a float is a fraction of each layer's in_features and must be in (0, 1), got {rank}; "
                "pass an int for an absolute rank (rank=1 means r = 1)"
            )
        return max(1, round(rank * in_features))
    raise TypeError(f"rank must be an int or a float, got {type(rank).__name__}")


@dataclasses.dataclass(frozen=True)
class CompActConfig:
    """How layers are converted.

    Attributes:
        rank: int (absolute) or float in (0, 1) (fraction of each layer's ``in_features``).
        projection: ``"gaussian"`` (the paper's), ``"orthogonal"`` (its QR: lower variance at the same
            rank, beyond the paper; see :func:`~lightning_compact.projection.make_projection`), ``"rademacher"``
            or ``"principal"`` (the input's top directions plus a random complement, built from data each
            window; see :mod:`lightning_compact.principal` and ``principal_rank``).
        seed: base seed; each layer's seed mixes it with the layer's name and the window.
        grad_mode: ``"decompressed"`` (full-size ``weight.grad``, any optimizer) or
            ``"compressed"`` (``Ĝ`` in ``weight_delta.grad``, for
            :class:`~lightning_compact.optim.CompActAdamW`).
        exclude_modules: name patterns left alone (see :func:`matches_any`), in addition
            to :data:`DEFAULT_EXCLUDED_MODULES` unless ``default_exclusions=False``.
        default_exclusions: also leave output heads, poolers and attention output
            projections alone.
        share_projection: layers with the same parent module and input size (q/k/v,
            gate/up) use one projection per window, and when they read the very same
            input tensor they keep one ``x·P`` between them instead of one each. Each
            weight's gradient stays unbiased; their estimation noise becomes correlated.
        cache_projections: keep each window's ``P`` in memory (built once per window, not
            in every forward and backward): ``True``, ``False``, or ``"auto"`` (kept unless
            the first training forward shows it is larger than both a quarter of the
            activation memory the layer saves and the layer's weight).
        principal_rank: with ``projection="principal"``, k, the number of ``P``'s columns
            taken from the top directions of the layer's input (the rest are random in
            their complement, scaled to keep ``E[P Pᵀ] = I``; see
            :mod:`lightning_compact.principal`): an int, or a float in (0, 1), a fraction
            of each layer's rank; at most r − 1. Ignored by the other projections.
    """

    rank: int | float
    projection: Projection = DEFAULT_PROJECTION
    seed: int = 0
    grad_mode: str = "decompressed"
    exclude_modules: tuple[str, ...] = ()
    default_exclusions: bool = True
    share_projection: bool = False
    cache_projections: bool | str = "auto"
    principal_rank: int | float = 0.5

    def __post_init__(self) -> None:
        resolve_rank(self.rank, in_features=2)  # validates type and range
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        resolve_principal_rank(self.principal_rank, rank=2)  # validates type and range
        if self.projection == "principal" and self.cache_projections is False:
            raise ValueError(
                "projection='principal' keeps P in the projection cache (it is built from the input and cannot be "
                "rebuilt from a seed): use cache_projections=True or 'auto'"
            )
        if self.projection == "principal" and self.share_projection:
            raise ValueError(
                "projection='principal' finds each layer's own basis: use share_projection=False with it"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        if isinstance(self.exclude_modules, str):
            raise TypeError("exclude_modules must be a list of name patterns, not a string")
        if self.cache_projections not in (True, False, "auto"):
            raise ValueError(f"cache_projections must be True, False or 'auto', got {self.cache_projections!r}")
        object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))

    @property
    def exclusions(self) -> tuple[str, ...]:
        """Every pattern left alone: the defaults (unless switched off) and ``exclude_modules``."""
        defaults = tuple(DEFAULT_EXCLUDED_MODULES) if self.default_exclusions else ()
        return defaults + tuple(p for p in self.exclude_modules if p not in defaults)


# "auto" keeps a cache unless it exceeds both this fraction of the activation bytes the layer
# saves and the bytes of the layer's weight.
_AUTO_CACHE_LIMIT = 0.25


class CompActLinear(nn.Linear):
    """An ``nn.Linear`` whose training forward saves ``x·P`` instead of ``x``.

    Still an ``nn.Linear`` (``isinstance`` checks, ``state_dict`` keys and ``repr`` fields
    are unchanged). In eval mode or under ``torch.no_grad`` it is a plain linear layer.

    State that is not in ``state_dict``: the resample window (:meth:`set_window`), the
    projection's hash keys (an int32 buffer, so a compiled graph reads a new seed as
    data), the optional projection cache, and in compressed mode ``weight_delta``.
    """

    rank: int
    projection: Projection
    base_seed: int
    layer_name: str
    window: int
    share_projection: bool
    seed_name: str
    cache_mode: bool | str
    weight_shards: int = 1  # ranks sharing the weight (FSDP2), for "auto"
    cache_dtype: torch.dtype | None = None  # CompAct.set_projection_dtype's, for a cache built later
    projection_keys: torch.Tensor
    projection_cache: torch.Tensor | None
    weight_delta: nn.Parameter | None
    delta_materialized: bool

    @classmethod
    def from_linear(cls, linear: nn.Module, *, rank: int, name: str, config: CompActConfig) -> CompActLinear:
        """Wrap ``linear``'s own Parameters (no copy) in a new layer of this class."""
        in_features, out_features = _shape_of(linear)
        with torch.device("meta"):
            new = _adopt(linear, cls(in_features, out_features, bias=False))
        new.rank = rank
        new.projection = config.projection
        new.base_seed = config.seed
        new.layer_name = name
        new.share_projection = config.share_projection
        # The seed's name key: the layer itself, or its group of siblings on one input size.
        new.seed_name = f"{_sibling_parent(name)}:in={in_features}" if config.share_projection else name
        new.window = 0
        new.cache_mode = config.cache_projections
        if config.projection == "principal":
            new.principal_k = resolve_principal_rank(config.principal_rank, rank)
            new.cache_mode = True  # P exists only in the cache: never dropped by "auto"
        new.register_buffer(
            "projection_keys", torch.tensor(seed_keys(new.seed), dtype=torch.int32, device=linear.weight.device),
            persistent=False,
        )
        new.register_buffer("projection_cache", None, persistent=False)
        new.register_parameter("weight_delta", None)
        new.delta_materialized = False
        new.set_grad_mode(config.grad_mode)
        if config.cache_projections is not False:
            new.refresh_projection_cache()
        return new

    # -- projection ---------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The seed of the current resample window."""
        return layer_seed(self.base_seed, self.seed_name, self.window)

    def set_window(self, window: int, base_seed: int | None = None) -> None:
        """Use the projection of resample window ``window`` (and ``base_seed``, if given)."""
        if base_seed is not None:
            if isinstance(base_seed, bool) or not isinstance(base_seed, int):
                raise TypeError(f"{self.layer_name}: base_seed must be an int, got {base_seed!r}")
            self.base_seed = base_seed
        if window == self.window and base_seed is None:
            return
        self.window = window
        self.write_projection_keys()
        if self.projection_cache is not None:
            self.refresh_projection_cache()

    def write_projection_keys(self) -> None:
        """Write the current window's hash keys into the (possibly shared) key buffer, in place."""
        self.projection_keys.copy_(torch.tensor(seed_keys(self.seed), dtype=torch.int32))

    def projection_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The current window's ``P`` (``[in_features, rank]``): the cache, or built from the keys."""
        dtype = dtype if dtype is not None else self.weight.dtype
        cache = self._buffers["projection_cache"]
        if cache is not None:
            return cache if cache.dtype == dtype else cache.to(dtype)
        return build_projection(self.in_features, self.rank, self.projection_keys, projection=self.projection, dtype=dtype)

    def refresh_projection_cache(self, dtype: torch.dtype | None = None) -> None:
        """Build the current window's ``P`` into the cache (in place, so compiled graphs and siblings sharing it follow)."""
        dtype = dtype if dtype is not None else (
            self.projection_cache.dtype if self.projection_cache is not None else self.weight.dtype
        )
        if self.projection == "principal" and self._principal_refresh(dtype):
            return
        kind = "orthogonal" if self.projection == "principal" else self.projection  # principal: a seeded placeholder
        fresh = build_projection(self.in_features, self.rank, self.projection_keys, projection=kind, dtype=dtype)
        if self.projection_cache is not None and self.projection_cache.dtype == dtype:
            self.projection_cache.copy_(fresh)
        else:
            self.projection_cache = fresh

    # -- the data-dependent projection (projection="principal") --------------------------

    principal_k: int = 0  # k, principal columns of P
    basis_window: int | None = None  # the window whose P the cache holds (or will, once pending clears)
    basis_pending: bool = False  # build P from the next training forward's input

    def _principal_refresh(self, dtype: torch.dtype) -> bool:
        # P cannot be rebuilt from the keys: a new window only marks it pending (the next
        # training forward builds it), a dtype change keeps its values. Returns False
        # where there is no cache yet: the caller builds a seeded placeholder (orthogonal).
        if self.basis_window != self.window:
            self.basis_window, self.basis_pending = self.window, True
        cache = self.projection_cache
        if cache is None:
            return False
        if cache.dtype != dtype:
            self.projection_cache = cache.to(dtype)
        return True

    def refresh_principal_basis(self, input: torch.Tensor) -> None:
        """Build this window's ``P = [U_k, c·Q_c]`` from ``input`` into the cache (rank 0's under torch.distributed).

        Run by the first training forward of each window; traceable, so a compiled model
        gets one extra graph for this branch (``basis_pending`` is a plain bool attribute).
        """
        with torch.no_grad():
            cache = self.projection_cache
            fresh = principal_projection(input.detach(), self.rank, self.principal_k, self.projection_keys,
                                         dtype=cache.dtype)
            cache.copy_(broadcast_basis_(fresh))
        self.basis_pending = False

    @property
    def projection_cache_bytes(self) -> int:
        """Bytes held by this layer's projection cache (shared caches count once per owner)."""
        cache = self.projection_cache
        return 0 if cache is None else cache.numel() * cache.element_size()

    # -- gradient mode ------------------------------------------------------------------

    @property
    def grad_mode(self) -> str:
        """``"compressed"`` (``Ĝ`` in ``weight_delta.grad``) or ``"decompressed"`` (full ``weight.grad``)."""
        return "compressed" if self.weight_delta is not None else "decompressed"

    def set_grad_mode(self, mode: str, *, materialize: bool = False) -> None:
        """Switch the gradient mode.

        Args:
            mode: ``"compressed"`` or ``"decompressed"``.
            materialize: in compressed mode, give ``weight_delta`` real (zero) storage
                instead of a broadcast zero: collectives that write into every
                parameter (DDP's start-up broadcast) need it; costs ``out × rank`` elements.
        """
        if mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {mode!r}")
        if mode == "decompressed":
            if self.weight_delta is not None and self.weight_delta.grad is not None:
                raise RuntimeError(f"{self.layer_name}: a compressed gradient is pending; step or zero it first")
            self.weight_delta = None
            return
        if self.weight_delta is None or materialize != self.delta_materialized:
            self.delta_materialized = materialize
            self.weight_delta = nn.Parameter(self._delta_storage(materialize), requires_grad=self.weight.requires_grad)
            self.link_delta()

    def _delta_storage(self, materialize: bool) -> torch.Tensor:
        shape = (self.out_features, self.rank)
        like = dict(dtype=self.weight.dtype, device=self.weight.device)
        return torch.zeros(shape, **like) if materialize else torch.zeros((), **like).expand(shape)

    def _normalize_delta(self) -> None:
        # Conversions (.to, .half) and deepcopy densify a broadcast zero: make it one again,
        # in place (the Parameter object stays, so optimizers keep it), and re-link it.
        delta = self.weight_delta
        if delta is None:
            return
        if not self.delta_materialized and delta.stride() != (0, 0):
            delta.data = torch.zeros((), dtype=delta.dtype, device=delta.device).expand(delta.shape)
        _link(delta, self)

    @torch.no_grad()
    def reset_compact_state(self) -> None:
        """Rewrite the state ``to_empty`` leaves uninitialized: the projection keys, the cache, a zero ``weight_delta``.

        For a layer converted on the ``meta`` device and then materialized
        (:func:`lightning_compact.meta_init.materialize_`); the weight is the caller's to initialize.
        """
        self.write_projection_keys()
        if self.cache_mode == "auto" and not self.share_projection:
            self.projection_cache = None  # built at the first training forward if "auto" keeps it
        elif self.projection_cache is not None:
            self.refresh_projection_cache()
        if self.weight_delta is not None:
            if self.delta_materialized:
                self.weight_delta.zero_()
            self._normalize_delta()

    def link_delta(self) -> None:
        """Mark the current ``weight_delta`` as this layer's (:func:`delta_owner`), e.g. after FSDP2 replaced it."""
        if self.weight_delta is not None:
            _link(self.weight_delta, self)

    def _apply(self, fn: Any, recurse: bool = True) -> CompActLinear:
        super()._apply(fn, recurse)
        self._normalize_delta()
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._normalize_delta()  # deepcopy and pickle make a new weight_delta, dense and unlinked

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # weight_delta is always zero and not part of the model: keep checkpoints plain. Except
        # when FSDP2 shards it: Lightning's full-checkpoint loader then requires every
        # parameter to be in the checkpoint (zeros, r/n of the weight's size).
        if is_dtensor(self._parameters.get("weight_delta")):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        delta, self._parameters["weight_delta"] = self._parameters.get("weight_delta"), None
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight_delta"] = delta

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight_delta" in missing_keys:
            missing_keys.remove(prefix + "weight_delta")

    # -- forward ------------------------------------------------------------------------

    transposed: bool = False  # True where the Parameter is stored [in, out] (transformers' Conv1D)
    active: bool = True  # False: a plain linear layer in every mode (see deactivate)

    def deactivate(self) -> None:
        """Act as the plain layer from now on, in place: exact gradients into ``weight.grad``, ``δ`` frozen.

        For where the layer cannot be swapped back (:func:`restore_linear` does this to
        layers sharded by FSDP2, whose ``fully_shard`` holds on to the module objects).
        :func:`convert_to_compact` with the same settings activates it again.
        """
        if self.weight_delta is not None and self.weight_delta.grad is not None:
            raise RuntimeError(f"{self.layer_name}: a compressed gradient is pending; step or zero it first")
        self.active = False
        if self.weight_delta is not None:
            self.weight_delta.requires_grad_(False)

    def activate(self) -> None:
        """Undo :meth:`deactivate`."""
        self.active = True
        if self.weight_delta is not None:
            self.weight_delta.requires_grad_(self.weight.requires_grad)

    def linear_weight(self) -> torch.Tensor:
        """The weight in ``nn.Linear``'s ``[out, in]`` layout (a view of the Parameter)."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Parameters and buffers straight from their dicts (FSDP2 swaps entries there too):
        # nn.Module.__getattr__ is a visible cost at small micro-batches, once per layer and step.
        params = self._parameters
        weight = params.get("weight")
        if weight is None:  # a weight computed by a parametrization added after the conversion
            weight = self.weight
        if self.transposed:
            weight = weight.t()
        bias = params.get("bias")
        if not (self.active and self.training and torch.is_grad_enabled()):
            return F.linear(input, weight, bias)
        if self.cache_mode == "auto" and not torch.compiler.is_compiling():
            self._decide_cache(input)
        if self.basis_pending:
            self.refresh_principal_basis(input)
        cache = self._buffers["projection_cache"]
        # A weight frozen after conversion stays frozen: no Ĝ for it either.
        delta = params["weight_delta"] if weight.requires_grad else None
        if (
            weight.requires_grad and cache is not None and cache.dtype == input.dtype and not self.share_projection
            and not torch.is_autocast_enabled(input.device.type) and not torch.compiler.is_compiling()
            and not compression_observed()
        ):
            return _compact_linear_cached(input, weight, bias, delta, cache, self.rank, self.projection)
        return _compact_linear(  # compact_linear without its argument checks: valid by construction
            input, weight, bias, self.rank, self._buffers["projection_keys"], cache, self.projection, delta,
            self.share_projection,
        )

    def _decide_cache(self, input: torch.Tensor) -> None:
        # Once, at the first training forward: a cache much smaller than the activations it
        # saves is kept (one P per window instead of one per forward and backward), and so is
        # one no larger than the layer's own weight: small micro-batches are where rebuilding P
        # in every forward and backward costs the most host time, and where such a cache is
        # small beside the weight, its gradient and its moments. Dropped: a cache larger than
        # both (a wide input with a narrow output, e.g. a LoRA down-projection, at few tokens).
        # Under FSDP2 the weight a rank holds is its shard (weight_shards: CompAct.note_sharding).
        tokens = input.numel() // self.in_features
        saved = tokens * (self.in_features - self.rank) * input.element_size()
        weight = self.weight.numel() * self.weight.element_size() // self.weight_shards
        limit = max(_AUTO_CACHE_LIMIT * saved, weight)
        dtype = self.cache_dtype or self.weight.dtype
        cache_bytes = self.in_features * self.rank * dtype.itemsize
        if self.projection_cache is not None:
            cache_bytes = self.projection_cache_bytes
        if cache_bytes > limit:
            self.projection_cache = None
            self.cache_mode = False
        else:
            if self.projection_cache is None:  # not built yet (a model materialized from meta)
                self.refresh_projection_cache(dtype)
            self.cache_mode = True

    def to_plain(self) -> nn.Module:
        """The plain layer (``nn.Linear``) with this layer's very Parameters and hooks (``weight_delta`` dropped)."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=False)
        return _adopt(self, plain)

    def extra_repr(self) -> str:
        mode = ", grad_mode=compressed" if self.weight_delta is not None else ""
        state = "" if self.active else ", inactive"
        return f"{super().extra_repr()}, rank={self.rank}, projection={self.projection}{mode}{state}"


class CompActConv1D(CompActLinear):
    """CompAct for transformers' ``Conv1D`` (GPT-2 family): the same layer over a weight stored ``[in, out]``.

    The Parameters are the original ``Conv1D``'s (``state_dict`` keys and shapes unchanged);
    the layer computes with ``weight.t()``, so everything else, the compressed gradient
    included, is :class:`CompActLinear`'s. :meth:`to_plain` gives the ``Conv1D`` back.
    """

    transposed = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._plain_class: type[nn.Module] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, *, rank: int, name: str, config: CompActConfig) -> CompActLinear:
        new = super().from_linear(linear, rank=rank, name=name, config=config)
        new._plain_class = type(linear)
        return new

    def to_plain(self) -> nn.Module:
        plain = self._plain_class.__new__(self._plain_class)
        nn.Module.__init__(plain)
        plain.nf, plain.nx = self.out_features, self.in_features
        return _adopt(self, plain)

    def extra_repr(self) -> str:
        return f"nx={self.in_features}, nf={self.out_features}, " + super().extra_repr()


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _shape_of(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer or a ``Conv1D``."""
    if _is_conv1d(module):
        return int(module.nx), int(module.nf)
    return module.in_features, module.out_features


def _adopt(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` (a swap's new layer) ``source``'s very Parameters, hooks and training mode."""
    target.weight = source.weight
    target.bias = source.bias
    # Hooks users or other libraries put on the module (full backward hooks and with_kwargs
    # flags included) keep firing after the swap, and their handles still remove them.
    adopt_module_hooks(source, target)
    target.train(source.training)
    return target


@dataclasses.dataclass
class ConversionReport:
    """Which linear layers were converted (with their rank) and which were skipped (with why).

    ``shapes`` holds ``(in_features, out_features)`` of every linear layer met.
    ``aliases`` maps each further name of a layer registered under several names (one
    ``nn.Linear`` shared by two parents, or ``m.alias = m.a``) to the name it was
    converted (or skipped) under: it is one layer, converted once, with one ``weight_delta``.
    """

    converted: dict[str, CompActLinear] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)

    def merge(self, other: ConversionReport) -> None:
        """Add ``other``'s layers; a layer object already listed under another name becomes an alias of it."""
        known = {id(layer): name for name, layer in self.converted.items()}
        for name, layer in other.converted.items():
            first = known.get(id(layer), name)
            if first != name:
                self.aliases[name] = first
                continue
            self.converted[name] = layer
            self.skipped.pop(name, None)
        self.skipped.update({k: v for k, v in other.skipped.items() if k not in self.converted})
        self.shapes.update(other.shapes)
        self.aliases.update(other.aliases)


def _child_slots(module: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every (name, child) of every module under ``module``, by id of the parent, aliases included.

    ``named_children`` lists a module held under two names of one parent only once; the
    walk without de-duplication sees every name, so an alias is swapped with its original.
    """
    by_name: dict[str, nn.Module] = {}
    slots: dict[int, dict[str, nn.Module]] = {}
    for name, mod in module.named_modules(remove_duplicate=False):  # pre-order: a parent before its children
        by_name[name] = mod
        if name:
            parent_name, _, child_name = name.rpartition(".")
            slots.setdefault(id(by_name[parent_name]), {}).setdefault(child_name, mod)
    return {key: list(children.items()) for key, children in slots.items()}


def _sibling_parent(name: str) -> str:
    """The module whose children read one input: ``self_attn`` for ``self_attn.q_proj``.

    PEFT's LoRA down-projection ``self_attn.q_proj.lora_A.<adapter>`` counts as ``self_attn.q_proj``,
    so the ``lora_A`` of q, k and v are siblings, as the projections they adapt are.
    """
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] == "lora_A":
        parts = parts[:-2]
    return ".".join(parts[:-1])


FROZEN_REASON = "frozen: its weight needs no gradient, so autograd saves no input for it"
LITGPT_LORA_REASON = (
    "litgpt LoRA: lora_A is a Parameter multiplied inside LoRALinear.forward, not an nn.Linear; "
    "not converted, so its n-wide input is still saved (use PEFT's LoRA for CompAct on the adapters)"
)


def _skip_reason(name: str, module: nn.Linear, rank: int, config: CompActConfig) -> str | None:
    if isinstance(module.weight, torch.Tensor) and not module.weight.requires_grad:
        # A frozen layer (LoRA's base_layer, a frozen backbone) keeps no input for a weight
        # gradient: converting it would save nothing, cost a projection and add a cache.
        return FROZEN_REASON
    excluded_by = matches_any(name, config.exclusions)
    if excluded_by is not None:
        why = DEFAULT_EXCLUDED_MODULES.get(excluded_by, "excluded") if config.default_exclusions else "excluded"
        return f"{why} ({excluded_by!r})"
    if torch.nn.utils.parametrize.is_parametrized(module) or not isinstance(module.weight, nn.Parameter):
        return "weight is computed (parametrization or weight_norm): not a Parameter to reuse"
    if is_dtensor(module.weight):
        return "already sharded (DTensor): convert before fully_shard or tensor parallelism"
    in_features = _shape_of(module)[0]
    if rank >= in_features:
        return f"rank {rank} >= in_features {in_features}"
    return None


def _settings_of(layer: CompActLinear) -> dict[str, Any]:
    # Neither the gradient mode (set_grad_mode) nor the seed (set_window) is among them:
    # both change on a converted layer without converting it again.
    return dict(rank=layer.rank, projection=layer.projection, share_projection=layer.share_projection)


_REPORTS: weakref.WeakKeyDictionary[nn.Module, ConversionReport] = weakref.WeakKeyDictionary()


def conversion_report(module: nn.Module) -> ConversionReport:
    """What the last :func:`convert_to_compact` of ``module`` converted and skipped (empty if none)."""
    return _REPORTS.get(module, ConversionReport())


def convert_to_compact(
    module: nn.Module,
    *,
    rank: int | float | None = None,
    config: CompActConfig | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Swap ``module``'s ``nn.Linear`` layers for :class:`CompActLinear`, in place, and return ``module``.

    Args:
        module: the model (or any submodule tree).
        rank: shorthand for ``config=CompActConfig(rank=rank)``.
        config: rank, projection, base seed, gradient mode and exclusions; see :class:`CompActConfig`.
        module_filter_fn: ``fn(linear, fully_qualified_name) -> bool``; only layers it
            accepts are converted (and those also pass the exclusions).

    Returns:
        ``module`` itself. :func:`conversion_report` tells which layer got which rank and
        why others were skipped. Layers already converted with the same settings are left
        as they are (gradient mode included) and listed again, so calling this twice
        (e.g. after ``configure_model``) is safe.

    Raises:
        ValueError: a layer is already converted with other settings (call
            :func:`restore_linear` first).
    """
    if (rank is None) == (config is None):
        raise ValueError("pass exactly one of rank=... or config=CompActConfig(...)")
    config = config if config is not None else CompActConfig(rank=rank)
    if isinstance(module, nn.Linear) and not isinstance(module, CompActLinear):
        raise TypeError("convert_to_compact swaps layers inside a module; wrap a bare nn.Linear in a container first")
    report = ConversionReport()

    # Who holds each Parameter directly: a weight held twice (tied to an embedding or to
    # another layer) has a gradient from elsewhere too, which compression would get wrong.
    # (One module registered under two names is one holder.)
    holders: dict[int, dict[int, str]] = {}
    for mod_name, mod in module.named_modules():
        for _, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), {}).setdefault(id(mod), mod_name)

    slots = _child_slots(module)
    first_name: dict[int, str] = {}  # id(module) -> the name it was first met under
    swapped: dict[int, nn.Module] = {}  # id(original layer) -> its CompActLinear

    def visit(parent: nn.Module, prefix: str) -> None:
        # Post-order: children first, then swap them in their parent.
        for child_name, child in slots.get(id(parent), ()):
            name = canonical_name(f"{prefix}.{child_name}" if prefix else child_name)
            if id(child) in first_name:
                # The same module under another name: converted (or not) once, by its first
                # name; this name gets the same layer, so sharing survives and there is one δ.
                if id(child) in swapped:
                    setattr(parent, child_name, swapped[id(child)])
                if isinstance(child, nn.Linear) or _is_conv1d(child):
                    report.aliases[name] = first_name[id(child)]
                continue
            first_name[id(child)] = name
            visit(child, name)
            lora_a = child._parameters.get("lora_A") if not isinstance(child, nn.Linear) else None
            if isinstance(lora_a, nn.Parameter) and lora_a.dim() == 2 and lora_a.requires_grad:
                # litgpt's LoRALinear / LoRAQKVLinear: listed, so the table says why it is left alone.
                report.shapes[f"{name}.lora_A"] = (lora_a.shape[1], lora_a.shape[0])
                report.skipped[f"{name}.lora_A"] = LITGPT_LORA_REASON
            if not isinstance(child, nn.Linear) and not _is_conv1d(child):
                continue
            in_features = _shape_of(child)[0]
            report.shapes[name] = _shape_of(child)
            if isinstance(child, CompActLinear):
                wanted = dict(rank=resolve_rank(config.rank, in_features), projection=config.projection,
                              share_projection=config.share_projection)
                have = _settings_of(child)
                if have != wanted:
                    diff = ", ".join(f"{k}={have[k]!r} (asked {wanted[k]!r})" for k in have if have[k] != wanted[k])
                    raise ValueError(
                        f"{name} is already converted with other settings: {diff}. Call "
                        "lightning_compact.restore_linear(model) first, or convert with the same settings."
                    )
                if not child.active:
                    child.activate()
                report.converted[name] = child
                continue
            if module_filter_fn is not None and not module_filter_fn(child, name):
                report.skipped[name] = "not selected by the filter"
                continue
            layer_rank = resolve_rank(config.rank, in_features)
            reason = _skip_reason(name, child, layer_rank, config)
            if reason is None and isinstance(parent, nn.MultiheadAttention):
                reason = "nn.MultiheadAttention reads this weight directly (its forward never runs)"
            others = [h for m, h in holders.get(id(child.weight), {}).items() if m != id(child)]
            if reason is None and others:
                reason = f"weight shared with {others[0]}"
            if reason is not None:
                report.skipped[name] = reason
                continue
            cls = CompActConv1D if _is_conv1d(child) else CompActLinear
            new = cls.from_linear(child, rank=layer_rank, name=name, config=config)
            setattr(parent, child_name, new)
            swapped[id(child)] = new
            report.converted[name] = new

    visit(module, "")
    if config.share_projection:
        _share_projection_state(report.converted.values())
    _REPORTS[module] = report
    return module


def _share_projection_state(layers: Iterable[CompActLinear]) -> None:
    # Siblings on one seed name hold the very same key and cache tensors: one P is built
    # per window for all of them, and compact_linear recognises it to share x·P.
    first: dict[tuple, CompActLinear] = {}
    for layer in layers:
        key = (layer.seed_name, layer.rank, layer.projection)
        leader = first.setdefault(key, layer)
        if leader is not layer:
            layer.projection_keys = leader.projection_keys
            layer.projection_cache = leader.projection_cache


def restore_linear(module: nn.Module) -> nn.Module:
    """Swap every :class:`CompActLinear` in ``module`` back to a plain ``nn.Linear`` (same Parameters), in place.

    Any pending compressed gradient is dropped with its ``weight_delta``. A layer sharded
    by FSDP2 (its weight is a ``DTensor``) stays in place, since ``fully_shard`` holds on
    to it, but is deactivated (:meth:`CompActLinear.deactivate`): it computes and
    differentiates exactly like the plain layer. Returns ``module``.
    """
    slots = _child_slots(module)
    plain: dict[int, nn.Module] = {}  # one plain layer per converted one, whatever its number of names
    for _, child in list(module.named_modules()):
        for child_name, grandchild in slots.get(id(child), ()):
            if isinstance(grandchild, CompActLinear):
                if is_dtensor(grandchild.weight):
                    if grandchild.weight_delta is not None:
                        grandchild.weight_delta.grad = None
                    grandchild.deactivate()
                else:
                    if id(grandchild) not in plain:
                        plain[id(grandchild)] = grandchild.to_plain()
                    setattr(child, child_name, plain[id(grandchild)])
    _REPORTS.pop(module, None)
    return module
