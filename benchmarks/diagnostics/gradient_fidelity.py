"""How close is CompAct's weight gradient to the true one? Per layer, on the quickstart's model.

One batch of the quickstart's data (16 x 256 KJV bytes) through the quickstart's LLaMA
at initialisation; for each layer CompAct converts (q, k, v, gate, up, down) the exact
weight gradient ``G`` is compared with what CompAct gives for a fixed projection ``P``:

* ``cos(G, G P Pᵀ)``: the decompressed gradient's alignment with the true one (what
  gradient-decompression mode hands to AdamW);
* ``‖G Π_P‖² / ‖G‖²``: the share of the gradient inside the projection's column space
  span(P) (r/n for a random subspace): within one resample window every update of a
  converted weight, in both modes, lies in that subspace.

Averaged over ``--draws`` projections, for the paper's Gaussian P and the
orthogonalised one (``projection="orthogonal"``).

Usage::

    python benchmarks/diagnostics/gradient_fidelity.py [--draws 8] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lightning_compact.data import PretrainDataModule
    from lightning_compact.models.causal_lm import build_llama
    from lightning_compact.projection import make_projection

    torch.manual_seed(0)
    model = build_llama("llama_60m", dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                          num_attention_heads=4, max_position_embeddings=args.seq_len))
    data = PretrainDataModule(dataset="kjv", tokenizer="byte", seq_len=args.seq_len, batch_size=args.batch_size)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))["input_ids"]
    model(batch, labels=batch).backward()

    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")):
            continue
        g = module.weight.grad.double()  # [m, n]
        n = g.shape[1]
        for frac in (0.25, 0.125):
            r = round(frac * n)
            for kind in ("gaussian", "orthogonal"):
                cos, share = [], []
                for seed in range(args.draws):
                    if kind == "gaussian":
                        p = make_projection(n, r, seed, dtype=torch.float64)
                    else:
                        p = make_projection(n, r, seed, dtype=torch.float64, projection="orthogonal")
                    est = g @ p @ p.t()
                    cos.append(float((est * g).sum() / (est.norm() * g.norm())))
                    q, _ = torch.linalg.qr(p)
                    share.append(float((g @ q).norm() ** 2 / g.norm() ** 2))
                rows.append({"layer": name, "n": n, "r": r, "projection": kind, "cos": statistics.fmean(cos),
                             "share_in_span": statistics.fmean(share)})

    print(f"{'rank':>6} {'projection':>11} {'cos(G, GPPᵀ) mean [min, max] over layers':>44} {'share of ‖G‖² in span(P)':>26}")
    for frac in ("n/4", "n/8"):
        for kind in ("gaussian", "orthogonal"):
            sel = [r for r in rows if r["projection"] == kind and r["r"] == round((0.25 if frac == "n/4" else 0.125) * r["n"])]
            cs = [r["cos"] for r in sel]
            ss = [r["share_in_span"] for r in sel]
            print(f"{frac:>6} {kind:>11} {statistics.fmean(cs):>20.3f} [{min(cs):.3f}, {max(cs):.3f}] {statistics.fmean(ss):>22.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
