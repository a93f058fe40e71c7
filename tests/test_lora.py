"""LoRA (PEFT): CompAct compresses the input of each adapter's down-projection, and nothing frozen."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_compact import CompAct
from lightning_compact.layers import FROZEN_REASON
from lightning_compact.memory import SavedActivationTracker

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(hidden=32, intermediate=64, layers=1, vocab=64, r=4, init=True, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype)
    # init_lora_weights=False: lora_B random too (PEFT's default zero B would make lora_A's gradient zero).
    lora = peft.LoraConfig(r=r, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=init)
    return peft.get_peft_model(model, lora)


def test_only_the_lora_down_projections_are_converted():
    model = lora_llama(layers=2)
    compact = CompAct(rank=0.25)
    compact.convert(model)
    converted = set(compact.layers)
    # Every lora_A, the attention output's included (it reads SDPA's kept output: no memory either way).
    expected = {n for n, _ in model.named_modules() if n.endswith("lora_A.default")}
    assert converted == expected and len(converted) == 2 * 7
    skipped = compact.report.skipped
    frozen = [n for n in skipped if n.endswith("base_layer") or n.endswith("lm_head")]
    assert len(frozen) == 2 * 7 + 1 and all(skipped[n] == FROZEN_REASON for n in frozen)
    lora_b = [n for n in skipped if ".lora_B." in n]
    assert len(lora_b) == 2 * 7 and all("LoRA up-projection" in skipped[n] for n in lora_b)
    # The rank is relative to the layer's own (n-wide) input: down_proj's lora_A reads the intermediate size.
    assert {layer.rank for n, layer in compact.layers.items() if "down_proj" in n} == {16}
    assert {layer.rank for n, layer in compact.layers.items() if "down_proj" not in n} == {8}
    table = compact.format_table()
    assert table.count("skipped: frozen") == len(frozen)
    assert compact.projection_cache_bytes == sum(layer.projection_cache_bytes for layer in compact.layers.values())


def test_lora_gradients_are_unbiased_and_frozen_weights_get_none():
    """E[Ĝ Pᵀ] = G for lora_A (decompressed mode); lora_B's gradient is exact; base weights get no gradient."""
    model = lora_llama(init=False, dtype=torch.float64)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    reference(input_ids=tokens, labels=tokens).loss.backward()
    exact = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}

    compact = CompAct(rank=4, grad_mode="decompressed")
    compact.convert(model)
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in exact}
    k = 400
    for seed in range(k):
        compact.set_seed(seed)
        compact.step(0)
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                samples[n].append(p.grad.clone())
            else:
                assert p.grad is None, n
    for n, grads in samples.items():
        g = torch.stack(grads)
        if ".lora_A." in n:
            # Each entry's sample mean within 5 standard errors of the exact gradient.
            z = (g.mean(0) - exact[n]) / (g.std(0) / math.sqrt(k)).clamp_min(1e-30)
            assert z.abs().max() < 5, n
            assert g.std(0).max() > 0, n  # an estimate, not the exact gradient
        else:
            # Nothing upstream of these is compressed in the forward: their gradients are exact.
            assert torch.allclose(g, exact[n].expand_as(g), rtol=1e-10, atol=1e-12), n


def _saved_bytes(model, tokens):
    with SavedActivationTracker(exclude=[model]) as tracker:
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker.result().bytes


def test_compressing_lora_inputs_saves_exactly_the_adapted_inputs():
    """Saved bytes fall by (n − r) per token for each distinct lora_A input (q/k/v share one, gate/up one)."""
    hidden, intermediate, layers = 64, 128, 2
    model = lora_llama(hidden=hidden, intermediate=intermediate, layers=layers)
    model.train()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    plain = _saved_bytes(model, tokens)
    CompAct(rank=0.25, share_projection=True).convert(model)
    # The first step, where cache_projections="auto" decides (and frees the caches it drops), and the next.
    compressed, steady = _saved_bytes(model, tokens), _saved_bytes(model, tokens)
    assert compressed == steady
    per_token = layers * ((hidden - hidden // 4) * 2 + (intermediate - intermediate // 4))  # qkv, gate/up, down
    assert plain - compressed == per_token * tokens.numel() * 4


def _train(model, compact, steps=40, lr=3e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    if compact is not None:
        compact.convert(model)
        opt = compact.optimizer(opt)
        assert type(opt).__name__ == "CompActAdamW"
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for step in range(steps):
        if compact is not None:
            compact.step(step)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def test_lora_trains_with_compact_adamw_and_leaves_the_base_untouched():
    plain, _ = _train(lora_llama(), None)
    model = lora_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    compact = CompAct(rank=0.25, grad_mode="compressed")
    losses, opt = _train(model, compact)
    assert "kept compressed (CompActAdamW" in compact.format_table()
    assert losses[0] == pytest.approx(plain[0], rel=1e-6)  # same model, same batch
    # It learns: at least half of plain LoRA's loss reduction on this batch.
    assert losses[0] - losses[-1] > 0.5 * (plain[0] - plain[-1]) > 0
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    compact.restore(model)
    assert not any(type(m).__name__ == "CompActLinear" for m in model.modules())
