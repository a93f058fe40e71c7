"""Where the quickstart's CompAct runs stall: per-step loss, update and activation norms.

Some seeds of the pretraining quickstart (``recipes/quickstart/pretrain_llama_tiny.yaml``)
stall near the byte-unigram plateau with CompAct while the baseline leaves it (steps
10-40 of the former 200 x 16 recipe, 19-49 of today's 400 x 8; benchmarks/RESULTS.md
sections 3 and 7). This runs the recipe as shipped
(``lightning-compact fit`` with its schedule over the recipe's ``max_steps``) and stops it
after ``--steps`` optimizer steps, recording at every step:

* the training loss;
* ``‖ΔW‖_F / ‖W‖_F`` of each weight group (q/k/v, o, gate/up, down, embeddings, lm_head),
  summed over the blocks: how far each group moved in that step;
* the RMS of the final norm's input (the residual stream that reaches ``lm_head``) and
  the share of it that the embeddings account for (``‖embed‖ / ‖residual‖``).

    python benchmarks/diagnostics/quickstart_stall.py --seed 1 --out stall_seed1.json                 # CompAct as shipped
    python benchmarks/diagnostics/quickstart_stall.py --seed 1 --baseline --out stall_seed1_base.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

GROUPS = {
    "qkv": r"self_attn\.[qkv]_proj\.weight$", "o": r"self_attn\.o_proj\.weight$", "gate_up": r"mlp\.(gate|up)_proj\.weight$",
    "down": r"mlp\.down_proj\.weight$", "embed": r"embed_tokens\.weight$", "lm_head": r"lm_head\.weight$",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart/pretrain_llama_tiny.yaml")
    parser.add_argument("--seed", type=int, default=1, help="--seed_everything and --compact.seed")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps recorded (the schedule stays the recipe's)")
    parser.add_argument("--baseline", action="store_true", help="--compact.enabled false")
    parser.add_argument("--out", type=Path)
    parser.add_argument("extra", nargs="*", help="more CLI arguments (e.g. --compact.projection orthogonal)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lightning.pytorch as pl
    import torch

    from lightning_compact.cli import CompActCLI

    cli_args = ["--config", args.recipe, "--seed_everything", str(args.seed), "--compact.seed", str(args.seed),
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--memory.enabled", "false",
                "--trainer.limit_val_batches", "0",
                *(["--compact.enabled", "false"] if args.baseline else []), *args.extra]
    cli = CompActCLI(args=cli_args, run=False, save_config_callback=None)  # no config.yaml in the working directory

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.before: dict[str, torch.Tensor] = {}
            self.stream: dict[str, float] = {}

        def _weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {n: p.detach().clone() for n, p in module.named_parameters() if any(re.search(g, n) for g in GROUPS.values())}

        def on_train_start(self, trainer, pl_module) -> None:
            inner = pl_module.model.model
            inner.norm.register_forward_pre_hook(lambda m, a: self.stream.update(residual=a[0].detach().pow(2).mean().sqrt().item()))
            inner.embed_tokens.register_forward_hook(lambda m, a, out: self.stream.update(embed=out.detach().pow(2).mean().sqrt().item()))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.before = self._weights(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            after = self._weights(pl_module)
            moved: dict[str, float] = {}
            for group, pattern in GROUPS.items():
                names = [n for n in after if re.search(pattern, n)]
                delta = sum((after[n] - self.before[n]).pow(2).sum().item() for n in names) ** 0.5
                norm = sum(self.before[n].pow(2).sum().item() for n in names) ** 0.5
                moved[group] = delta / norm
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.rows.append({"step": trainer.global_step, "loss": float(loss), "relative_update": moved,
                              "residual_rms": self.stream["residual"], "embed_share": self.stream["embed"] / self.stream["residual"]})
            if trainer.global_step >= args.steps:
                trainer.should_stop = True

    record = Record()
    cli.trainer.callbacks.append(record)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    out = {"seed": args.seed, "baseline": args.baseline, "extra": args.extra, "rows": record.rows,
           "command": "python benchmarks/diagnostics/quickstart_stall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": time.perf_counter() - start, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"{'step':>4} {'loss':>6} {'resid':>6} {'emb/res':>7} " + " ".join(f"{g:>8}" for g in GROUPS))
    for r in record.rows[::5]:
        print(f"{r['step']:>4} {r['loss']:6.3f} {r['residual_rms']:6.3f} {r['embed_share']:7.3f} "
              + " ".join(f"{r['relative_update'][g]:8.2e}" for g in GROUPS))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
