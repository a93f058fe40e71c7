"""Peak memory and step time of CompAct beside its peers, side by side in one run.

Methods, all on the same LLaMA model, batch and precision:

* ``baseline``: torch AdamW.
* ``CompAct n/4|n/8 compressed``: the paper's method (compressed gradients, ``CompActAdamW``).
* ``CompAct n/4|n/8 decompressed``: gradient decompression, torch AdamW.
* ``checkpointing``: ``torch.utils.checkpoint`` around every decoder layer (non-reentrant), AdamW.
* ``lean``: :func:`~lightning_compact.lean.apply_lean` (RMSNorm, SwiGLU and the chunked
  lm_head + loss save only their inputs; no matmul recomputed), AdamW; the loss on the
  torch backend even where liger-kernel is installed.
* ``lean + CompAct n/4|n/8 compressed``: both, ``CompActAdamW``.
* ``CompAct n/8 compressed + lean + checkpointing selective|blocks:0.5|blocks``: the same
  with :func:`~lightning_compact.checkpointing.apply_checkpointing` on top (selective:
  matmul outputs kept; ``blocks:0.5``: the first half of the blocks recomputed whole).
* ``liger-kernel``: ``lean`` with the loss on liger-kernel's fused Triton kernel (CUDA and
  ``pip install liger-kernel`` only; skipped with the reason elsewhere).
* ``GaLore n/4``: ``galore_torch.GaLoreAdamW`` (``pip install galore-torch``) on the attention
  and MLP weights, rank = hidden/4, T = 200, scale 0.25 (GaLore's pretraining recipe,
  rank scaled with the model); skipped with the reason if it does not import.

On CPU the peak is the per-category accounting of one steady-state step on real tensors
(:class:`~lightning_compact.memory.StepMemoryTracker`). On CUDA it is
``torch.cuda.max_memory_allocated`` over the timed steps, minus what was allocated
before the model was built. Step time is the fastest of ``--steps`` timed steps after
one warm-up step (load from other processes only adds time); on CPU the methods take
their timed steps in turns, so such load falls on all of them alike. Ratios are to
the baseline.

    # CPU, a small LLaMA (the paper's architecture, scaled down):
    python benchmarks/cpu/compare_methods.py --out compare_cpu.json
    # GPU, a paper recipe (needs only torch, lightning, this package; galore-torch optional):
    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/cpu/compare_methods.py \\
        --config recipes/pretrain/llama_60m_c4.yaml --device cuda --out compare_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import gc
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lightning_compact.lean import cross_entropy
from lightning_compact.memory import StepMemoryTracker
from lightning_compact.memory.estimator import LEAN_OPTIONS, Variant, build, forward_backward
from lightning_compact.memory.recipe import RunShape, read_recipe

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

MIB = 2**20
# A small LLaMA for CPU runs: the paper's architecture at a width two CPU cores can train.
CPU_SHAPE = RunShape(
    model="llama_60m",
    config_overrides=dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    batch_size=8,
    seq_len=256,
    precision="32-true",
    device_type="cpu",
)
# GaLore's pretraining settings (its torchrun_main defaults for LLaMA).
GALORE_UPDATE_PROJ_GAP = 200
GALORE_SCALE = 0.25


def build_lean(shape: RunShape, variant: Variant, device: str, backend: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, optimizer = build(shape, variant, device=device)
    model.loss_backend = backend  # read by Method.step
    return model, optimizer


def liger_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "liger-kernel runs on CUDA only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed; pip install liger-kernel"
    return None


@contextlib.contextmanager
def loss_backend(backend: str | None):
    """The chunked loss's backend for this block (the model's forward asks for "auto")."""
    if backend is None:
        yield
        return
    resolve = cross_entropy._resolve_backend
    cross_entropy._resolve_backend = lambda requested, hidden: backend
    try:
        yield
    finally:
        cross_entropy._resolve_backend = resolve


def galore_unavailable() -> str | None:
    try:
        import galore_torch  # noqa: F401
    except Exception as err:  # ImportError, or bitsandbytes failing inside its import
        return f"galore-torch does not import ({type(err).__name__}: {err}); pip install galore-torch"
    return None


def build_galore(shape: RunShape, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    from galore_torch import GaLoreAdamW

    model, _ = build(shape, Variant(), device=device)
    rank = max(1, model.config.hidden_size // 4)
    # As GaLore's script: every linear weight inside attention and MLP blocks gets the projection.
    galore = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and (".self_attn." in name or ".mlp." in name)]
    ids = {id(p) for p in galore}
    regular = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        {"params": regular},
        {"params": galore, "rank": rank, "update_proj_gap": GALORE_UPDATE_PROJ_GAP, "scale": GALORE_SCALE, "proj_type": "std"},
    ]
    return model, GaLoreAdamW(groups, lr=1e-3, weight_decay=0.0)


def galore_projections(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """GaLore keeps its projection matrices in a Python object inside the state, hidden from state scans."""
    out = []
    for state in optimizer.state.values():
        ortho = getattr(state.get("projector"), "ortho_matrix", None)
        if isinstance(ortho, torch.Tensor):
            out.append(ortho)
        elif isinstance(ortho, (list, tuple)):
            out += [t for t in ortho if isinstance(t, torch.Tensor)]
    return out


def methods(shape: RunShape, device: str = "cpu") -> dict[str, Callable[[str], tuple[nn.Module, torch.optim.Optimizer]] | str]:
    """label -> builder(device), or a string saying why the method is skipped."""
    table: dict[str, Callable | str] = {"baseline": lambda device: build(shape, Variant(), device=device)}
    for rank in (0.25, 0.125):
        for mode in ("compressed", "decompressed"):
            variant = Variant(rank, mode)
            table[variant.label] = lambda device, v=variant: build(shape, v, device=device)
    table["checkpointing"] = lambda device: build(shape, Variant(checkpointing="blocks"), device=device)
    table["lean"] = lambda device: build_lean(shape, Variant(lean=LEAN_OPTIONS), device, "torch")
    for rank in (0.25, 0.125):
        variant = Variant(rank, "compressed", LEAN_OPTIONS)
        table[variant.label] = lambda device, v=variant: build_lean(shape, v, device, "torch")
    for granularity in ("selective", "blocks:0.5", "blocks"):
        variant = Variant(0.125, "compressed", LEAN_OPTIONS, granularity)
        table[variant.label] = lambda device, v=variant: build_lean(shape, v, device, "torch")
    table["liger-kernel"] = liger_unavailable(device) or (lambda device: build_lean(shape, Variant(lean=LEAN_OPTIONS), device, "liger"))
    table["GaLore n/4"] = galore_unavailable() or (lambda device: build_galore(shape, device))
    return table


class Method:
    """One method's model, optimizer and batch, with its measurements."""

    def __init__(self, shape: RunShape, builder: Callable, device: str) -> None:
        torch.manual_seed(0)
        self.shape, self.device = shape, device
        self.model, self.optimizer = builder(device)
        self.input_ids = torch.randint(0, self.model.config.vocab_size, (shape.batch_size, shape.seq_len), device=device)
        self.times: list[float] = []

    def step(self) -> None:
        with loss_backend(getattr(self.model, "loss_backend", None)):
            forward_backward(self.model, self.input_ids, self.shape.precision)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock

    def timed_step(self) -> None:
        self._sync()
        start = time.perf_counter()
        self.step()
        self._sync()
        self.times.append(time.perf_counter() - start)

    def measure_peak(self) -> dict:
        extra = galore_projections(self.optimizer)
        with StepMemoryTracker(modules=[self.model], optimizers=[self.optimizer], tensors=[self.input_ids, *extra]) as tracker:
            self.step()
        result = tracker.result()
        # largest: each category at its own largest (activations at the end of the forward).
        return {"peak_bytes": result.peak.total, "breakdown": result.peak.as_dict(), "largest": result.largest.as_dict()}

    def timing(self) -> dict:
        seconds = min(self.times)  # other load on the machine only ever adds time
        return {"step_seconds": seconds, "step_seconds_all": self.times, "tokens_per_second": self.shape.batch_size * self.shape.seq_len / seconds}


def run_cpu(shape: RunShape, builders: dict[str, Callable], steps: int) -> dict[str, dict]:
    """Memory one method at a time; timing in interleaved rounds, so background load hits every method alike."""
    rows: dict[str, dict] = {}
    live: dict[str, Method] = {}
    for label, builder in builders.items():
        try:
            method = Method(shape, builder, "cpu")
            method.step()  # warm-up: optimizer state (and GaLore's first SVD)
            rows[label] = method.measure_peak()
            live[label] = method
            print(f"  {label}: peak {rows[label]['peak_bytes'] / MIB:.1f} MiB", flush=True)
        except Exception as err:  # one failing method should not hide the others
            traceback.print_exc()
            rows[label] = {"error": repr(err)}
    for _ in range(steps):
        for method in live.values():
            method.timed_step()
    for label, method in live.items():
        rows[label].update(method.timing())
    return rows


def run_cuda(shape: RunShape, builder: Callable, steps: int) -> dict:
    """One method alone on the GPU: its peak is max_memory_allocated over its timed steps."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    method = Method(shape, builder, "cuda")
    method.step()  # warm-up: optimizer state (and GaLore's first SVD)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        method.timed_step()
    row = {"peak_bytes": torch.cuda.max_memory_allocated() - before, "max_reserved_bytes": torch.cuda.max_memory_reserved()}
    row.update(method.timing())
    del method
    return row


def table(rows: dict[str, dict]) -> str:
    base = rows.get("baseline", {})
    header = ["method", "peak MiB", "x base", "step s", "x base", "tokens/s"]
    has_breakdown = any("breakdown" in r for r in rows.values())
    if has_breakdown:
        header += ["params", "grads", "optim", "activ", "temp"]
    lines = [header]
    for label, r in rows.items():
        if "skipped" in r or "error" in r:
            lines.append([label, r.get("skipped") or f"error: {r['error']}"])
            continue
        cells = [
            label,
            f"{r['peak_bytes'] / MIB:.1f}",
            f"{r['peak_bytes'] / base['peak_bytes']:.3f}" if base.get("peak_bytes") else "-",
            f"{r['step_seconds']:.3f}",
            f"{r['step_seconds'] / base['step_seconds']:.3f}" if base.get("step_seconds") else "-",
            f"{r['tokens_per_second']:.0f}",
        ]
        if has_breakdown:
            b = r.get("breakdown", {})
            cells += [f"{b.get(k, 0) / MIB:.1f}" for k in ("parameters", "gradients", "optimizer_states", "activations", "temporaries")]
        lines.append(cells)
    full = [l for l in lines if len(l) == len(header)]
    widths = [max(len(l[i]) for l in full) for i in range(len(header))]
    out = []
    for l in lines:
        if len(l) != len(header):
            out.append(f"{l[0].ljust(widths[0])}  {l[1]}")
        else:
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a recipe (default on CPU: a small LLaMA; see CPU_SHAPE)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--precision")
    parser.add_argument("--num-layers", type=int, help="override num_hidden_layers (to fit a smaller machine)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--only", nargs="+", help="run only these method labels")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    shape = read_recipe(args.config) if args.config else CPU_SHAPE
    changes = {"device_type": args.device, "accumulate_grad_batches": 1}
    for name in ("batch_size", "seq_len", "precision"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.num_layers is not None:
        changes["config_overrides"] = {**shape.config_overrides, "num_hidden_layers": args.num_layers}
    shape = dataclasses.replace(shape, **changes)

    info = {
        "provenance": provenance(args.device, argv),
        "shape": dataclasses.asdict(shape),
        "steps": args.steps,
    }
    if args.device == "cuda":
        # cuBLAS handles and workspaces live as long as the process: create them before the
        # first method, so that no method is charged for them.
        a = torch.randn(256, 256, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            (a @ a).sum().backward()
        (a @ a).sum().backward()
        del a
        torch.cuda.synchronize()
        info["cuda_workspace_bytes"] = torch.cuda.memory_allocated()
    print(f"compare_methods: {info}", flush=True)
    rows: dict[str, dict] = {}
    chosen = {label: b for label, b in methods(shape, args.device).items() if not args.only or label in args.only}
    for label, builder in chosen.items():
        if isinstance(builder, str):
            print(f"  {label}: skipped: {builder}", flush=True)
    if args.device == "cpu":
        rows = run_cpu(shape, {k: b for k, b in chosen.items() if not isinstance(b, str)}, args.steps)
        rows.update({k: {"skipped": b} for k, b in chosen.items() if isinstance(b, str)})
        rows = {k: rows[k] for k in chosen}
    else:
        for label, builder in chosen.items():
            if isinstance(builder, str):
                rows[label] = {"skipped": builder}
                continue
            try:
                rows[label] = run_cuda(shape, builder, args.steps)
                r = rows[label]
                print(f"  {label}: peak {r['peak_bytes'] / MIB:.1f} MiB, step {r['step_seconds']:.3f} s", flush=True)
            except Exception as err:  # one failing method should not hide the others
                traceback.print_exc()
                rows[label] = {"error": repr(err)}
    print()
    print(table(rows))
    write_json(args.out, {"info": info, "methods": rows})
    print(f"\nwrote {args.out}")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
