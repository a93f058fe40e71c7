"""What a training run looks like to the memory estimator: model shape, batch, precision.

:func:`read_recipe` takes it from a ``lightning-compact`` YAML recipe. The keys read
(the recipe format of :mod:`lightning_compact.cli`; ``init_args`` may be left out):

* ``model.init_args.model``: a LLaMA preset name (``llama_60m`` ... ``llama_7b``, or an
  :data:`ESTIMATOR_SHAPES` name); ``model.init_args.config_overrides``: fields
  of :class:`~lightning_compact.models.llama.LlamaConfig` to change.
* ``data.init_args.batch_size`` (or ``train_batch_size``); ``data.init_args.seq_len``
  (or ``max_length``, ``max_seq_length``, ``block_size``, ``seq_length``).
* ``trainer.precision`` (default ``32-true``); ``trainer.accumulate_grad_batches``
  (default 1); ``trainer.accelerator``: ``cpu`` gives device type ``cpu``, anything
  else (``gpu``, ``cuda``, ``auto``) ``cuda``.
* ``compact``: ``enabled`` (default true, as in the CLI), ``rank`` (default n/4, as in
  the CLI), ``grad_mode`` (``decompressed``: gradient decompression) and
  ``exclude_modules``: the recipe's own CompAct setting.
* ``trainer.devices`` × ``trainer.num_nodes`` and ``trainer.strategy``: the per-rank setting
  (``ModelParallelStrategy`` is FSDP2; several devices otherwise mean DDP, Lightning's default).
* ``trainer.callbacks``: a ``LeanActivations`` entry (any ``class_path`` ending in
  ``LeanActivations``) gives its ``norms``/``mlp``/``loss`` options (default all on) and
  its ``checkpointing`` granularity, if any; ``model.init_args.config_overrides.lean:
  true`` (the presets' native switch) counts as all three lean options.

Only the YAML is read: nothing is instantiated, so no dataset, tokenizer or hub
access is needed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["ESTIMATOR_SHAPES", "STRATEGIES", "RunShape", "llama_module", "model_config", "read_recipe"]

PRECISIONS = ("64-true", "32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed")
_PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "half": "16-mixed"}

# Shapes the estimator knows beyond the training presets (LLAMA_PRESETS).
# (None at the moment: LLaMA-7B, once only here, is a training preset now, models.llama.LLAMA_PRESETS.)
ESTIMATOR_SHAPES: dict[str, dict[str, int]] = {}
# Multi-process strategies the estimator models per rank (lightning_compact.memory.sharded).
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp2")
# lightning_compact.cli.DEFAULT_RANK (not imported: the CLI needs jsonargparse).
CLI_DEFAULT_RANK = 0.25
_BATCH_KEYS = ("batch_size", "train_batch_size")
_SEQ_KEYS = ("seq_len", "max_length", "max_seq_length", "block_size", "seq_length")


@dataclasses.dataclass(frozen=True)
class RunShape:
    """The parts of a training run that decide its memory.

    Attributes:
        model: a LLaMA preset or :data:`ESTIMATOR_SHAPES` name.
        config_overrides: ``LlamaConfig`` fields changed from the preset.
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        precision: a Lightning precision string (``bf16-mixed``, ``32-true``, ...).
        accumulate_grad_batches: micro-batches per optimizer step.
        device_type: ``cuda`` or ``cpu``: which kernels and allocator to model.
        compact_rank: the recipe's CompAct rank, or ``None`` if it has CompAct off.
        grad_mode: the recipe's CompAct gradient mode (``"compressed"`` or ``"decompressed"``).
        exclude_modules: the recipe's CompAct exclusions, or ``None`` for the default.
        lean: the recipe's lean options (``"norms"``, ``"mlp"``, ``"loss"``; ``LeanActivations``).
        checkpointing: the recipe's activation-checkpointing granularity, or ``None``.
        world_size: processes of the run (``trainer.devices`` × ``trainer.num_nodes``); the
            figures are one rank's, and ``batch_size`` is per rank.
        strategy: ``None`` (one process), ``"ddp"`` or ``"fsdp2"`` (``ModelParallelStrategy``).
        empty_init: the module is built on ``meta`` and each rank allocates only its shard
            (``CausalLMModule(empty_init=True)``); otherwise every rank first builds the whole
            model in host memory.
    """

    model: str
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 8
    seq_len: int = 256
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    device_type: str = "cuda"
    compact_rank: int | float | None = None
    grad_mode: str = "compressed"
    exclude_modules: tuple[str, ...] | None = None
    lean: tuple[str, ...] = ()
    checkpointing: str | None = None
    world_size: int = 1
    strategy: str | None = None
    empty_init: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", normalize_precision(self.precision))
        if self.strategy not in (None, *STRATEGIES):
            raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {self.strategy!r}")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {self.world_size!r}")
        if self.world_size > 1 and self.strategy is None:
            raise ValueError(f"world_size={self.world_size} needs a strategy: one of {STRATEGIES}")
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {self.device_type!r}")
        for name in ("batch_size", "seq_len", "accumulate_grad_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


def normalize_precision(precision: Any) -> str:
    """Lightning's precision spelling (``bf16-mixed``), or a ``ValueError`` listing the supported ones."""
    value = str(precision)
    value = _PRECISION_ALIASES.get(value, value)
    if value not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported by the estimator; use one of {', '.join(PRECISIONS)}")
    return value


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    """``config[key]``'s arguments, with or without a ``class_path``/``init_args`` wrapper."""
    section = config.get(key) or {}
    if not isinstance(section, dict):
        return {}
    args = dict(section.get("init_args") or {})
    args.update({k: v for k, v in section.items() if k not in ("class_path", "init_args")})
    return args


def _first(section: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((section[k] for k in keys if section.get(k) is not None), None)


_LEAN_OPTIONS = ("norms", "mlp", "loss")  # estimator.LEAN_OPTIONS (not imported: this module needs no torch)


def _distribution(trainer: dict[str, Any]) -> tuple[int, str | None]:
    """``(world size, strategy)`` of a recipe's trainer section (Lightning picks DDP for several devices)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    count = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else 1
    world = max(1, count) * int(nodes)
    strategy = trainer.get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    if name.rpartition(".")[2] == "ModelParallelStrategy":
        return world, "fsdp2"
    return world, ("ddp" if world > 1 else None)


def _lean_callback(trainer: dict[str, Any]) -> tuple[tuple[str, ...], str | None] | None:
    """``(lean options, checkpointing)`` of the recipe's ``LeanActivations`` callback, or ``None`` without one."""
    callbacks = trainer.get("callbacks") or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        class_path = entry.get("class_path", "") if isinstance(entry, dict) else str(entry)
        if class_path.rpartition(".")[2] != "LeanActivations":
            continue
        args = (entry.get("init_args") or {}) if isinstance(entry, dict) else {}
        options = tuple(o for o in _LEAN_OPTIONS if args.get(o, True))
        return options, args.get("checkpointing")
    return None


def read_recipe(path: str | Path) -> RunShape:
    """The :class:`RunShape` of a YAML recipe (see the module docstring for the keys read).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the recipe names no LLaMA preset, or has no batch size / sequence length.
    """
    import yaml  # a dependency of lightning; imported here so the rest needs only torch

    path = Path(path)
    config = yaml.safe_load(path.read_text()) or {}
    model_args, data_args = _section(config, "model"), _section(config, "data")
    trainer, compact = config.get("trainer") or {}, config.get("compact") or {}
    model = model_args.get("model")
    if not isinstance(model, str):
        raise ValueError(f"{path}: no `model.init_args.model` preset name found; the estimator needs a LLaMA preset")
    batch, seq = _first(data_args, _BATCH_KEYS), _first(data_args, _SEQ_KEYS)
    if batch is None or seq is None:
        raise ValueError(
            f"{path}: could not find the batch size ({' / '.join('data.init_args.' + k for k in _BATCH_KEYS)}) "
            f"or the sequence length ({' / '.join(_SEQ_KEYS)}); pass --data.batch_size / --data.seq_len"
        )
    # As the CLI: the compact group is on unless switched off, at rank n/4 unless given.
    enabled = bool(compact.get("enabled", True))
    exclude = compact.get("exclude_modules") if enabled else None
    overrides = dict(model_args.get("config_overrides") or {})
    # The native switch becomes the variant's lean options, so that the estimator's other
    # variants (the baseline among them) are built without it.
    native_lean = bool(overrides.pop("lean", False))
    lean, checkpointing = _lean_callback(trainer) or ((), None)
    if native_lean:
        lean = _LEAN_OPTIONS
    world_size, strategy = _distribution(trainer)
    return RunShape(
        model=model,
        config_overrides=overrides,
        batch_size=int(batch),
        seq_len=int(seq),
        precision=trainer.get("precision", "32-true"),
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches", 1) or 1),
        device_type="cpu" if str(trainer.get("accelerator", "auto")).lower() == "cpu" else "cuda",
        compact_rank=compact.get("rank", CLI_DEFAULT_RANK) if enabled else None,
        # "auto" with the recipes' AdamW is compressed.
        grad_mode="decompressed" if enabled and compact.get("grad_mode") == "decompressed" else "compressed",
        exclude_modules=tuple(exclude) if exclude is not None else None,
        lean=lean,
        checkpointing=checkpointing,
        world_size=world_size,
        strategy=strategy,
        empty_init=bool(model_args.get("empty_init", False)),
    )


def llama_module() -> ModuleType:
    """:mod:`lightning_compact.models.llama`; the ``models`` package imports lazily, so this needs torch alone."""
    from lightning_compact.models import llama

    return llama


def model_config(model: str, overrides: dict[str, Any] | None = None) -> Any:
    """The ``LlamaConfig`` of a preset (or :data:`ESTIMATOR_SHAPES` name) with ``overrides`` applied.

    Raises:
        ValueError: unknown name or field.
    """
    llama = llama_module()
    if model in llama.LLAMA_PRESETS:
        base = llama.LLAMA_PRESETS[model]
    elif model in ESTIMATOR_SHAPES:
        base = llama.LlamaConfig(**ESTIMATOR_SHAPES[model])
    else:
        known = ", ".join([*llama.LLAMA_PRESETS, *ESTIMATOR_SHAPES])
        raise ValueError(f"the estimator knows the LLaMA shapes {known}, not {model!r}")
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"unknown LlamaConfig fields {unknown}; known: {', '.join(sorted(fields))}")
    return dataclasses.replace(base, **(overrides or {}))
