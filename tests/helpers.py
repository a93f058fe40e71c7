"""Shared test fixtures: a LightningModule that knows nothing of CompAct."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent

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


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with FSDP2's DTensors gathered into full tensors (copies)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in module.state_dict().items()}


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


def run_two_ranks(script: str, out_dir: Path, *args: str, port_base: int, timeout: int = 300) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``tests/<script>`` (which starts its own 2 gloo processes) and load what each rank saved as ``rank<r>.pt``.

    ``port_base`` keeps concurrent test files off each other's rendezvous port.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port_base + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), str(out_dir), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2))
    return r0, r1


def run_python(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in a subprocess from the repository root, the package on ``PYTHONPATH``; ``env``: more variables."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# Runs a script as on the GPU machine, where `datasets` and `jsonargparse` are not
# installed: `run_python("-c", WITHOUT_DATA_DEPS, script, args...)` (`import datasets` raises ImportError).
WITHOUT_DATA_DEPS = """
import os, runpy, sys
for name in ("datasets", "jsonargparse"):
    sys.modules[name] = None
script, *args = sys.argv[1:]
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` has: its sibling modules
runpy.run_path(script, run_name="__main__")
"""
