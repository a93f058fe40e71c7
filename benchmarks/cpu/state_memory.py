"""Where the memory of one training step goes: parameters, gradients, optimizer states, activations.

Question: how much do CompAct's two modes save beyond activations? Gradient
decompression saves activation memory only; the compressed mode (the paper's full
method: ``Ĝ`` kept as ``[out, r]``, AdamW moments in that space) also shrinks the
gradients and optimizer states of every converted weight to r/n of their size.

One real step (forward, backward, AdamW step) of a small LLaMA-style decoder on the
CPU per configuration; the bytes are counted from the tensors themselves:

* parameters: every parameter;
* gradients: every ``.grad`` plus every compressed ``Ĝ``, after the backward pass;
* optimizer states: every tensor in the optimizer's state after the step;
* saved activations: the storages autograd saved in the forward pass (de-duplicated,
  parameters excluded), via :class:`~lightning_compact.memory.SavedActivationTracker`.

Usage::

    python benchmarks/cpu/state_memory.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_compact import CompActAdamW, CompActConfig, conversion_report, convert_to_compact
from lightning_compact.memory import SavedActivationTracker
from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

MiB = 2**20
CONFIG = LlamaConfig(
    vocab_size=8000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
)
BATCH, SEQ = 8, 128
RUNS = [("baseline", None), ("decompressed", 0.25), ("compressed", 0.25), ("decompressed", 0.125), ("compressed", 0.125)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(mode: str, rank: float | None) -> dict[str, float]:
    """Bytes of each category after one training step in ``mode`` at ``rank`` (a fraction of n)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).train()
    converted = []
    if mode != "baseline":
        convert_to_compact(model, config=CompActConfig(rank=rank, grad_mode=mode))
        layers = conversion_report(model).converted.values()
        # A compressed layer's gradient and moments belong to its weight_delta.
        converted = [layer.weight for layer in layers] + [l.weight_delta for l in layers if l.weight_delta is not None]
    else:
        # The weights the other runs convert, to compare like with like.
        probe = LlamaForCausalLM(CONFIG)
        names = {f"{n}.weight" for n in conversion_report(convert_to_compact(probe, rank=0.25)).converted}
        converted = [p for n, p in model.named_parameters() if n in names]
    if mode == "compressed":
        opt = CompActAdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)

    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with SavedActivationTracker(exclude=[model]) as tracker:
        loss = model(tokens, labels=tokens)
    loss.backward()

    def grads(params):
        return [p.grad for p in params if p.grad is not None]

    def moments(params):
        return [opt.state[p][k] for p in params if p in opt.state for k in ("exp_avg", "exp_avg_sq")]

    params = list(model.parameters())
    grad_bytes, grad_conv = _bytes(grads(params)), _bytes(grads(converted))
    opt.step()
    state_bytes = _bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "mode": mode,
        "rank": "-" if rank is None else f"n/{round(1 / rank)}",
        "parameters": _bytes(params),
        "gradients": grad_bytes,
        "optimizer_states": state_bytes,
        "saved_activations": tracker.result().bytes,
        "converted_weights": _bytes(converted),
        "converted_gradients": grad_conv,
        "converted_moments": _bytes(moments(converted)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    rows = [measure(mode, rank) for mode, rank in RUNS]
    base = rows[0]
    for row in rows:
        row["total"] = sum(row[k] for k in ("parameters", "gradients", "optimizer_states", "saved_activations"))
        keys = ("gradients", "optimizer_states", "saved_activations", "total", "converted_gradients", "converted_moments")
        row["ratios"] = {k: row[k] / base[k] for k in keys}

    cols = ("parameters", "gradients", "optimizer_states", "saved_activations", "total")
    print(
        f"LLaMA d={CONFIG.hidden_size}, {CONFIG.num_hidden_layers} layers, ffn {CONFIG.intermediate_size}, "
        f"vocab {CONFIG.vocab_size}, batch {BATCH} x seq {SEQ}, fp32, AdamW; MiB (ratio to baseline)"
    )
    header = f"{'mode':<11} {'rank':<5} " + " ".join(f"{c.replace('_', ' '):>19}" for c in cols)
    header += f" {'conv. grads':>12} {'conv. moments':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = [f"{row[c] / MiB:8.2f} ({row[c] / base[c]:5.3f})" for c in cols]
        conv = [f"{row['ratios']['converted_gradients']:12.4f}", f"{row['ratios']['converted_moments']:14.4f}"]
        print(f"{row['mode']:<11} {row['rank']:<5} " + " ".join(f"{c:>19}" for c in cells) + " " + " ".join(conv))
    print(
        "conv. grads / conv. moments: gradients and AdamW moments of the converted weights "
        f"({base['converted_weights'] / MiB:.2f} MiB of weights: q, k, v, gate, up, down), ratio to baseline."
    )
    if args.out:
        args.out.write_text(json.dumps({"config": vars(CONFIG) | {"batch": BATCH, "seq": SEQ}, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
