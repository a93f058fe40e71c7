"""LoRA (PEFT) with CompAct: saved activations and total training memory against plain LoRA.

Issue 21's shape: a transformers LLaMA with LoRA (r_lora = 16) on q, k, v, o, gate, up and
down; one steady-state training step of ``--batch`` x ``--seq`` tokens, fp32, CPU. Rows:
plain LoRA; CompAct on the adapters' down-projections (``lora_A``) at n/4 and n/8, each
with and without ``share_projection`` (q/k/v's ``lora_A`` read one input: one ``x·P``);
lean activations alone and with CompAct. Memory by category, disjoint storages: weights
(frozen and trainable), grads, AdamW state, CompAct's projection cache, saved activations
(peak bytes saved for backward, parameters excluded).

    python benchmarks/cpu/lora_memory.py --out benchmarks/results/lora_memory.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402


def build(hidden: int, intermediate: int, layers: int, vocab: int, r_lora: int) -> torch.nn.Module:
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 64)
    model = transformers.LlamaForCausalLM(config)
    lora = LoraConfig(r=r_lora, lora_alpha=2 * r_lora, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def _bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(model: torch.nn.Module, compact, tokens: torch.Tensor) -> dict[str, int]:
    from lightning_compact.memory import SavedActivationTracker

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if compact is not None:
        opt = compact.optimizer(opt)
    row: dict[str, int] = {}
    for step in range(2):  # the second step is measured (caches and optimizer state exist)
        if compact is not None:
            compact.step(step)
        with SavedActivationTracker(exclude=[model]) as tracker:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"saved_activations": tracker.result().bytes, "grads": grads}
    row["optimizer_state"] = _bytes(t for st in opt.state.values() for t in st.values())
    row["weights"] = _bytes(model.parameters())
    row["projection_cache"] = compact.projection_cache_bytes if compact is not None else 0
    row["total"] = sum(row.values())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--r-lora", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from lightning_compact import CompAct
    from lightning_compact.lean import apply_lean

    base = build(args.hidden, args.intermediate, args.layers, args.vocab, args.r_lora)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows: dict[str, dict[str, Any]] = {}
    configs = [
        ("plain LoRA", False, None),
        ("CompAct n/4", False, dict(rank=0.25)),
        ("CompAct n/4, shared P", False, dict(rank=0.25, share_projection=True)),
        ("CompAct n/8, shared P", False, dict(rank=0.125, share_projection=True)),
        ("lean", True, None),
        ("lean + CompAct n/4, shared P", True, dict(rank=0.25, share_projection=True)),
        ("lean + CompAct n/8, shared P", True, dict(rank=0.125, share_projection=True)),
    ]
    for label, lean, options in configs:
        model = copy.deepcopy(base)
        if lean:
            apply_lean(model)
        compact = None
        if options is not None:
            compact = CompAct(grad_mode="compressed", **options)
            compact.convert(model)
        rows[label] = measure(model, compact, tokens)
        if compact is not None:
            rows[label]["converted_layers"] = len(compact.layers)
            rows[label]["frozen_layers_converted"] = sum(not layer.weight.requires_grad for layer in compact.layers.values())
        print(f"  {label}: {rows[label]}", flush=True)
    plain = rows["plain LoRA"]
    lines = [f"PEFT LoRA r={args.r_lora} on q,k,v,o,gate,up,down; LLaMA d={args.hidden}x{args.layers}, ffn "
             f"{args.intermediate}, vocab {args.vocab}; {args.batch} x {args.seq} tokens, fp32 CPU", "",
             "| configuration | saved activations | × plain LoRA | total memory | × plain LoRA |", "|---|---|---|---|---|"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['saved_activations'] / 2**20:.1f} MiB | "
                     f"{row['saved_activations'] / plain['saved_activations']:.3f} | {row['total'] / 2**20:.1f} MiB | "
                     f"{row['total'] / plain['total']:.3f} |")
    print("\n".join(lines))
    if args.out is not None:
        write_json(args.out, {"provenance": provenance("cpu", argv), "settings": vars(args) | {"out": str(args.out)},
                              "rows": rows, "table": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
