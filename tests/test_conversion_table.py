"""The conversion table says what is true: frozen layers, the optimizer, modules compiled after conversion."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning.pytorch import Callback

from helpers import PlainLM, make_trainer, token_loader
from lightning_compact import CompAct, CompActCallback
from lightning_compact.layers import FROZEN_REASON, CompActLinear, canonical_name


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def test_a_frozen_layer_is_not_converted_and_holds_no_cache():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    compact = CompAct(rank=4, cache_projections=True)
    compact.convert(model)
    assert list(compact.layers) == ["2"] and isinstance(model[2], CompActLinear)
    assert compact.report.skipped == {"0": FROZEN_REASON}
    assert type(model[0]) is nn.Linear
    assert compact.projection_cache_bytes == model[2].projection_cache_bytes > 0
    # The table claims per-token savings for the converted layer only: 32 - 4 elements.
    assert "Up to 56 B per token" in compact.format_table()


def test_the_table_claims_compressed_moments_only_once_compact_adamw_exists():
    model = _mlp()
    compact = CompAct(rank=4, grad_mode="compressed")
    compact.convert(model)
    assert "no CompActAdamW has been made" in compact.format_table()
    opt = compact.optimizer(torch.optim.AdamW(model.parameters()))
    assert "Gradients and Adam moments of them kept compressed (CompActAdamW" in compact.format_table()
    assert "decompressed to full size before each optimizer step" in compact.format_table(decompressed_before_step=True)
    del opt


class TableSpy(Callback):
    """Keeps the CompAct callback's layers and table as training starts (teardown restores the model)."""

    def __init__(self, cb):
        self.cb, self.seen = cb, {}

    def on_train_start(self, trainer, pl_module):
        self.seen = {"layers": dict(self.cb.layers), "table": self.cb.format_table()}


def test_the_callback_table_names_a_foreign_optimizer_honestly(tmp_path):
    cb = CompActCallback(rank=4, grad_mode="auto")
    spy = TableSpy(cb)
    make_trainer(tmp_path, [cb, spy], max_steps=1).fit(PlainLM(optimizer="sgd"), token_loader())
    text = spy.seen["table"]
    assert spy.seen["layers"]
    assert "CompActAdamW" not in text.splitlines()[1]
    assert "decompressed to full size before each optimizer step" in text


class CompiledAfterConversion(PlainLM):
    """Replaces its network by the compiled one in configure_model, after CompActCallback converted it at setup."""

    def configure_model(self):
        if not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model, backend="eager")


def test_a_module_compiled_after_conversion_is_listed_once_under_its_own_names(tmp_path):
    module = CompiledAfterConversion()
    plain_names = [n for n, m in module.model.named_modules() if isinstance(m, nn.Linear)]
    cb = CompActCallback(rank=4)
    spy = TableSpy(cb)
    make_trainer(tmp_path, [cb, spy], max_steps=1).fit(module, token_loader())
    seen = spy.seen
    layers = seen["layers"]
    assert not any("_orig_mod" in n for n in layers)
    assert len(layers) == len({id(layer) for layer in layers.values()})  # one entry per layer
    assert set(layers) <= {f"model.{n}" for n in plain_names}
    assert seen["table"].count("\nmodel.model.layers.0.self_attn.q_proj ") == 1
    assert canonical_name("model._orig_mod.layers.0") == "model.layers.0"


@pytest.mark.parametrize("grad_mode,optimizer,warns", [("decompressed", "adamw", True), ("auto", "sgd", True),
                                                        ("auto", "adamw", False)])
def test_clipping_decompressed_gradients_is_warned_about(tmp_path, grad_mode, optimizer, warns):
    cb = CompActCallback(rank=4, grad_mode=grad_mode)
    trainer = make_trainer(tmp_path, [cb], max_steps=1, gradient_clip_val=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PlainLM(optimizer=optimizer), token_loader())
    said = any("clips decompressed gradients" in str(w.message) for w in caught)
    assert said == warns


def _first_forward(in_features, out_features, rank, tokens):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    convert_to_compact_auto = CompAct(rank=rank, cache_projections="auto")
    convert_to_compact_auto.convert(model)
    model(torch.randn(tokens, in_features)).sum().backward()
    return model[0]


def test_auto_cache_is_kept_at_small_micro_batches_unless_larger_than_the_weight():
    # 8 tokens: the activation saving (8 x 48 values) is far below the cache (64 x 16), but the cache is a
    # quarter of the layer's weight: kept, so P is not rebuilt in every forward and backward.
    layer = _first_forward(64, 64, 16, tokens=8)
    assert layer.projection_cache is not None and layer.cache_mode is True
    # A wide input with a narrow output (a LoRA down-projection): the cache would be 16x the weight: dropped.
    layer = _first_forward(256, 4, 64, tokens=8)
    assert layer.projection_cache is None and layer.cache_mode is False
    # Many tokens: kept whatever the weight, the activation saving dwarfs it.
    layer = _first_forward(256, 4, 64, tokens=4096)
    assert layer.projection_cache is not None


@pytest.mark.parametrize("grad_mode", ["compressed", "decompressed"])
def test_the_table_accounts_for_the_parameters_the_model_summary_adds(grad_mode):
    """Issue 24: Lightning's summary counts each weight_delta; the table says how many and what they are."""
    from lightning.pytorch.utilities.model_summary import summarize

    torch.manual_seed(0)
    module = PlainLM()
    before = summarize(module).total_parameters
    compact = CompAct(rank=4, grad_mode=grad_mode)
    compact.convert(module)
    added = summarize(module).total_parameters - before
    table = compact.format_table()
    if grad_mode == "decompressed":
        assert added == 0 and "weight_delta" not in table
        return
    expected = sum(layer.out_features * layer.rank for layer in compact.layers.values())
    assert added == expected > 0
    assert f"weight_delta: {expected / 1e6:.2f} M parameters the model summary counts" in table
