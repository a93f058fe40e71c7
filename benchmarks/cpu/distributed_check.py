"""Exactness of CompAct under DDP and FSDP2 on real devices: N processes against one process on the global batch.

Each configuration (strategy x gradient mode) trains ``--steps`` AdamW steps of a small
LLaMA in float32 with every rank on its share of each global batch, gathers the full
weights, and compares them with the same steps taken by one process on the whole batch
(rank 0 runs it after the distributed run). Prints and writes the worst relative
difference ``‖out − ref‖/‖ref‖`` over the weights; the issue's target is 1e-4.

    # Two processes sharing one GPU (gloo over CUDA tensors; NCCL refuses two ranks on one GPU):
    torchrun --nproc_per_node 2 benchmarks/cpu/distributed_check.py --same-device --out distributed_check.json
    # One process per GPU (NCCL):
    torchrun --nproc_per_node 8 benchmarks/cpu/distributed_check.py
    # CPU (gloo), as tests/test_fsdp.py does through Lightning:
    torchrun --nproc_per_node 2 benchmarks/cpu/distributed_check.py --device cpu

Needs only torch and this package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_compact import CompAct
from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

# multi_gpu.py, whose set-up and wrapping this reuses, is in benchmarks/gpu/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from multi_gpu import init_distributed, leave, wrap  # noqa: E402

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)


def train(model, compact: CompAct, optimizer, batches) -> None:
    for step, tokens in enumerate(batches):
        compact.step(step)
        model(tokens, labels=tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_weights(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu()
        for k, v in model.state_dict().items()
        if not k.endswith("weight_delta")
    }


def run(strategy: str, grad_mode: str, device: torch.device, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(device)
    compact = CompAct(rank=16, update_proj_gap=2, grad_mode=grad_mode)
    compact.convert(model, ddp=strategy == "ddp", fsdp=strategy == "fsdp2")
    wrapped = wrap(model, compact, strategy, device)
    optimizer = compact.optimizer(torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1))
    local = [b.chunk(world)[rank] for b in batches]  # the loss is a token mean: equal shares average exactly
    train(wrapped, compact, optimizer, local)
    return full_weights(model)


def reference(grad_mode: str, device: torch.device, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(device)
    compact = CompAct(rank=16, update_proj_gap=2, grad_mode=grad_mode)
    compact.convert(model)
    optimizer = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    train(model, compact, optimizer, batches)
    return full_weights(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--same-device", action="store_true", help="every process on cuda:0 (gloo)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the ranks")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, backend = init_distributed(args.device, args.same_device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls, for a tight comparison
        torch.backends.cudnn.allow_tf32 = False
    if args.batch % dist.get_world_size():
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {dist.get_world_size()}")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, CONFIG.vocab_size, (args.batch, 32), generator=g).to(device) for _ in range(args.steps)]
    rows = []
    for strategy in ("ddp", "fsdp2"):
        for grad_mode in ("compressed", "decompressed"):
            out = run(strategy, grad_mode, device, batches)
            if dist.get_rank() == 0:
                ref = reference(grad_mode, device, batches)
                worst = max(((out[k] - v).norm() / v.norm()).item() for k, v in ref.items())
                rows.append({"strategy": strategy, "grad_mode": grad_mode, "worst_rel_diff": worst})
                print(f"{strategy:6} {grad_mode:13} worst relative difference {worst:.2e}", flush=True)
            dist.barrier()
    if dist.get_rank() == 0 and args.out:
        meta = {"world_size": dist.get_world_size(), "backend": backend, "device": str(device), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "steps": args.steps}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    leave()


if __name__ == "__main__":
    main()
