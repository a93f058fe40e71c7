"""Tokens/s and per-rank peak memory under DDP and FSDP2: baseline against CompAct, side by side.

Run with ``torchrun``, one process per GPU. Every configuration runs in the same launch,
one after the other, as a plain training loop (projection schedule, forward under
autocast, backward, optimizer step, zero_grad) on random tokens: per configuration,
``--warmup`` steps, then ``--steps`` timed steps between synchronisations and barriers.
The peak is each rank's ``torch.cuda.max_memory_allocated`` over warm-up and timed steps
(after the previous configuration's memory was freed); rank 0 gathers them. Ratios are to
the baseline under the same strategy.

    # 8 GPUs, LLaMA-1B, bf16 autocast, 16 x 256 per GPU (the issue's multi-GPU setting):
    torchrun --nproc_per_node 8 benchmarks/gpu/multi_gpu.py --preset llama_1b --batch 16 --out multi_gpu_1b.json
    # Two processes sharing one GPU (checks the launch; the speeds mean little):
    torchrun --nproc_per_node 2 benchmarks/gpu/multi_gpu.py --preset llama_60m --same-device --out multi_gpu_2on1.json
    # CPU smoke test of the script itself (gloo, a tiny model; the numbers mean nothing):
    torchrun --nproc_per_node 2 benchmarks/gpu/multi_gpu.py --device cpu --preset tiny --steps 2 --warmup 1

Needs only torch and this package (no ``datasets``, no ``jsonargparse``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lightning_compact import CompAct
from lightning_compact.models.llama import LLAMA_PRESETS, LlamaConfig, LlamaForCausalLM

PRESETS = {
    **LLAMA_PRESETS,
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4),
}
# name -> (rank, grad_mode); None: no CompAct
CONFIGS: dict[str, tuple[float, str] | None] = {
    "baseline": None,
    "n/4 compressed": (0.25, "compressed"),
    "n/8 compressed": (0.125, "compressed"),
    "n/4 decompressed": (0.25, "decompressed"),
}
STRATEGIES = ("ddp", "fsdp2")


def wrap(model: torch.nn.Module, compact: CompAct | None, strategy: str, device: torch.device) -> torch.nn.Module:
    """``model`` (converted by ``compact`` with ``ddp=``/``fsdp=`` set for ``strategy``) under DDP or FSDP2."""
    if strategy == "ddp":
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if compact is not None:
            compact.broadcast_weights()  # DDP broadcasts only the weights it manages
        return wrapped
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def build(config: LlamaConfig, name: str, strategy: str, device: torch.device):
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    compact = None
    if CONFIGS[name] is not None:
        rank, grad_mode = CONFIGS[name]
        compact = CompAct(rank, grad_mode=grad_mode, update_proj_gap=200)
        compact.convert(model, ddp=strategy == "ddp", fsdp=strategy == "fsdp2")
        compact.set_projection_dtype(torch.bfloat16 if device.type == "cuda" else None)
    wrapped = wrap(model, compact, strategy, device)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    if compact is not None:
        optimizer = compact.optimizer(optimizer)
    return wrapped, compact, optimizer


def init_distributed(device_kind: str, same_device: bool) -> tuple[torch.device, str]:
    """This rank's device and the initialised process group's backend (gloo on CPU or for ranks sharing a GPU)."""
    if device_kind == "cuda":
        device = torch.device("cuda", 0 if same_device else int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "gloo" if same_device else "nccl"  # NCCL refuses two ranks on one GPU
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    return device, backend


def leave() -> None:
    """Leave together: a rank that tears gloo down while another still writes its results can abort
    ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


def measure(args, config: LlamaConfig, name: str, strategy: str, device: torch.device) -> dict:
    model, compact, optimizer = build(config, name, strategy, device)
    g = torch.Generator(device="cpu").manual_seed(1 + dist.get_rank())
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    def step(i: int) -> float:
        if compact is not None:
            compact.step(i)
        with autocast:
            loss = model(tokens, labels=tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)  # model and optimizer are freed when this returns
    return {
        "strategy": strategy,
        "config": name,
        "tokens_per_s": dist.get_world_size() * args.batch * args.seq_len * args.steps / elapsed,
        "step_s": elapsed / args.steps,
        "peak_gib_per_rank": [p / 2**30 for p in peaks],
        "final_loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama_1b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--same-device", action="store_true", help="every process on cuda:0 (gloo)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default=None, help="JSON file for the results (rank 0)")
    args = parser.parse_args()

    device, backend = init_distributed(args.device, args.same_device)
    config = PRESETS[args.preset]
    rows = []
    for strategy in args.strategies:
        for name in args.configs:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(measure(args, config, name, strategy, device))
            gc.collect()
    for strategy in args.strategies:
        base = next((r for r in rows if r["strategy"] == strategy and r["config"] == "baseline"), None)
        for row in rows:
            if row["strategy"] == strategy and base is not None:
                row["speed_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
                if max(base["peak_gib_per_rank"]) > 0:
                    row["peak_vs_baseline"] = max(row["peak_gib_per_rank"]) / max(base["peak_gib_per_rank"])
    if dist.get_rank() == 0:
        print(f"{'strategy':8} {'config':18} {'tokens/s':>12} {'x base':>7} {'peak GiB (max rank)':>20} {'x base':>7}")
        for r in rows:
            print(
                f"{r['strategy']:8} {r['config']:18} {r['tokens_per_s']:12.0f} {r.get('speed_vs_baseline', float('nan')):7.3f} "
                f"{max(r['peak_gib_per_rank']):20.2f} {r.get('peak_vs_baseline', float('nan')):7.3f}"
            )
        if args.out:
            meta = {
                "preset": args.preset, "batch_per_gpu": args.batch, "seq_len": args.seq_len, "steps": args.steps,
                "warmup": args.warmup, "world_size": dist.get_world_size(), "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                "torch": torch.__version__, "backend": backend,
            }
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
    leave()


if __name__ == "__main__":
    main()
