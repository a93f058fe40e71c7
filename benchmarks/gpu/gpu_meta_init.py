"""Starting LLaMA-7B with CompAct on one GPU: built on ``meta`` and materialized on the device, against a host build.

Issue 22's device check. Two arms in one process, each timed from the constructor to the end
of its first optimizer step (CompAct n/4, compressed, bf16 autocast, 1 × 256 tokens):

* ``meta``: built on ``meta`` as ``CausalLMModule(empty_init=True)`` does, converted there, materialized on the
  GPU by :func:`lightning_compact.meta_init.materialize_` with the keyed init;
* ``host``: the whole model built in host memory (as every rank did before), converted,
  moved to the GPU.

Recorded per arm: seconds to the first step, the host's peak RSS growth (``VmHWM`` is a
process peak, so the ``meta`` arm runs first) and ``torch.cuda.max_memory_allocated``.
``--model``/``--layers`` shrink it for a CPU smoke test (``--device cpu``).

    python benchmarks/gpu/gpu_meta_init.py --out gpu_out/meta_init.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import host_peak_bytes, provenance, write_json  # noqa: E402


def first_step(arm: str, model_name: str, overrides: dict[str, Any], device: torch.device, seq: int) -> dict[str, Any]:
    from lightning_compact import CompAct
    from lightning_compact.meta_init import materialize_
    from lightning_compact.models.llama import LLAMA_PRESETS, LlamaForCausalLM

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    host_before = host_peak_bytes()
    start = time.perf_counter()
    # As CausalLMModule(empty_init=...) builds it (that module needs `datasets`, absent on the device machine).
    config = dataclasses.replace(LLAMA_PRESETS[model_name], **overrides)
    with torch.device("meta") if arm == "meta" else contextlib.nullcontext():
        model = LlamaForCausalLM(config)
    compact = CompAct(rank=0.25, update_proj_gap=200)
    compact.convert(model)
    if arm == "meta":
        materialize_(model, device, lambda m: m.reset_parameters(seed=0))
    else:
        model.to(device)
    built = time.perf_counter() - start
    optimizer = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=3e-4))
    compact.set_projection_dtype(torch.bfloat16 if device.type == "cuda" else None)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(ids, labels=ids)
    loss.backward()
    optimizer.step()
    compact.step(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "arm": arm, "seconds_to_built": built, "seconds_to_first_step": seconds, "loss": float(loss),
        "host_peak_growth_bytes": host_peak_bytes() - host_before,
        "parameters": sum(p.numel() for n, p in model.named_parameters() if not n.endswith("weight_delta")),
        "device_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    print({k: (f"{v / 2**30:.2f} GiB" if k.endswith("bytes") and v is not None else v) for k, v in result.items()},
          flush=True)
    del model, optimizer, loss
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_7b")
    parser.add_argument("--layers", type=int, help="num_hidden_layers override (a smaller smoke test)")
    parser.add_argument("--hidden", type=int, help="hidden_size override")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arms", default="meta,host")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    overrides: dict[str, Any] = {"vocab_size": 32000}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.hidden:
        overrides.update(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
                         num_attention_heads=max(1, args.hidden // 128))
    results = [first_step(arm, args.model, overrides, device, args.seq) for arm in args.arms.split(",")]
    if args.out:
        write_json(args.out, {"provenance": provenance(device, argv), "overrides": overrides, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
