"""Attention output projections: converted where that saves memory, never where it would cost some.

Where attention keeps its output for its own backward (SDPA's flash / efficient kernels do)
and the output projection reads that very storage, a converted layer saves that input as
it is instead of an ``x·P`` (:func:`~lightning_compact.functional.input_kept_elsewhere`):
converting then saves nothing and costs nothing. Where the projection reads a fresh copy
(eager attention, or SDPA's math path under attention dropout), converting saves
``(n − r)`` values a token. Each case measures the saved bytes of a steady-state training
step with the layer converted and excluded. Every family's attention output is converted by
default: converting never costs memory, and it gives the layer CompAct's r-space moments and
update rule like every other attention and MLP weight.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lightning_compact import CompActConfig, conversion_report, convert_to_compact
from lightning_compact.functional import input_kept_elsewhere
from lightning_compact.layers import DEFAULT_EXCLUDED_MODULES, matches_any
from lightning_compact.memory import SavedActivationTracker

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, SEQ = 64, 64, 4, 32


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _lm(model):
    tokens = _tokens()
    return model(input_ids=tokens, labels=tokens).loss


def _ours():
    from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=HEADS, max_position_embeddings=64)
    return LlamaForCausalLM(config), lambda m: m(_tokens(), labels=_tokens())


def _hf_llama(impl):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=HEADS, num_key_value_heads=HEADS, attn_implementation=impl)
    return transformers.LlamaForCausalLM(config), _lm


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config), _lm


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                                     intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config), _lm


def _t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=128, num_layers=1,
                                   num_heads=HEADS, dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config), _lm


def _litgpt():
    litgpt = pytest.importorskip("litgpt")
    config = litgpt.Config(block_size=64, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=1, n_head=HEADS,
                           n_embd=HIDDEN, bias=False, parallel_residual=False, norm_class_name="RMSNorm",
                           mlp_class_name="LLaMAMLP", intermediate_size=128)
    return litgpt.GPT(config), lambda m: F.cross_entropy(m(_tokens()).flatten(0, 1), _tokens().flatten())


def _gpt2_dropout():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.1)  # GPT-2's default attn_pdrop
    return transformers.GPT2LMHeadModel(config), _lm


def _bert_dropout():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                                     intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1)
    return transformers.BertForMaskedLM(config), _lm


# family -> (builder, the attention output's name pattern, is its input kept by attention?)
CASES = {
    "lightning_compact llama": (_ours, "o_proj", True),
    "transformers llama (sdpa)": (lambda: _hf_llama("sdpa"), "o_proj", True),
    "transformers llama (eager)": (lambda: _hf_llama("eager"), "o_proj", False),
    "gpt2 (sdpa)": (_gpt2, "attn.c_proj", True),
    "gpt2 (attention dropout)": (_gpt2_dropout, "attn.c_proj", False),
    "bert (sdpa)": (_bert, "attention.output.dense", True),
    "bert (attention dropout)": (_bert_dropout, "attention.output.dense", False),
    "t5": (_t5, "SelfAttention.o", False),
    "litgpt": (_litgpt, "attn.proj", False),
}


def _steady_saved_bytes(model, loss_fn):
    model.train()
    result = 0
    for _ in range(2):  # the second step: projection caches settled at the first
        torch.manual_seed(1)  # the same dropout masks for both models
        with SavedActivationTracker(exclude=[model]) as tracker:
            loss = loss_fn(model)
        loss.backward()
        model.zero_grad(set_to_none=True)
        result = tracker.result().bytes
    return result


@pytest.mark.parametrize("family", list(CASES))
def test_a_converted_attention_output_saves_its_input_or_costs_nothing(family):
    build, pattern, kept = CASES[family]
    torch.manual_seed(0)
    model, loss_fn = build()
    others = [p for p in DEFAULT_EXCLUDED_MODULES if p != pattern]
    converted = copy.deepcopy(model)
    report = conversion_report(convert_to_compact(
        converted, config=CompActConfig(rank=0.25, default_exclusions=False, exclude_modules=others)))
    layers = [layer for name, layer in report.converted.items() if matches_any(name, [pattern])]
    assert layers, f"{pattern!r} names no converted layer of {family}"
    seen = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(input_kept_elsewhere(args[0])))
    excluded = copy.deepcopy(model)
    convert_to_compact(excluded, config=CompActConfig(rank=0.25, exclude_modules=[pattern]))

    saving = _steady_saved_bytes(excluded, loss_fn) - _steady_saved_bytes(converted, loss_fn)
    assert set(seen) == {kept}
    if kept:
        assert saving == 0  # the kept input is read in the backward: no x·P stored
    else:
        per_token = sum(layer.in_features - layer.rank for layer in layers)
        assert saving == per_token * 2 * SEQ * 4  # fp32, 2 x SEQ tokens through each layer
    # The default converts every family's attention output.
    assert matches_any(pattern, DEFAULT_EXCLUDED_MODULES) is None


def test_a_kept_input_gives_the_same_gradients():
    """Reading SDPA's kept output instead of storing x·P changes no number: Ĝ and the exact weight gradient."""
    torch.manual_seed(0)
    model, loss_fn = _ours()
    model = model.double()
    others = [p for p in DEFAULT_EXCLUDED_MODULES if p != "o_proj"]
    config = CompActConfig(rank=0.25, default_exclusions=False, exclude_modules=others, grad_mode="compressed")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    convert_to_compact(a, config=config)
    convert_to_compact(b, config=config)
    seen = []
    a.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(input_kept_elsewhere(args[0])))
    loss_fn(a).backward()
    assert seen == [True]
    import lightning_compact.functional as functional

    original = functional.input_kept_elsewhere
    functional.input_kept_elsewhere = lambda _t: False  # b: x·P stored as for any other input
    try:
        loss_fn(b).backward()
    finally:
        functional.input_kept_elsewhere = original
    o_a, o_b = a.model.layers[0].self_attn.o_proj, b.model.layers[0].self_attn.o_proj
    err = (o_a.weight_delta.grad - o_b.weight_delta.grad).norm() / o_b.weight_delta.grad.norm()
    assert err < 1e-12
    # Decompressed mode: Ĝ Pᵀ from the kept input equals Ĝ Pᵀ from a stored x·P (what a compiled
    # model computes there), not the exact gradient.
    decompressed = dataclasses.replace(config, grad_mode="decompressed")
    c, d = copy.deepcopy(model), copy.deepcopy(model)
    convert_to_compact(c, config=decompressed)
    convert_to_compact(d, config=decompressed)
    loss_fn(c).backward()
    functional.input_kept_elsewhere = lambda _t: False
    try:
        loss_fn(d).backward()
    finally:
        functional.input_kept_elsewhere = original
    got, stored = c.model.layers[0].self_attn.o_proj.weight.grad, d.model.layers[0].self_attn.o_proj.weight.grad
    assert (got - stored).norm() / stored.norm() < 1e-12
    plain = copy.deepcopy(model)
    loss_fn(plain).backward()
    exact = plain.model.layers[0].self_attn.o_proj.weight.grad
    assert (got - exact).norm() / exact.norm() > 0.1  # an estimate (r = n/4), as for every converted layer
