"""A memory planner: the fastest configuration of a recipe that fits a memory budget.

``lightning-compact estimate --config RECIPE --budget 40GiB`` searches, with the
FakeTensor estimator (:func:`~lightning_compact.memory.estimator.estimate`), over

* CompAct: off, or each rank in each gradient mode (``--compact.rank``, ``--modes``);
* lean activations: off or all three options (``LeanActivations``; ``--plan.lean``);
* activation checkpointing: none or each registered granularity
  (:mod:`~lightning_compact.memory.checkpointing_options`; ``--plan.checkpointing``);
* the micro-batch: each divisor of the recipe's global batch (``batch_size x
  accumulate_grad_batches`` sequences per optimizer step), with gradient accumulation
  making up the rest, so the optimizer sees the same batch,

and prints the configuration with the lowest modelled step time whose estimated peak
fits the budget (less a headroom), as YAML and as command-line flags, with the table of
what it tried.

**Cost model** (:class:`CostModel`), the step time of one optimizer step relative to the
baseline running the whole global batch as one micro-batch::

    cost = F(CompAct) x F(lean) x F(checkpointing) x (b·N·T + k·a·L) / (b·N·T + a·L)

* ``F``: measured step-time factors against the baseline (``STEP_TIME_FACTORS``, each with
  its source in benchmarks/RESULTS.md). Checkpointing recomputes every matmul of a block
  (1.263x); the lean ops recompute no matmul (1.00x assumed: not measured on a GPU).
* the last term: ``k`` micro-batches of the global batch's ``T`` tokens each cost a fixed
  host/launch time ``a`` per decoder layer (``L`` layers) on top of compute ``b`` per
  token per parameter (``N`` parameters). ``a`` and ``b`` come from two H200 measurements
  of the LLaMA-350M baseline (bf16-mixed): 86,316 tokens/s at 32 x 256 (RESULTS "Step time and
  throughput") and 98,912 tokens/s at 128 x 256 (RESULTS "Peak memory and step time against the
  other methods"): ``t = 16.1 ms + 9.62 µs/token`` per micro-batch,
  i.e. ``a = 0.67 ms`` per layer and ``b = 2.61e-14 s`` per token per parameter. Two
  harnesses (Lightning, a plain loop) and one model: a coarse model, stated as such.

**Search** (cheap by construction): configurations are visited from the lowest factor
up; one whose factor alone cannot beat the best cost found is not estimated; for the
others the largest micro-batch that fits is found by bisection over the divisors (peak
memory grows with the micro-batch), trying only micro-batches that could still beat the
best; every estimate is cached.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning_compact.memory.breakdown import format_bytes
from lightning_compact.memory.checkpointing_options import checkpointing_granularities, get_checkpointing
from lightning_compact.memory.estimator import (
    LEAN_OPTIONS,
    MODES,
    Estimate,
    Variant,
    describe,
    estimate,
    parse_args,
    ranks_and_modes,
    run_estimate,
)
from lightning_compact.memory.recipe import RunShape, model_config

__all__ = ["CostModel", "Plan", "PlanError", "Trial", "main", "parse_size", "plan", "plan_report", "plan_to_json"]

GIB = 2**30

# Step time relative to the baseline (same model, batch and precision), with their sources.
# CompAct's: benchmarks/RESULTS.md "Peak memory and step time against the other methods" (H200),
# LLaMA-350M, 128 x 256, bf16-mixed, one harness for every method (before the fused projection kernel).
STEP_TIME_FACTORS: dict[tuple[float, str], float] = {
    (0.25, "compressed"): 1.254,
    (0.25, "decompressed"): 1.101,
    (0.125, "compressed"): 1.235,
    (0.125, "decompressed"): 1.054,
}
LEAN_FACTOR = 1.00  # no matmul recomputed; CPU 0.78-0.85x idle (RESULTS "Lean activations"); GPU unmeasured
# The fixed cost of one micro-batch per decoder layer, and compute per token per parameter
# (see the module docstring): from 86,316 tok/s at 8,192 tokens and 98,912 tok/s at 32,768.
MICRO_BATCH_SECONDS_PER_LAYER = 0.0161 / 24
SECONDS_PER_TOKEN_PER_PARAMETER = 9.618e-6 / 368_174_080


class PlanError(ValueError):
    """No configuration fits the budget; the message says what to try."""


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Modelled step time of a configuration, relative to the baseline at one micro-batch per step."""

    compact: dict[tuple[float, str], float] = dataclasses.field(default_factory=lambda: dict(STEP_TIME_FACTORS))
    lean: float = LEAN_FACTOR
    micro_batch_seconds_per_layer: float = MICRO_BATCH_SECONDS_PER_LAYER
    seconds_per_token_per_parameter: float = SECONDS_PER_TOKEN_PER_PARAMETER

    def compact_factor(self, rank: int | float | None, mode: str) -> float:
        if rank is None:
            return 1.0
        if (rank, mode) in self.compact:
            return self.compact[(rank, mode)]
        # Unmeasured rank (n/2, an absolute rank): the slowest measured rank of that mode.
        return max(f for (_, m), f in self.compact.items() if m == mode)

    def factor(self, variant: Variant) -> float:
        """The configuration's step-time factor, at equal micro-batches."""
        f = self.compact_factor(variant.rank, variant.mode)
        if variant.lean:
            f *= self.lean
        if variant.checkpointing is not None:
            f *= get_checkpointing(variant.checkpointing).step_time_factor
        return f

    def accumulation(self, micro_batches: int, tokens: int, parameters: int, layers: int) -> float:
        """Time of ``micro_batches`` micro-batches over ``tokens`` tokens, relative to one micro-batch."""
        compute = self.seconds_per_token_per_parameter * parameters * tokens
        fixed = self.micro_batch_seconds_per_layer * layers
        return (compute + micro_batches * fixed) / (compute + fixed)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One estimate the planner ran (or skipped)."""

    variant: Variant
    micro_batch: int
    accumulate: int
    peak: int | None
    fits: bool
    cost: float
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's answer: the pick and everything tried."""

    shape: RunShape
    budget: int
    limit: int
    global_batch: int
    pick: Trial
    trials: list[Trial]


def parse_size(text: str) -> int:
    """``"24GiB"``, ``"40 GB"``, ``"512MiB"``, ``"24"`` (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 24GiB, 40GB or 512MiB")
    value, unit = float(match.group(1)), (match.group(2) or "GiB")
    prefix = "KMGT".index(unit[0].upper()) + 1
    base = 1024 if "i" in unit.lower() else 1000
    return int(value * base**prefix)


def _divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, int(math.isqrt(n)) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


def _no_more_memory(u: Variant, v: Variant) -> bool:
    """Whether ``u`` needs no more memory than ``v`` at the same micro-batch (a partial order, assumed:
    a smaller fractional rank, compressed over decompressed, more lean options, checkpointing over none)."""
    ru, rv = (1.0 if x.rank is None else x.rank for x in (u, v))
    if isinstance(ru, int) or isinstance(rv, int):
        if u.rank != v.rank:
            return False  # absolute ranks do not compare with fractions
    elif ru > rv:
        return False
    if u.rank is not None and v.rank is not None and u.mode != v.mode and u.mode != "compressed":
        return False
    if not set(v.lean) <= set(u.lean):
        return False
    return u.checkpointing == v.checkpointing or (v.checkpointing is None and u.checkpointing is not None)


def _complexity(v: Variant) -> int:
    return (v.rank is not None) + bool(v.lean) + (v.checkpointing is not None)


def plan(
    shape: RunShape,
    budget: int,
    *,
    ranks: Sequence[int | float] = (0.5, 0.25, 0.125),
    modes: Sequence[str] = MODES,
    lean: Sequence[bool] = (False, True),
    checkpointing: Sequence[str | None] | None = None,
    micro_batches: Sequence[int] | None = None,
    headroom: float = 0.05,
    cost_model: CostModel = CostModel(),
    estimator: Callable[[RunShape, Variant], Estimate] = estimate,
    progress: bool = False,
) -> Plan:
    """The fastest configuration of ``shape`` whose estimated peak is at most ``budget x (1 - headroom)``.

    Args:
        shape: the recipe; its ``batch_size x accumulate_grad_batches`` is the global batch kept.
        budget: bytes of device memory.
        ranks: CompAct ranks to try (CompAct off is always tried).
        modes: CompAct gradient modes to try.
        lean: lean activations off and/or on.
        checkpointing: granularities to try (``None``: none); default none and every registered one.
        micro_batches: micro-batch sizes to consider (default: the global batch's divisors).
        headroom: fraction of the budget kept free for what the estimator does not count
            (CUDA context, cuBLAS workspaces, allocator fragmentation).
        cost_model: the step-time model.
        estimator: ``(shape, variant) -> Estimate`` (tests pass a cheaper one).

    Raises:
        PlanError: nothing fits; the message names the smallest estimate and what to try.
    """
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if checkpointing is None:
        checkpointing = [None, *checkpointing_granularities()]
    limit = int(budget * (1 - headroom))
    global_batch = shape.batch_size * shape.accumulate_grad_batches
    sizes = sorted({m for m in (micro_batches or _divisors(global_batch)) if global_batch % m == 0}, reverse=True)
    if not sizes:
        raise ValueError(f"no micro-batch in {list(micro_batches or [])} divides the global batch {global_batch}")
    config = model_config(shape.model, shape.config_overrides)
    tokens = global_batch * shape.seq_len
    parameters: int | None = None

    compact = [(None, "compressed")] + [(r, m) for r in ranks for m in modes]
    candidates = {
        Variant(r, m, LEAN_OPTIONS if on else (), c) for r, m in compact for on in lean for c in checkpointing
    }
    ordered = sorted(candidates, key=lambda v: (cost_model.factor(v), _complexity(v), v.label))

    cache: dict[tuple[Variant, int], Trial] = {}
    trials: list[Trial] = []
    best: Trial | None = None

    def cost(v: Variant, m: int) -> float:
        n = parameters if parameters is not None else 0
        return cost_model.factor(v) * cost_model.accumulation(global_batch // m, tokens, n, config.num_hidden_layers)

    def implied_too_big(v: Variant, m: int) -> Trial | None:
        # A configuration needing no more memory was too big at this or a smaller micro-batch.
        return next((t for t in trials if t.peak is not None and not t.fits and t.micro_batch <= m
                     and _no_more_memory(t.variant, v)), None)

    def run(v: Variant, m: int) -> Trial:
        nonlocal parameters
        if (v, m) not in cache and (reason := implied_too_big(v, m)) is not None:
            cache[(v, m)] = Trial(v, m, global_batch // m, None, False, cost(v, m),
                                  f"too big: {reason.variant.label} was at micro-batch {reason.micro_batch}")
            trials.append(cache[(v, m)])
        if (v, m) not in cache:
            k = global_batch // m
            result = estimator(dataclasses.replace(shape, batch_size=m, accumulate_grad_batches=k), v)
            parameters = parameters or result.parameters
            trial = Trial(v, m, k, result.peak.total, result.peak.total <= limit, cost(v, m))
            if progress:
                verdict = "fits" if trial.fits else "too big"
                print(f"  {v.label}, micro-batch {m} x {k}: {format_bytes(trial.peak)} GiB, {verdict} "
                      f"({result.seconds:.1f} s)", file=sys.stderr, flush=True)
            cache[(v, m)] = trial
            trials.append(trial)
        return cache[(v, m)]

    for variant in ordered:
        if parameters is None:
            run(variant, sizes[-1])  # the first estimate also gives the parameter count
        # Only micro-batches that could beat the best so far are worth an estimate.
        useful = [m for m in sizes if best is None or cost(variant, m) < best.cost - 1e-12]
        if not useful:
            trials.append(Trial(variant, 0, 0, None, False, cost_model.factor(variant), "skipped: its factor cannot beat the pick"))
            continue
        # Bisection for the largest fitting micro-batch (peaks grow with the micro-batch).
        if not run(variant, useful[-1]).fits:
            continue
        lo, hi = 0, len(useful) - 1  # useful[hi] fits; find the smallest index that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if run(variant, useful[mid]).fits:
                hi = mid
            else:
                lo = mid + 1
        found = run(variant, useful[hi])
        if best is None or found.cost < best.cost - 1e-12:
            best = found
    if best is None:
        raise PlanError(_nothing_fits(shape, budget, limit, trials, lean, checkpointing, ranks))
    trials = [dataclasses.replace(t, cost=cost(t.variant, t.micro_batch)) if t.micro_batch else t for t in trials]
    pick = next(t for t in trials if t.variant == best.variant and t.micro_batch == best.micro_batch)
    return Plan(shape, budget, limit, global_batch, dataclasses.replace(pick, note="pick"), trials)


def _nothing_fits(shape: RunShape, budget: int, limit: int, trials: list[Trial], lean: Sequence[bool],
                  checkpointing: Sequence[str | None], ranks: Sequence[int | float]) -> str:
    smallest = min((t for t in trials if t.peak is not None), key=lambda t: t.peak)
    tips = []
    if True not in lean:
        tips.append("lean activations (--plan.lean both)")
    if not any(c is not None for c in checkpointing):
        tips.append("activation checkpointing (--plan.checkpointing none blocks)")
    fractions = [r for r in ranks if isinstance(r, float)]
    if not fractions or min(fractions) > 0.0625:
        tips.append("a smaller CompAct rank (--compact.rank 0.0625)")
    tips += [
        f"a larger budget (at least {format_bytes(smallest.peak / (limit / budget))} GiB with this headroom)",
        f"a shorter sequence (--data.seq_len, now {shape.seq_len})",
        "a smaller --plan.headroom" if limit < budget else "",
        "bf16-true precision (--trainer.precision bf16-true)" if shape.precision != "bf16-true" else "",
        "more GPUs (each holds a share of the global batch)",
    ]
    return (
        f"nothing fits {format_bytes(budget)} GiB (estimated peak at most {format_bytes(limit)} GiB after the headroom): "
        f"the smallest estimate was {format_bytes(smallest.peak)} GiB ({smallest.variant.label}, micro-batch "
        f"{smallest.micro_batch} x {smallest.accumulate} accumulated). Try: " + "; ".join(t for t in tips if t) + "."
    )


def _yaml_and_flags(plan_: Plan) -> tuple[str, str]:
    pick, v = plan_.pick, plan_.pick.variant
    yaml = ["trainer:", f"  accumulate_grad_batches: {pick.accumulate}"]
    flags = [f"--data.batch_size {pick.micro_batch}", f"--trainer.accumulate_grad_batches {pick.accumulate}"]
    if v.lean or v.checkpointing is not None:
        args = ", ".join(f"{o}: {str(o in v.lean).lower()}" for o in LEAN_OPTIONS)
        if v.checkpointing is not None:
            args += f", checkpointing: {v.checkpointing}"
        yaml += ["  callbacks:  # add to the recipe's callbacks", "    - class_path: lightning_compact.LeanActivations",
                 f"      init_args: {{{args}}}"]
        flags.append("--trainer.callbacks+=lightning_compact.LeanActivations")
        flags += [f"--trainer.callbacks.init_args.{o} false" for o in LEAN_OPTIONS if o not in v.lean]
        if v.checkpointing is not None:
            flags.append(f"--trainer.callbacks.init_args.checkpointing {v.checkpointing}")
    yaml += ["data:", "  init_args:", f"    batch_size: {pick.micro_batch}", "compact:"]
    if v.rank is None:
        yaml.append("  enabled: false")
        flags.append("--compact.enabled false")
    else:
        yaml += ["  enabled: true", f"  rank: {v.rank}", f"  grad_mode: {v.mode}"]
        flags += [f"--compact.rank {v.rank}", f"--compact.grad_mode {v.mode}"]
    return "\n".join(yaml), " ".join(flags)


def plan_report(plan_: Plan, units: str = "GiB") -> str:
    """The table of trials, then the pick as YAML and flags."""
    s = plan_.shape
    lines = [
        f"Plan for {describe(s)} within {format_bytes(plan_.budget, units)} {units} "
        f"(estimated peak at most {format_bytes(plan_.limit, units)} {units}: headroom for the CUDA context, "
        "workspaces and fragmentation)",
        f"Global batch kept: {plan_.global_batch} sequences per optimizer step (recipe: {s.batch_size} x {s.accumulate_grad_batches}).",
        "",
    ]
    header = ["configuration", "micro-batch", "accum", f"peak {units}", "fits", "cost", ""]
    rows = [header]
    for t in plan_.trials:
        if t.peak is None and t.micro_batch:
            rows.append([t.variant.label, str(t.micro_batch), str(t.accumulate), "-", "no", f"{t.cost:.3f}", t.note])
        elif t.peak is None:
            rows.append([t.variant.label, "-", "-", "-", "-", f"≥{t.cost:.3f}", t.note])
        else:
            note = "<- pick" if (t.variant, t.micro_batch) == (plan_.pick.variant, plan_.pick.micro_batch) else t.note
            rows.append([t.variant.label, str(t.micro_batch), str(t.accumulate), format_bytes(t.peak, units),
                         "yes" if t.fits else "no", f"{t.cost:.3f}", note])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    pick = plan_.pick
    yaml, flags = _yaml_and_flags(plan_)
    lines += [
        "",
        "cost: modelled step time relative to the baseline with the whole global batch in one micro-batch",
        "(step-time factors measured on an H200 x per-micro-batch overhead; see lightning_compact.memory.planner).",
        "",
        f"Pick: {pick.variant.label}, micro-batch {pick.micro_batch} x {pick.accumulate} accumulated: "
        f"estimated peak {format_bytes(pick.peak, units)} {units}, cost {pick.cost:.3f}"
        + (" (recomputes matmuls)" if pick.variant.checkpointing and get_checkpointing(pick.variant.checkpointing).recomputes_matmuls else ""),
        "",
        "YAML (merge into the recipe):",
        yaml,
        "",
        "Flags:",
        flags,
    ]
    if pick.variant.checkpointing is not None:
        lines += ["", "Checkpointing in training needs LeanActivations(checkpointing=...) (lightning_compact.checkpointing)."]
    return "\n".join(lines)


def plan_to_json(plan_: Plan) -> dict[str, Any]:
    """The plan in bytes, for ``--json``."""
    def trial(t: Trial) -> dict[str, Any]:
        v = t.variant
        return {"label": v.label, "rank": v.rank, "mode": None if v.rank is None else v.mode, "lean": list(v.lean),
                "checkpointing": v.checkpointing, "micro_batch": t.micro_batch, "accumulate": t.accumulate,
                "peak": t.peak, "fits": t.fits, "cost": t.cost, "note": t.note}

    yaml, flags = _yaml_and_flags(plan_)
    return {"shape": dataclasses.asdict(plan_.shape), "budget": plan_.budget, "limit": plan_.limit,
            "global_batch": plan_.global_batch, "pick": trial(plan_.pick), "yaml": yaml, "flags": flags,
            "trials": [trial(t) for t in plan_.trials]}


def main(argv: list[str] | None = None) -> int:
    """``lightning-compact estimate``: the estimator's table, or with ``--budget`` the plan. Returns the exit code.

    Exit status 1 when nothing fits the budget (the message says what to try).
    """
    parser, args, shape = parse_args(argv)
    if args.budget is None:
        return run_estimate(args, shape)
    ranks, modes = ranks_and_modes(args, shape)
    try:
        budget = parse_size(args.budget)
        granularities = None if args.plan_checkpointing is None else [None if g == "none" else g for g in args.plan_checkpointing]
        lean = {"both": (False, True), "on": (True,), "off": (False,)}[args.plan_lean]
        print(f"Planning {describe(shape)} within {args.budget} ...", file=sys.stderr, flush=True)
        result = plan(shape, budget, ranks=ranks, modes=modes, lean=lean, checkpointing=granularities,
                      micro_batches=args.plan_micro_batches, headroom=args.plan_headroom, progress=True)
    except PlanError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        parser.error(str(err))
    print(plan_report(result, args.units))
    if args.json is not None:
        args.json.write_text(json.dumps(plan_to_json(result), indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
