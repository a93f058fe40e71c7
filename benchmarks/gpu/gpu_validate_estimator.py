"""On a GPU: is the no-GPU estimator right? Estimated total vs ``torch.cuda.max_memory_allocated``.

For each recipe (default: the paper's 60M and 350M pretraining recipes) and each
variant of the chosen sets (``--variants``; default ``paper``: baseline, CompAct n/4 in
both gradient modes; ``lean``: lean activations alone, with CompAct n/8 and with block
checkpointing of all or half the blocks; ``recipe``: the recipe exactly as configured,
e.g. a planner's pick pasted with ``--batch-size``/``--accumulate``), this script

1. estimates the step on fake CPU tensors with ``device_type="cuda"``
   (:func:`lightning_compact.memory.estimator.estimate`), then
2. runs the same model, optimizer, precision, batch and accumulation on the GPU: one
   warm-up step, ``reset_peak_memory_stats``, then the measured step (two micro-batches
   when the recipe accumulates, then the optimizer step), and reads
   ``max_memory_allocated`` minus what was allocated before the model was built
   (cuBLAS workspaces are created once, before the first case, and reported apart).

It passes when every ``|estimated / measured - 1| <= 5%``. A batch that the estimate
says would not fit in 90% of the GPU is halved until it does (reported).

Needs only torch, PyYAML (a lightning dependency) and this package: no ``datasets``,
``jsonargparse`` or ``transformers``. Runs in about a minute on an H100::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu/gpu_validate_estimator.py --out gpu_estimator.json
    # the lean and checkpointing estimates (issue 11), and the planner's 1B pick at 40 GiB:
    ... gpu_validate_estimator.py --recipes recipes/pretrain/llama_350m_c4_lean.yaml --batch-size 32 \
        --accumulate 16 --variants lean --out lean.json
    ... gpu_validate_estimator.py --recipes recipes/pretrain/llama_1b_c4.yaml --batch-size 16 --accumulate 32 \
        --variants recipe --no-compact --out plan_1b.json

``--cpu-smoke`` checks the same code path on the CPU with a tiny model (the
measurement is then the real-tensor accounting, not CUDA's allocator).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

from lightning_compact.memory.estimator import LEAN_OPTIONS as LEAN
from lightning_compact.memory.estimator import Variant, build, estimate, forward_backward, recipe_variant
from lightning_compact.memory.recipe import RunShape, read_recipe

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPES = ["recipes/pretrain/llama_60m_c4.yaml", "recipes/pretrain/llama_350m_c4.yaml"]
VARIANT_SETS: dict[str, list[Variant]] = {
    "paper": [Variant(), Variant(0.25, "compressed"), Variant(0.25, "decompressed")],
    "lean": [Variant(lean=LEAN), Variant(0.125, lean=LEAN), Variant(0.125, lean=LEAN, checkpointing="blocks:0.5"),
             Variant(0.125, lean=LEAN, checkpointing="blocks"), Variant(checkpointing="blocks")],
    "recipe": [],  # filled per recipe: recipe_variant(shape)
}
TOLERANCE = 0.05
GIB = 2**30


def log(msg: str) -> None:
    print(msg, flush=True)


def warm_up_cuda() -> int:
    """Create the cuBLAS handles and workspaces once, before any case; returns their bytes.

    They stay allocated for the life of the process, so without this the first case
    would be charged for them and the others not.
    """
    a = torch.randn(256, 256, device="cuda", requires_grad=True)
    for dtype in (torch.bfloat16, torch.float32):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            (a @ a).sum().backward()
    del a
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def fit_batch(shape: RunShape, budget: int) -> RunShape:
    """Halve the batch until the baseline estimate fits ``budget`` bytes."""
    while True:
        total = estimate(shape).peak.total
        if total <= budget or shape.batch_size == 1:
            return shape
        log(f"  estimate {total / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB: batch {shape.batch_size} -> {shape.batch_size // 2}")
        shape = dataclasses.replace(shape, batch_size=shape.batch_size // 2)


def measure_cuda(shape: RunShape, variant: Variant) -> dict:
    """Peak bytes of the steady-state step on the GPU."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model, optimizer = build(shape, variant, device="cuda")
    input_ids = torch.randint(0, model.config.vocab_size, (shape.batch_size, shape.seq_len), device="cuda")
    micro_batches = 2 if shape.accumulate_grad_batches > 1 else 1

    def step(n: int) -> None:
        for _ in range(n):
            forward_backward(model, input_ids, shape.precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1)  # warm-up: optimizer state, cuBLAS handles and workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step(micro_batches)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    return {"measured": peak - before, "allocated_before": before, "max_reserved": reserved, "step_seconds": seconds}


def measure_cpu(shape: RunShape, variant: Variant) -> dict:
    """The same step on real CPU tensors, measured by the accounting itself (for --cpu-smoke)."""
    real = estimate(shape, variant, fake=False)
    return {"measured": real.peak.total, "allocated_before": 0, "max_reserved": None, "step_seconds": real.seconds}


def run_case(shape: RunShape, variant: Variant, on_cuda: bool) -> dict:
    start = time.perf_counter()
    est = estimate(shape, variant)
    row = {
        "variant": variant.label,
        "estimated": est.peak.total,
        "estimated_breakdown": est.peak.as_dict(),
        "estimate_seconds": time.perf_counter() - start,
    }
    row.update(measure_cuda(shape, variant) if on_cuda else measure_cpu(shape, variant))
    row["rel_error"] = row["estimated"] / row["measured"] - 1
    row["ok"] = abs(row["rel_error"]) <= TOLERANCE
    return row


def override(shape: RunShape, args: argparse.Namespace) -> RunShape:
    """The recipe with the command line's precision, batch, accumulation and CompAct switch."""
    changes = {"precision": args.precision, "batch_size": args.batch_size, "accumulate_grad_batches": args.accumulate}
    shape = dataclasses.replace(shape, **{k: v for k, v in changes.items() if v is not None})
    if args.no_compact:
        shape = dataclasses.replace(shape, compact_rank=None)
    return shape


def chosen_variants(shape: RunShape, sets: list[str]) -> list[Variant]:
    """The variants of ``sets`` in order, the recipe's own once (skipped where it equals one already listed)."""
    out: list[Variant] = []
    for name in sets:
        for variant in [recipe_variant(shape)] if name == "recipe" else VARIANT_SETS[name]:
            if variant not in out:
                out.append(variant)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--precision", help="override every recipe's trainer.precision (e.g. bf16-true)")
    parser.add_argument("--variants", nargs="+", default=["paper"], choices=sorted(VARIANT_SETS),
                        help="which sets of configurations to check (recipe: the recipe as configured)")
    parser.add_argument("--batch-size", type=int, help="override every recipe's micro-batch (data.batch_size)")
    parser.add_argument("--accumulate", type=int, help="override trainer.accumulate_grad_batches")
    parser.add_argument("--no-compact", action="store_true",
                        help="the recipe's CompAct off (as `fit --compact.enabled false`)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (no GPU needed)")
    args = parser.parse_args(argv)

    on_cuda = torch.cuda.is_available() and not args.cpu_smoke
    info = {"provenance": provenance("cuda" if on_cuda else "cpu", argv), "tolerance": TOLERANCE}
    if on_cuda:
        info["cuda_workspace_bytes"] = warm_up_cuda()
    log(f"gpu_validate_estimator: {info}")
    if not on_cuda and not args.cpu_smoke:
        log("no CUDA device: run with --cpu-smoke to check the code path on the CPU")
        return 2
    cases = []
    if args.cpu_smoke:
        tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)
        shapes = [override(RunShape(model="llama_60m", config_overrides=tiny, batch_size=2, seq_len=32, precision="bf16-mixed",
                                    accumulate_grad_batches=2, device_type="cpu", compact_rank=0.125, lean=LEAN), args)]
    else:
        shapes = []
        budget = int(0.9 * torch.cuda.get_device_properties(0).total_memory)
        for recipe in args.recipes:
            try:
                shape = dataclasses.replace(read_recipe(REPO / recipe), device_type="cuda")
                shape = override(shape, args)
                log(f"{recipe}: {shape.model} batch {shape.batch_size} seq {shape.seq_len} {shape.precision} "
                    f"accumulate {shape.accumulate_grad_batches}")
                shapes.append(fit_batch(shape, budget))
            except Exception as err:  # keep going: one broken recipe should not hide the others
                log(f"{recipe}: FAILED to read/estimate: {err!r}")
                cases.append({"recipe": recipe, "error": repr(err)})
    for shape in shapes:
        for variant in chosen_variants(shape, args.variants):
            label = f"{shape.model} b{shape.batch_size} {variant.label}"
            try:
                row = {"model": shape.model, "shape": dataclasses.asdict(shape), **run_case(shape, variant, on_cuda)}
                log(f"  {label}: estimated {row['estimated'] / GIB:.3f} GiB, measured {row['measured'] / GIB:.3f} GiB, "
                    f"error {100 * row['rel_error']:+.2f}% {'ok' if row['ok'] else 'FAIL'}")
            except Exception as err:
                traceback.print_exc()
                row = {"model": shape.model, "variant": variant.label, "error": repr(err), "ok": False}
                log(f"  {label}: ERROR {err!r}")
            cases.append(row)
    passed = all(c.get("ok", False) for c in cases) and bool(cases)
    write_json(args.out, {"info": info, "cases": cases, "passed": passed})
    log(f"wrote {args.out}: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
