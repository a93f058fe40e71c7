"""Activation memory and step time with activation checkpointing, alone and with lean + CompAct.

Configurations on this project's LLaMA (CompAct r = n/4 unless ``--rank``, compressed
gradient mode): baseline, full checkpointing of the blocks, CompAct, lean + CompAct, and
lean + CompAct with selective (matmul outputs kept), whole-block, or fractional
(``blocks:F``: the first ``ceil(F·N)`` blocks) checkpointing
(:func:`lightning_compact.checkpointing.apply_checkpointing`).

Memory is counted by :class:`LiveTensorBytes`, a dispatch mode that follows every
storage the step's ops allocate until it is freed (parameters excluded, nothing
estimated). ``saved_tensors_hooks`` (``SavedActivationTracker``) cannot see what
selective checkpointing keeps, which lives in its own cache, so two figures are given:

* retained: the bytes still alive at the end of the forward (what the backward needs:
  saved tensors, checkpoint inputs, the selective cache), the loss excluded;
* peak: the highest live total over forward + backward (recomputation, gradients of
  the activations and the parameters' ``.grad`` included; parameters and optimizer
  state excluded).

Step times (forward, backward, ``CompActAdamW``: plain AdamW for plain weights) are medians over interleaved
repetitions, run without the dispatch mode ("paired": the median of each round's ratio; ``timing.py``).

    python benchmarks/cpu/checkpointing_memory.py --shapes tiny --repeats 3
    python benchmarks/cpu/checkpointing_memory.py --shapes tiny --quick
    python benchmarks/cpu/checkpointing_memory.py --rank 0.125 --configs baseline "checkpoint blocks" \
        "lean + compact" "lean + compact + blocks:0.5" "lean + compact + blocks"
"""

from __future__ import annotations

import argparse
import copy
import sys
import weakref
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import torch

from lightning_compact import CompActAdamW, CompActConfig, convert_to_compact
from lightning_compact._torch_private import torch_dispatch_mode, tree_leaves
from lightning_compact.checkpointing import apply_checkpointing
from lightning_compact.lean import apply_lean
from lightning_compact.memory import SavedActivationTracker
from lightning_compact.models.llama import LlamaForCausalLM

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402
from shapes import CPU_SHAPES  # noqa: E402
from timing import interleaved_times, median, paired_ratio  # noqa: E402

SHAPES = CPU_SHAPES
CONFIGS = {  # name: (lean, CompAct, checkpointing granularity)
    "baseline": (False, False, None),
    "checkpoint blocks": (False, False, "blocks"),
    "checkpoint selective": (False, False, "selective"),
    "compact": (False, True, None),
    "lean + compact": (True, True, None),
    "lean + compact + selective": (True, True, "selective"),
    "lean + compact + blocks:0.25": (True, True, "blocks:0.25"),
    "lean + compact + blocks:0.5": (True, True, "blocks:0.5"),
    "lean + compact + blocks:0.75": (True, True, "blocks:0.75"),
    "lean + compact + blocks": (True, True, "blocks"),
}
MIB = 2**20


class LiveTensorBytes(torch_dispatch_mode()):
    """Bytes of the storages allocated by ops inside the mode and still alive: now and at the peak.

    A storage is counted once (views share it) from the op that allocated it until
    PyTorch frees it (a weakref finalizer on the storage, which keeps its Python object
    while it lives). ``exclude``: tensors not to count (parameters, inputs).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes or ptr in self._live or ptr in self._skip:
            return
        self._live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)


def build(base: LlamaForCausalLM, lean: bool, compact: bool, granularity: str | None, rank: float) -> LlamaForCausalLM:
    model = copy.deepcopy(base)
    if compact:
        convert_to_compact(model, config=CompActConfig(rank=rank, grad_mode="compressed"))
    if lean:
        apply_lean(model)
    if granularity is not None:
        apply_checkpointing(model, granularity)
    return model.train()


def measure(model: LlamaForCausalLM, tokens: torch.Tensor) -> dict[str, float]:
    """Retained and peak bytes (LiveTensorBytes) and saved_tensors_hooks bytes of one forward + backward."""
    exclude = [*model.parameters(), *model.buffers(), tokens]
    with SavedActivationTracker(exclude=[model]) as tracker:
        with LiveTensorBytes(exclude) as live:
            loss = model(tokens, labels=tokens)
            retained = live.current - loss.untyped_storage().nbytes()
            loss.backward()
    model.zero_grad(set_to_none=True)
    return {"retained": retained, "peak": live.peak, "hooks": tracker.result().bytes, "loss": float(loss.detach())}


def step(model: LlamaForCausalLM, tokens: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    model(tokens, labels=tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_shape(shape: str, repeats: int, names: list[str], rank: float) -> dict:
    config, batch, seq = SHAPES[shape]
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    models = {name: build(base, *CONFIGS[name], rank) for name in names}
    optims = {name: CompActAdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    memory = {name: measure(model, tokens) for name, model in models.items()}
    times = interleaved_times({name: partial(step, model, tokens, optims[name]) for name, model in models.items()}, repeats)
    base_name = names[0]
    medians = {name: median(t) for name, t in times.items()}
    rows = [
        {
            "config": name,
            "retained_MiB": memory[name]["retained"] / MIB,
            "retained_ratio": memory[name]["retained"] / memory[base_name]["retained"],
            "peak_MiB": memory[name]["peak"] / MIB,
            "peak_ratio": memory[name]["peak"] / memory[base_name]["peak"],
            "saved_tensors_hooks_MiB": memory[name]["hooks"] / MIB,
            "step_s": medians[name],
            "step_ratio": medians[name] / medians[base_name],
            "step_ratio_paired": paired_ratio(times[name], times[base_name]),
            "step_times_s": times[name],
            "first_loss": memory[name]["loss"],
        }
        for name in models
    ]
    print(f"\nLLaMA {shape}: d={config.hidden_size}, layers={config.num_hidden_layers}, ffn={config.intermediate_size}, "
          f"vocab={config.vocab_size}, batch={batch}, seq={seq}, fp32, CompAct r={rank}; ratios against {base_name!r}")
    print(f"{'config':<28}{'retained':>12}{'ratio':>7}{'peak':>12}{'ratio':>7}{'hooks see':>12}{'step':>10}{'ratio':>7}{'paired':>7}{'loss':>9}")
    for r in rows:
        print(f"{r['config']:<28}{r['retained_MiB']:>8.1f} MiB{r['retained_ratio']:>7.3f}{r['peak_MiB']:>8.1f} MiB"
              f"{r['peak_ratio']:>7.3f}{r['saved_tensors_hooks_MiB']:>8.1f} MiB{r['step_s']:>8.3f} s{r['step_ratio']:>7.3f}"
              f"{r['step_ratio_paired']:>7.3f}{r['first_loss']:>9.4f}")
    return {"shape": shape, "batch": batch, "seq": seq, "config": config.__dict__, "rank": rank, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="the first is the reference of the ratios")
    parser.add_argument("--rank", type=float, default=0.25, help="CompAct's rank as a fraction of each layer's input width")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (after 1 warm-up); 0: memory only")
    parser.add_argument("--quick", action="store_true", help="1 timed step: a smoke run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    info = provenance("cpu", argv)
    print(f"torch {info['torch']}, lightning {info['lightning']}, {info['device']}")
    results = [run_shape(s, repeats, args.configs, args.rank) for s in args.shapes]
    out = {"runs": results, "repeats": repeats, "provenance": info}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
