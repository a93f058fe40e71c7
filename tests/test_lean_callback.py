"""LeanActivations in a Trainer: the same losses as without it, step by step, and a report of the swaps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import PlainLM, make_trainer, token_loader
from torch.utils.data import DataLoader

from lightning_compact.callbacks.lean import LeanActivations
from lightning_compact.lean import LeanRMSNorm, LeanSwiGLUMLP
from lightning_compact.models.causal_lm import CausalLMModule

# Float32 training: the lean ops sum in other orders (chunked loss, recomputed norm
# statistics), ~1e-7 relative per step; four AdamW steps at lr 1e-2 amplify that a little.
TOL = 1e-5


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, module: pl.LightningModule, loader, lean: LeanActivations | None, steps: int = 4) -> list[float]:
    record = _Losses()
    callbacks = [record] + ([lean] if lean is not None else [])
    make_trainer(tmp_path, callbacks=callbacks, max_steps=steps).fit(module, loader)
    return record.losses


def _assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) >= 2
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= TOL * abs(y), (a, b)


def test_lean_activations_keep_the_losses_of_a_plain_run_of_the_project_llama(tmp_path):
    torch.manual_seed(0)
    plain = _fit(tmp_path, PlainLM(), token_loader(), None)
    torch.manual_seed(0)
    module, lean = PlainLM(), LeanActivations()
    losses = _fit(tmp_path, module, token_loader(), lean)
    _assert_close(losses, plain)
    assert module.model.lean_loss and all(layer.mlp.lean for layer in module.model.model.layers)
    assert len(lean.report.swapped) == 5 + 2 + 1


def test_lean_activations_print_a_table_of_the_swaps(tmp_path, caplog):
    caplog.set_level("INFO")
    torch.manual_seed(0)
    _fit(tmp_path, PlainLM(), token_loader(), LeanActivations(mlp=False))
    text = caplog.text
    assert "5x RMSNorm" in text and "->  rms_norm" in text
    assert "chunked_linear_cross_entropy" in text and "swiglu" not in text


def test_lean_activations_keep_the_losses_of_a_transformers_llama_in_causal_lm_module(tmp_path):
    pytest.importorskip("transformers")
    overrides = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": t} for t in tokens], batch_size=4)
    runs = {}
    for name, lean in (("plain", None), ("lean", LeanActivations())):
        torch.manual_seed(0)
        module = CausalLMModule(model="llama", pretrained=False, config_overrides=overrides, lr=1e-2, warmup_ratio=0.0)
        runs[name] = _fit(tmp_path, module, loader, lean, steps=2)
    _assert_close(runs["lean"], runs["plain"])
    assert sum(isinstance(m, LeanRMSNorm) for m in module.modules()) == 5
    assert sum(isinstance(m, LeanSwiGLUMLP) for m in module.modules()) == 2


def test_a_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_size"):
        LeanActivations(chunk_size=0)
