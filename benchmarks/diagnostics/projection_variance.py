"""How noisy is each projection's gradient estimate? Per layer, on the quickstart's model after some training.

The quickstart's LLaMA (d=256, 4 layers, SwiGLU 688, byte vocabulary) is trained with plain
AdamW for ``--warm-steps`` steps on KJV bytes (``PretrainDataModule``, 8 x 128), so the
activations are no longer those of initialisation. Then, on two further batches A and B,
each converted layer's exact weight gradient ``G`` (``[m, n]``) and input ``x`` are taken,
and for each projection ``P`` (float64) the relative error of the decompressed estimate

    e = ‖G P Pᵀ − G‖ / ‖G‖

is averaged over ``--draws`` draws (window seeds), for

* ``gaussian`` (the paper's, theory ``E e² = (n + 1)/r``), ``orthogonal`` (``(n − r)/r``),
* ``principal`` with k = r/4, r/2, 3r/4 (``(n − r)/(r − k) · ‖G Π_c‖²/‖G‖²``, see
  :mod:`lightning_compact.principal`), its basis found on the batch's own input
  (``same``: the first micro-batch of a window) and on the previous batch's (``held``: the
  rest of the window, where the basis was found on other data),

at r = n/4 and n/8. The JSON keeps every (layer, rank, projection) row with the measured
RMS and mean of ``e`` and the theory's RMS, so the estimator's variance formula is checked
on real activations too.

``--loss-steps N`` instead runs the quick loss check: peers.py's training run (same init,
batches and validation blocks for every method; linear warm-up then cosine) at r = n/4 for
the Gaussian, orthogonal and principal projections (CompActAdamW, T=50) at one ``--lr``,
plus ``principal_c_step``: the principal columns scaled by c too (``P = c·[U_k, Q_c]``),
which Adam's per-coordinate normalisation leaves ``N`` unchanged by, so that every direction
of the update ``N Pᵀ`` gets the step c instead of 1 for the principal ones (a biased
``E[P Pᵀ]``, only meaningful in compressed mode). Results in ``loss_check.json``.

Usage::

    python benchmarks/diagnostics/projection_variance.py [--draws 8] [--warm-steps 80] [--out DIR]
    python benchmarks/diagnostics/projection_variance.py --loss-steps 200 --lr 3e-3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from torch import nn

# The shared helpers are in benchmarks/common/; peers.py, whose methods and data this reuses, in benchmarks/cpu/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cpu"))
from provenance import provenance, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "projection_variance"
TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
PRINCIPAL_FRACTIONS = (0.25, 0.5, 0.75)


def gradients_and_inputs(model: nn.Module, batch: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each target layer's exact ``(G [m, n], x [tokens, n])`` on ``batch`` (float64)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(TARGETS)
    ]
    model.zero_grad(set_to_none=True)
    model(batch, labels=batch).backward()
    for hook in hooks:
        hook.remove()
    modules = dict(model.named_modules())
    return {name: (modules[name].weight.grad.double(), x.reshape(-1, x.shape[-1]).double()) for name, x in inputs.items()}


def rel_errors(g: torch.Tensor, projections: list[torch.Tensor]) -> list[float]:
    return [float((g @ p @ p.t() - g).norm() / g.norm()) for p in projections]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--warm-steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--loss-steps", type=int, help="run the quick loss check for this many steps instead")
    parser.add_argument("--loss-methods", default="compact_n4,compact_n4_orth,compact_n4_principal,principal_c_step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.loss_steps:
        loss_check(args, started)
        return

    from peers import Settings, _config, batch_order, load_blocks

    from lightning_compact.models.llama import LlamaForCausalLM
    from lightning_compact.principal import principal_projection, resolve_principal_rank
    from lightning_compact.projection import layer_seed, make_projection, seed_keys

    s = Settings(steps=args.warm_steps + 2)
    train_blocks, _ = load_blocks(s)
    order = batch_order(len(train_blocks), s, seed=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(s))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(args.warm_steps):
        batch = train_blocks[order[step]]
        loss = model(batch, labels=batch)
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"warm-up: {args.warm_steps} AdamW steps at lr {args.lr:g}, last loss {loss.item():.3f}", flush=True)
    batch_a = gradients_and_inputs(model, train_blocks[order[args.warm_steps]])
    batch_b = gradients_and_inputs(model, train_blocks[order[args.warm_steps + 1]])

    rows: list[dict[str, Any]] = []
    for name, (g_b, x_b) in batch_b.items():
        x_a = batch_a[name][1]
        n = g_b.shape[1]
        for frac in (0.25, 0.125):
            r = round(frac * n)
            seeds = [layer_seed(0, name, w) for w in range(args.draws)]

            def add(kind: str, k: int, projections: list[torch.Tensor], theory_sq: float, basis: str = "-",
                    principal_rank: float = 0.0) -> None:
                errs = rel_errors(g_b, projections)
                rows.append({"layer": name, "n": n, "r": r, "projection": kind, "k": k, "principal_rank": principal_rank,
                             "basis": basis,
                             "rel_err_mean": statistics.fmean(errs),
                             "rel_err_rms": math.sqrt(statistics.fmean(e * e for e in errs)),
                             "theory_rms": math.sqrt(theory_sq)})

            add("gaussian", 0, [make_projection(n, r, sd, dtype=torch.float64) for sd in seeds], (n + 1) / r)
            add("orthogonal", 0, [make_projection(n, r, sd, projection="orthogonal", dtype=torch.float64) for sd in seeds],
                (n - r) / r)
            for pf in PRINCIPAL_FRACTIONS:
                k = resolve_principal_rank(pf, r)
                for basis, x in (("same", x_b), ("held", x_a)):
                    keys = [torch.tensor(seed_keys(sd), dtype=torch.int32) for sd in seeds]
                    ps = [principal_projection(x, r, k, kk, dtype=torch.float64) for kk in keys]
                    # Theory per draw: (n − r)/(r − k) · ‖G Π_c‖²/‖G‖², Π_c the complement of that draw's U_k.
                    shares = []
                    for p in ps:
                        u = p[:, :k]
                        gc = g_b - (g_b @ u) @ u.t()
                        shares.append(float(gc.norm() ** 2 / g_b.norm() ** 2))
                    add("principal", k, ps, (n - r) / (r - k) * statistics.fmean(shares), basis, pf)
        print(f"  {name} done ({time.perf_counter() - started:.0f} s)", flush=True)

    summary = summarize(rows)
    print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"provenance": provenance(), "args": {k: str(v) for k, v in vars(args).items()},
              "seconds": time.perf_counter() - started, "rows": rows, "summary": summary}
    write_json(args.out / "projection_variance.json", result)


def loss_check(args: argparse.Namespace, started: float) -> None:
    """Final validation loss of each projection at r = n/4 (one seed, one lr); see the module docstring."""
    import math as _math

    from peers import METHODS, Method, Settings, load_blocks, train

    from lightning_compact.layers import CompActLinear

    s = Settings(steps=args.loss_steps)
    data = load_blocks(s)
    original = CompActLinear.refresh_principal_basis
    results = []
    for label in args.loss_methods.split(","):
        if label == "principal_c_step":
            method = Method(label, "compact", dict(METHODS["compact_n4_principal"].options))

            def scaled(self: CompActLinear, input: torch.Tensor) -> None:
                original(self, input)
                n, r, k = self.in_features, self.rank, self.principal_k
                with torch.no_grad():
                    self.projection_cache[:, :k] *= _math.sqrt((n - k) / (r - k))

            CompActLinear.refresh_principal_basis = scaled
        else:
            method = METHODS[label]
        try:
            result = train(method, 0, args.lr, s, data)
        finally:
            CompActLinear.refresh_principal_basis = original
        results.append(result)
        print(f"  {label}: val {result['val_loss']:.4f} ({result['train_seconds']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "loss_check.json", {"provenance": provenance(), "args": {k: str(v) for k, v in vars(args).items()},
                                              "seconds": time.perf_counter() - started, "runs": results})


def summarize(rows: list[dict[str, Any]]) -> str:
    """Mean over layers of each configuration's RMS relative error (measured, and the theory's)."""
    lines = [f"{'rank':>5} {'projection':>10} {'k':>4} {'basis':>5} {'rms e (mean over layers)':>25} "
             f"{'[min, max]':>16} {'theory':>7}"]
    keys = sorted({(round(r["r"] / r["n"], 3), r["projection"], r["principal_rank"], r["basis"]) for r in rows},
                  key=lambda t: (-t[0], t[1] != "gaussian", t[1] != "orthogonal", t[2], t[3]))
    for frac, kind, kfrac, basis in keys:
        sel = [r for r in rows if round(r["r"] / r["n"], 3) == frac and r["projection"] == kind
               and r["principal_rank"] == kfrac and r["basis"] == basis]
        rms = [r["rel_err_rms"] for r in sel]
        theory = statistics.fmean(r["theory_rms"] for r in sel)
        label = "n/4" if abs(frac - 0.25) < 0.01 else "n/8"
        kl = f"{kfrac:.2f}r" if kind == "principal" else "-"
        lines.append(f"{label:>5} {kind:>10} {kl:>4} {basis:>5} {statistics.fmean(rms):>25.3f} "
                     f"[{min(rms):.3f}, {max(rms):.3f}] {theory:>7.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
