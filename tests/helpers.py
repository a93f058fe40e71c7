"""Shared test fixtures: a LightningModule that knows nothing of CompAct."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)


def token_loader(n_samples: int = 16, seq_len: int = 16, batch_size: int = 4, vocab: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n_samples, seq_len), generator=g)
    return DataLoader(TensorDataset(tokens), batch_size=batch_size, shuffle=False)


class PlainLM(pl.LightningModule):
    """A plain causal LM: plain nn.Linear layers, plain AdamW."""

    def __init__(self, config: LlamaConfig = TINY_LLAMA, lr: float = 1e-2, optimizer: str = "adamw") -> None:
        super().__init__()
        self.model = LlamaForCausalLM(config)
        self.lr = lr
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        loss = self.model(tokens, labels=tokens)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (tokens,) = batch
        self.log("val/loss", self.model(tokens, labels=tokens))

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass
