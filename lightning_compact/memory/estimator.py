"""Estimate a recipe's peak training memory without a GPU: one step on fake tensors.

The recipe's model is built under ``FakeTensorMode`` (tensors with shapes, dtypes and
storages but no data, so nothing is allocated). One optimizer step on zero gradients
creates the optimizer state (what a first training step leaves behind, without its
forward and backward); then one full training step (forward, backward, optimizer
step) is measured per category with
:class:`~lightning_compact.memory.tracker.StepMemoryTracker`. This is done for the
baseline and for CompAct at several ranks, in both gradient modes, and the measured
savings are printed beside the paper's Table 1 formula (:mod:`.formula`).

What is modelled, and how:

* Lean activations (``Variant(lean=...)``: :func:`~lightning_compact.lean.apply_lean`, as
  ``LeanActivations`` does) and activation checkpointing (``Variant(checkpointing=...)``:
  a granularity of :mod:`.checkpointing_options`, e.g. ``torch.utils.checkpoint`` around
  each decoder layer) run as they would on real tensors: what they save, recompute and
  free is measured, not modelled. The chunked loss runs on its torch backend (liger-kernel
  keeps the same two gradients) with CUDA's chunk size when a CUDA run is estimated.
* Precision as Lightning applies it: ``*-true`` builds the parameters in that dtype;
  ``*-mixed`` keeps float32 parameters and runs the forward under autocast. (The
  fp16 gradient scaler's few bytes are not modelled.)
* Gradient accumulation: with ``accumulate_grad_batches > 1`` the measured step has two
  micro-batches, so the second runs with the first one's gradients alive, as every
  later micro-batch does.
* ``device_type="cuda"``: the estimate still runs on the fake *CPU* device (fake CUDA
  tensors abort inside ``scaled_dot_product_attention`` on a CPU-only torch), with
  three CUDA behaviours put back: attention saves what FlashAttention-2 /
  memory-efficient attention save (:mod:`.sdpa`) rather than what the CPU kernel
  saves; every allocation is rounded up to 512 bytes as CUDA's caching allocator
  does; and torch's AdamW takes its multi-tensor (``foreach``) path, its default on
  CUDA, whose step holds one extra parameter-sized temporary.
* Not modelled: the CUDA context, cuBLAS workspaces (64 MiB on an H200 with torch
  2.11, allocated once per process), allocator fragmentation (``max_memory_reserved``
  minus ``max_memory_allocated``), and memory other processes or libraries take.

Checked against ``torch.cuda.max_memory_allocated`` on an H200 (torch 2.11, CUDA 13)
with ``benchmarks/gpu/gpu_validate_estimator.py``: the 60M and 350M pretraining recipes
(bf16-mixed, and 350M in bf16-true), baseline and CompAct n/4 in both modes, all
within 0.25%.

Command line (wired as ``lightning-compact estimate``)::

    lightning-compact estimate --config recipes/pretrain/llama_350m_c4.yaml
    lightning-compact estimate --model llama_7b --data.batch_size 4 --data.seq_len 2048 --trainer.precision bf16-true
    lightning-compact estimate --config recipes/pretrain/llama_1b_c4.yaml --budget 40GiB   # the planner (.planner.main)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compact._torch_private import fake_tensor_mode
from lightning_compact.layers import CompActConfig, CompActLinear, convert_to_compact, resolve_rank
from lightning_compact.memory.breakdown import MemoryBreakdown, StepMemory, format_bytes, format_table
from lightning_compact.memory.formula import LinearInputRecorder, Table1, table1
from lightning_compact.memory.recipe import ESTIMATOR_SHAPES, PRECISIONS, STRATEGIES, RunShape, llama_module, model_config, read_recipe
from lightning_compact.memory.sdpa import cuda_attention_memory
from lightning_compact.memory.sharded import (
    add_gradients,
    ddp_bucket_bytes,
    fake_process_group,
    shard_for_fsdp2,
    untracked_gloo_all_reduce,
)
from lightning_compact.memory.tracker import CUDA_ALLOCATION_ROUNDING, StepMemoryTracker

__all__ = [
    "DEFAULT_RANKS",
    "LEAN_OPTIONS",
    "MODES",
    "Estimate",
    "Variant",
    "build",
    "estimate",
    "estimate_variants",
    "forward_backward",
    "main",
    "parse_args",
    "ranks_and_modes",
    "recipe_variant",
    "run_estimate",
    "variants",
]

# The paper's pretraining ranks: fractions of each layer's input size.
DEFAULT_RANKS: tuple[float, ...] = (0.5, 0.25, 0.125)
# CompAct's two gradient modes: "compressed" (the paper's: Ĝ and Adam moments in r-space,
# CompActAdamW) and "decompressed" (full-size .grad, any optimizer): functional.GRAD_MODES.
MODES: tuple[str, ...] = ("compressed", "decompressed")


# apply_lean's options (lightning_compact.lean.apply_lean / LeanActivations), in label order.
LEAN_OPTIONS: tuple[str, ...] = ("norms", "mlp", "loss")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration to estimate.

    Attributes:
        rank: CompAct's rank, or ``None`` for no CompAct.
        mode: CompAct's gradient mode (:data:`MODES`).
        lean: which :data:`LEAN_OPTIONS` are on (``apply_lean``, as ``LeanActivations`` does).
        checkpointing: an activation-checkpointing granularity
            (:func:`~lightning_compact.memory.checkpointing_options.checkpointing_granularities`), or ``None``.
        name: a label to show instead of the generated one (``"recipe"``); not part of equality.
    """

    rank: int | float | None = None
    mode: str = "compressed"
    lean: tuple[str, ...] = ()
    checkpointing: str | None = None
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        unknown = sorted(set(self.lean) - set(LEAN_OPTIONS))
        if unknown:
            raise ValueError(f"lean options must be among {LEAN_OPTIONS}, got {unknown}")
        # One spelling per set, so equal configurations hash alike (the planner caches by Variant).
        object.__setattr__(self, "lean", tuple(o for o in LEAN_OPTIONS if o in self.lean))
        if self.checkpointing is not None:
            from lightning_compact.memory.checkpointing_options import get_checkpointing

            get_checkpointing(self.checkpointing)  # fail early, naming the known ones

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        parts = [] if self.rank is None else [f"CompAct {rank_label(self.rank)} {self.mode}"]
        if self.lean:
            parts.append("lean" if self.lean == LEAN_OPTIONS else f"lean {'+'.join(self.lean)}")
        if self.checkpointing is not None:
            parts.append(f"checkpointing {self.checkpointing}")
        return " + ".join(parts) or "baseline"


def rank_label(rank: int | float) -> str:
    """``0.25`` -> ``n/4``; ``0.3`` -> ``0.3n``; ``8`` -> ``r=8``."""
    if isinstance(rank, float):
        inverse = 1 / rank
        return f"n/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{rank:g}n"
    return f"r={rank}"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One variant's estimated step.

    Attributes:
        variant: what was estimated.
        step: per-category peak and per-category largest values.
        optimizer_state_bytes: bytes held in the optimizer's state after the step.
        table1: the paper's formula for the converted layers (``None`` for the baseline).
        parameters: number of model parameters.
        seconds: wall time of the estimate.
    """

    variant: Variant
    step: StepMemory
    optimizer_state_bytes: int
    table1: Table1 | None
    parameters: int
    seconds: float

    @property
    def peak(self) -> MemoryBreakdown:
        return self.step.peak


def _dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """``(parameter dtype, autocast dtype or None)`` of a Lightning precision."""
    bits, kind = precision.split("-")
    dtype = {"64": torch.float64, "32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}[bits]
    return (torch.float32, dtype) if kind == "mixed" else (dtype, None)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Build in the target dtype: `.to(dtype)` on a fake model would first make float32
    # tensors, then convert them.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(shape: RunShape, variant: Variant = Variant(), device: str | torch.device = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (in training mode) and optimizer of one variant, as the estimator runs them.

    Parameters are made directly in the precision's dtype on ``device``; CompAct
    variants are converted (the compressed mode gets ``CompActAdamW``), then the lean
    options are applied as ``LeanActivations`` would, then the checkpointing granularity.
    """
    llama = llama_module()
    param_dtype, _ = _dtypes(shape.precision)
    with _default_dtype(param_dtype), torch.device(device):
        model = llama.LlamaForCausalLM(model_config(shape.model, shape.config_overrides))
    model.train()
    optimizer: torch.optim.Optimizer | None = None
    if variant.rank is not None:
        extra = {} if shape.exclude_modules is None else {"exclude_modules": tuple(shape.exclude_modules)}
        compress = variant.mode == "compressed"
        config = CompActConfig(rank=variant.rank, grad_mode="compressed" if compress else "decompressed", **extra)
        convert_to_compact(model, config=config)
        if compress:
            from lightning_compact.optim import CompActAdamW

            optimizer = CompActAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    if variant.lean:
        from lightning_compact.lean import apply_lean

        apply_lean(model, **{option: option in variant.lean for option in LEAN_OPTIONS})
    if variant.checkpointing is not None:
        from lightning_compact.memory.checkpointing_options import get_checkpointing

        get_checkpointing(variant.checkpointing).apply(model)
    if optimizer is None:
        # torch's AdamW defaults to the multi-tensor path on CUDA and the per-tensor one on CPU.
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=shape.device_type == "cuda")
    return model, optimizer


@contextlib.contextmanager
def cuda_loss_chunks() -> Iterator[None]:
    """The chunked loss's CUDA chunk size while the estimator runs on the (fake) CPU device.

    On CPU the chunked lm_head + loss takes chunks of at least ``CPU_MIN_CHUNK`` tokens
    (a CPU speed rule); on CUDA it takes liger-kernel's rule (chunk logits about the size
    of the hidden states). The chunk's logits are transient, but at 350M they are tens
    of MiB, so the estimate of a CUDA run uses the CUDA rule. The backend is the torch
    one in both cases (a fake CPU tensor never selects liger-kernel or cut-cross-entropy);
    liger-kernel's fused kernel keeps the same two gradients for backward.
    """
    from lightning_compact.lean import cross_entropy

    previous = cross_entropy.CPU_MIN_CHUNK
    cross_entropy.CPU_MIN_CHUNK = 1
    try:
        yield
    finally:
        cross_entropy.CPU_MIN_CHUNK = previous


def forward_backward(model: nn.Module, input_ids: torch.Tensor, precision: str) -> None:
    """One micro-batch: the causal-LM loss under the precision's autocast, then its backward."""
    _, autocast_dtype = _dtypes(precision)
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(input_ids, labels=input_ids)
    loss.backward()


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    storages: dict[int, tuple[Any, int]] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                st = value.untyped_storage()
                storages.setdefault(id(st), (st, st.nbytes()))
    return sum(n for _, n in storages.values())


def _create_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Take one optimizer step on zero gradients: the state of a trained step, minus a forward and backward."""
    compressed_weights = {id(m.weight) for m in model.modules() if isinstance(m, CompActLinear) and m.weight_delta is not None}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in compressed_weights:  # those get their gradient through weight_delta
                p.grad = torch.zeros_like(p)  # a DTensor shard's gradient is one too
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def estimate(shape: RunShape, variant: Variant = Variant(), *, fake: bool = True) -> Estimate:
    """Estimate (``fake=True``) or measure (``fake=False``, real CPU tensors) one variant's step.

    Args:
        shape: model, batch (per rank), precision, device type, and for a multi-process
            run its ``world_size`` and ``strategy`` (the figures are then one rank's; see
            :mod:`.sharded`).
        variant: baseline or a CompAct rank and mode.
        fake: run on fake tensors (nothing allocated). ``False`` allocates everything on
            the CPU: for checking the estimate on small models (under ``"fsdp2"``, inside an
            initialised process group of ``world_size`` ranks).

    Raises:
        MemTrackerUnavailable: torch lacks the accounting API.
        ValueError: an unknown model or precision.
    """
    if not fake and shape.device_type != "cpu":
        raise ValueError("a real (fake=False) step runs on the CPU: use device_type='cpu'")
    world_size, strategy = shape.world_size, shape.strategy
    start = time.perf_counter()
    cuda = shape.device_type == "cuda"
    with contextlib.ExitStack() as stack:
        mesh = None
        if strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            if fake:
                stack.enter_context(fake_process_group(world_size))
            elif not (torch.distributed.is_initialized() and torch.distributed.get_world_size() == world_size):
                raise RuntimeError(f"a real (fake=False) fsdp2 step needs an initialised process group of {world_size}")
            mesh = init_device_mesh("cpu", (world_size,))  # outside FakeTensorMode: the mesh reads real ranks
            if not fake:
                stack.enter_context(untracked_gloo_all_reduce())
        if fake:
            stack.enter_context(fake_tensor_mode()())
        if cuda:
            stack.enter_context(cuda_attention_memory())
            stack.enter_context(cuda_loss_chunks())
        model, optimizer = build(shape, variant)
        if mesh is not None:
            shard_for_fsdp2(model, optimizer, mesh)
        vocab = model.config.vocab_size
        input_ids = torch.randint(0, vocab, (shape.batch_size, shape.seq_len))
        recorder = LinearInputRecorder(model)

        def micro_batch(record: bool = False) -> None:
            with recorder if record else contextlib.nullcontext():
                forward_backward(model, input_ids, shape.precision)

        def optimizer_step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _create_optimizer_state(model, optimizer)
        round_to = CUDA_ALLOCATION_ROUNDING if cuda else 1
        with StepMemoryTracker(modules=[model], optimizers=[optimizer], tensors=[input_ids], round_to=round_to) as tracker:
            micro_batch(record=True)
            if shape.accumulate_grad_batches > 1:
                tracker.next_forward()
                micro_batch()  # runs with the previous micro-batch's gradients alive
            optimizer_step()
        step = tracker.result()
        if strategy == "ddp":
            step = add_gradients(step, ddp_bucket_bytes(model))
        formula = table1(model, recorder) if variant.rank is not None else None
        state_bytes = _state_bytes(optimizer)
        n_params = sum(p.numel() for p in model.parameters())
    return Estimate(variant, step, state_bytes, formula, n_params, time.perf_counter() - start)


def variants(ranks: Sequence[int | float] = DEFAULT_RANKS, modes: Sequence[str] = MODES) -> list[Variant]:
    """The baseline, then each rank in each mode."""
    return [Variant(), *(Variant(rank, mode) for rank in ranks for mode in modes)]


def recipe_variant(shape: RunShape) -> Variant:
    """The recipe exactly as configured (its CompAct rank and mode, lean options, checkpointing), labelled ``"recipe"``."""
    return Variant(shape.compact_rank, shape.grad_mode, shape.lean, shape.checkpointing, name="recipe")


def estimate_variants(shape: RunShape, chosen: Sequence[Variant], *, progress: bool = False) -> list[Estimate]:
    """:func:`estimate` for each variant, in order."""
    results = []
    for variant in chosen:
        result = estimate(shape, variant)
        if progress:
            print(f"  {variant.label}: peak {format_bytes(result.peak.total)} GiB ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
        results.append(result)
    return results


def describe(shape: RunShape) -> str:
    """One line naming the run."""
    overrides = f" {shape.config_overrides}" if shape.config_overrides else ""
    ranks = f" · per rank of {shape.world_size} ({shape.strategy})" if shape.strategy is not None else ""
    return (
        f"{shape.model}{overrides} · batch {shape.batch_size} × seq {shape.seq_len} · {shape.precision} · "
        f"accumulate {shape.accumulate_grad_batches} · device {shape.device_type}{ranks}"
    )


def startup_note(shape: RunShape, n_params: int, units: str = "GiB") -> str:
    """What each rank allocates before its first step: the whole model in host memory, or (``empty_init``) its shard."""
    whole = format_bytes(4 * n_params, units)  # CausalLMModule builds in float32 before precision applies
    if shape.strategy == "fsdp2" and shape.empty_init:
        return (f"Start-up: built on meta (empty_init), each rank allocates only its shard, on its device "
                f"({format_bytes(4 * n_params // shape.world_size, units)} {units} in float32); no rank holds the "
                f"whole model ({whole} {units}).")
    hint = " Set `model.init_args.empty_init: true` to build on meta and allocate shards only." \
        if shape.strategy == "fsdp2" else ""
    return f"Start-up: each rank first builds the whole model in host memory ({whole} {units} in float32).{hint}"


def report(shape: RunShape, results: Sequence[Estimate], units: str = "GiB") -> str:
    """The breakdown table, then Table 1's savings beside the measured ones."""
    n_params = results[0].parameters if results else 0
    lines = [f"Estimated peak memory of one training step: {describe(shape)} ({n_params / 1e6:.1f}M parameters)", ""]
    rows = {r.variant.label: r.peak for r in results}
    base = next((r for r in results if r.variant == Variant()), None)
    lines.append(format_table(rows, units, baseline=base.variant.label if base else None))
    lines += ["", "Categories at the moment of the peak; storages shared by several tensors counted once."]
    if shape.world_size > 1:
        lines += ["", startup_note(shape, n_params, units)]
    # Table 1 covers CompAct alone: rows that also change other activations are left out.
    compact = [r for r in results if r.table1 is not None and not r.variant.lean and r.variant.checkpointing is None]
    if base is not None and compact:
        lines += ["", f"Savings against the baseline ({units}): paper's Table 1 formula / measured here", ""]
        header = ["", "gradients", "optimizer states", "linear inputs"]
        body = [header]
        for r in compact:
            formula = r.table1.savings()
            measured = {
                # Gradients are all alive at the end of the backward, activations at the end of
                # the forward: compare each at its own largest, not at the total peak.
                "gradients": base.step.largest.gradients - r.step.largest.gradients,
                "optimizer_states": base.optimizer_state_bytes - r.optimizer_state_bytes,
                "activations": base.step.largest.activations - r.step.largest.activations,
            }
            body.append([r.variant.label] + [f"{format_bytes(formula[k], units)} / {format_bytes(measured[k], units)}" for k in measured])
        widths = [max(len(row[i]) for row in body) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
        lines += [
            "",
            "Formula: gradients m·n -> m·r and Adam moments 2·m·n -> 2·m·r per converted weight (compressed mode",
            "only), linear inputs b·l·n (once per distinct input, or per layer where autocast casts it) -> b·l·r",
            "per converted layer. Measured gradients",
            "and activations are each category's largest over the step; optimizer states are the optimizer's tensors.",
        ]
    return "\n".join(lines)


def to_json(shape: RunShape, results: Sequence[Estimate]) -> dict[str, Any]:
    """Everything :func:`report` shows, in bytes."""
    return {
        "shape": dataclasses.asdict(shape),
        "torch": torch.__version__,
        "results": [
            {
                "label": r.variant.label,
                "rank": r.variant.rank,
                "mode": None if r.variant.rank is None else r.variant.mode,
                "lean": list(r.variant.lean),
                "checkpointing": r.variant.checkpointing,
                "peak": r.peak.as_dict(),
                "largest": r.step.largest.as_dict(),
                "optimizer_state_bytes": r.optimizer_state_bytes,
                "table1": dataclasses.asdict(r.table1) if r.table1 else None,
                "parameters": r.parameters,
                "seconds": r.seconds,
            }
            for r in results
        ],
    }


def _rank(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or an int >= 1, got {text!r}") from None
    rank: int | float = value if ("." in text or "e" in text.lower() or value < 1) else int(value)
    try:
        resolve_rank(rank, in_features=2)  # the one place ranks are validated
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"invalid rank {text!r}: {err}") from None
    return rank


def _override(text: str) -> tuple[str, int | float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    number = float(value)
    return key, int(number) if number.is_integer() and "." not in value else number


# Spellings before the flags took the recipe's keys (``--data.batch_size`` as in ``fit``);
# still accepted, with a message. Old spelling -> new one.
DEPRECATED_FLAGS: dict[str, str] = {
    "--config-overrides": "--model.config_overrides",
    "--rank": "--compact.rank",
    "--batch-size": "--data.batch_size",
    "--seq-len": "--data.seq_len",
    "--precision": "--trainer.precision",
    "--accumulate-grad-batches": "--trainer.accumulate_grad_batches",
    "--device-type": "--trainer.accelerator",
    "--no-plot": "--no_plot",
}
# --trainer.accelerator as a recipe spells it -> the device type modelled (cf. memory.recipe.read_recipe).
_ACCELERATORS = {"cpu": "cpu", "cuda": "cuda", "gpu": "cuda", "auto": "cuda"}


def _accelerator(text: str) -> str:
    if text.lower() not in _ACCELERATORS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(_ACCELERATORS)}, got {text!r}")
    return _ACCELERATORS[text.lower()]


def upgrade_flags(argv: Sequence[str], warn: Any = None) -> list[str]:
    """``argv`` with every :data:`DEPRECATED_FLAGS` spelling replaced; ``warn(message)`` is told of each."""
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if flag in DEPRECATED_FLAGS:
            if warn is not None:
                warn(f"`{flag}` is deprecated and will be removed; use `{DEPRECATED_FLAGS[flag]}`")
            arg = DEPRECATED_FLAGS[flag] + sep + value
        out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-compact estimate`` arguments, named like the recipe keys they override."""
    parser = argparse.ArgumentParser(
        prog="lightning-compact estimate",
        description=(
            "Estimate the peak memory of one training step, by category, for the baseline and CompAct, "
            "without a GPU (the step runs on fake tensors). Flags override the recipe key of the same name, "
            "as in `lightning-compact fit`."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="a lightning-compact YAML recipe (model, batch, seq, precision)")
    source.add_argument("--model", help="a LLaMA shape instead of a recipe: a preset (llama_60m, llama_130m, llama_350m, "
                        f"llama_1b, llama_7b){''.join(', ' + name for name in ESTIMATOR_SHAPES)}")
    parser.add_argument("--model.config_overrides", dest="config_overrides", nargs="+", type=_override, default=[],
                        metavar="KEY=VALUE", help="LlamaConfig fields to change, e.g. num_hidden_layers=4")
    parser.add_argument("--compact.rank", dest="rank", nargs="+", type=_rank, default=None, metavar="RANK",
                        help="CompAct ranks to compare: fractions of each layer's input (0.25 = n/4) or ints "
                             "(default: 0.5 0.25 0.125 and the recipe's)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="CompAct gradient modes to estimate")
    parser.add_argument("--data.batch_size", dest="batch_size", type=int, metavar="N",
                        help="sequences per micro-batch (recipe: data.init_args.batch_size)")
    parser.add_argument("--data.seq_len", dest="seq_len", type=int, metavar="N",
                        help="tokens per sequence (recipe: data.init_args.seq_len)")
    parser.add_argument("--trainer.precision", dest="precision", choices=PRECISIONS, help="Lightning precision (recipe: trainer.precision)")
    parser.add_argument("--trainer.accumulate_grad_batches", dest="accumulate_grad_batches", type=int, metavar="N",
                        help="micro-batches per step (recipe: trainer.accumulate_grad_batches)")
    parser.add_argument("--trainer.accelerator", dest="device_type", type=_accelerator, metavar="{cpu,gpu,cuda}",
                        help="kernels and allocator to model: cpu, or cuda for gpu/cuda/auto (recipe: trainer.accelerator)")
    parser.add_argument("--world-size", dest="world_size", type=int, metavar="N",
                        help="processes of the run; figures are per rank (recipe: trainer.devices x trainer.num_nodes)")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="ddp or fsdp2 (ModelParallelStrategy) for --world-size > 1 (recipe: trainer.strategy)")
    parser.add_argument("--units", default="GiB", choices=("GiB", "GB", "MiB", "MB"), help="units of the table")
    parser.add_argument("--plot", type=Path, default=Path("memory_estimate.png"), help="bar chart to write (PNG)")
    parser.add_argument("--no_plot", action="store_true", help="do not write the chart")
    parser.add_argument("--json", type=Path, help="also write the figures (bytes) as JSON here")
    planner = parser.add_argument_group(
        "planner", "With --budget: search CompAct rank and mode, lean activations, checkpointing and the micro-batch "
        "(keeping the global batch through gradient accumulation) for the fastest configuration that fits, and print "
        "it as YAML and flags (lightning_compact.memory.planner states the cost model)."
    )
    planner.add_argument("--budget", help="device memory to fit, e.g. 24GiB, 40GB (a bare number is GiB)")
    planner.add_argument("--plan.lean", dest="plan_lean", choices=("both", "on", "off"), default="both",
                         help="try lean activations (LeanActivations) on, off or both (default both)")
    planner.add_argument("--plan.checkpointing", dest="plan_checkpointing", nargs="+", metavar="GRANULARITY",
                         help="checkpointing to try: none and/or granularities (default: none and every registered one)")
    planner.add_argument("--plan.micro_batches", dest="plan_micro_batches", nargs="+", type=int, metavar="N",
                         help="micro-batch sizes to consider (default: every divisor of the global batch)")
    planner.add_argument("--plan.headroom", dest="plan_headroom", type=float, default=0.05,
                         help="fraction of the budget left free for the CUDA context, workspaces and fragmentation (default 0.05)")
    return parser


def shape_from_args(args: argparse.Namespace) -> RunShape:
    """The recipe's (or preset's) :class:`RunShape` with the command-line overrides applied."""
    if args.config is not None:
        shape = read_recipe(args.config)
    else:
        shape = RunShape(model=args.model, batch_size=8, seq_len=256, precision="bf16-mixed", device_type="cuda")
    changes: dict[str, Any] = {}
    if args.config_overrides:
        changes["config_overrides"] = {**shape.config_overrides, **dict(args.config_overrides)}
    if args.world_size is not None and args.strategy is None and shape.strategy is None and args.world_size > 1:
        changes["strategy"] = "ddp"  # Lightning's default for several devices
    for name in ("batch_size", "seq_len", "precision", "accumulate_grad_batches", "device_type", "world_size", "strategy"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    shape = dataclasses.replace(shape, **changes)
    model_config(shape.model, shape.config_overrides)  # fail early on an unknown model or field
    return shape


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace, RunShape]:
    """``lightning-compact estimate``'s arguments (deprecated spellings upgraded) and the run's :class:`RunShape`."""
    parser = build_parser()
    argv = upgrade_flags(sys.argv[1:] if argv is None else argv, lambda msg: print(f"{parser.prog}: {msg}", file=sys.stderr))
    args = parser.parse_args(argv)
    try:
        shape = shape_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return parser, args, shape


def ranks_and_modes(args: argparse.Namespace, shape: RunShape) -> tuple[list[int | float], list[str]]:
    """The ranks (default: :data:`DEFAULT_RANKS` and the recipe's) and gradient modes the command compares."""
    ranks = args.rank
    if ranks is None:
        ranks = list(DEFAULT_RANKS)
        if shape.compact_rank is not None and shape.compact_rank not in ranks:
            ranks.append(shape.compact_rank)
    return ranks, list(dict.fromkeys(args.modes))


def run_estimate(args: argparse.Namespace, shape: RunShape) -> int:
    """Estimate every variant the arguments name; print the table, write the chart (and JSON)."""
    ranks, modes = ranks_and_modes(args, shape)
    chosen = variants(ranks, modes)
    if args.config is not None:
        chosen.append(recipe_variant(shape))  # the recipe as configured: CompAct, lean options, checkpointing
    print(f"Estimating {describe(shape)} ...", file=sys.stderr, flush=True)
    results = estimate_variants(shape, chosen, progress=True)
    print(report(shape, results, args.units))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(shape, results), indent=2))
        print(f"\nwrote {args.json}")
    if not args.no_plot:
        from lightning_compact.memory.plot import plot_breakdowns

        try:
            plot_breakdowns({r.variant.label: r.peak for r in results}, args.plot, title=describe(shape), units=args.units)
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib is not installed: no chart written (pip install matplotlib)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Estimate without planning (``--budget`` belongs to :func:`lightning_compact.memory.planner.main`,
    which ``lightning-compact estimate`` runs). Returns the exit code."""
    parser, args, shape = parse_args(argv)
    if args.budget is not None:
        # The planner builds on this module, never the other way round.
        parser.error("--budget runs the planner: use `lightning-compact estimate` or lightning_compact.memory.planner.main")
    return run_estimate(args, shape)


if __name__ == "__main__":
    sys.exit(main())
