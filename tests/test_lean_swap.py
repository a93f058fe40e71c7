"""apply_lean on this project's LLaMA and on tiny transformers models: same loss, same gradients.

Tolerances. The plain causal-LM losses cast the logits to float32 (``.float()``) and
transformers' RMSNorm rounds through float32 even in a float64 model, so those models
are compared in float32: unit roundoff 6e-8, and the lean ops sum in other orders
(chunked loss, recomputed normalisation), which through two layers stays near 1e-6;
``FP32_TOL = 1e-5``. Models without those casts (BERT, RoBERTa, GPT-2 without its
loss) are compared in float64 at 1e-10. A float32 run under bf16 autocast is checked
against float64.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers
from helpers import TINY_LLAMA
from lean_helpers import rel_err, saved_bytes
from torch import nn

from lightning_compact.lean import LeanGELU, LeanLayerNorm, LeanReport, LeanRMSNorm, LeanSwiGLUMLP, apply_lean
from lightning_compact.models.llama import LlamaForCausalLM

F64_TOL = 1e-10  # a whole model in float64: many ops, each exact to ~1e-16
FP32_TOL = 1e-5


def _tokens(vocab: int, b: int = 2, s: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0))


def _loss_and_grads(model: nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_signal(plain: nn.Module, lean: nn.Module, loss_fn, tol: float = FP32_TOL) -> None:
    p_loss, p_grads = _loss_and_grads(plain, loss_fn)
    l_loss, l_grads = _loss_and_grads(lean, loss_fn)
    assert rel_err(l_loss, p_loss) < tol
    assert p_grads.keys() == l_grads.keys() and p_grads
    for name, g in p_grads.items():
        assert rel_err(l_grads[name], g) < tol, name


def _ours() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(TINY_LLAMA)


def _ours_loss(model):
    tokens = _tokens(TINY_LLAMA.vocab_size)
    return model(tokens, labels=tokens)


def test_project_llama_swapped_keeps_loss_and_gradients_and_reports_each_swap():
    plain = _ours()
    report = LeanReport()
    lean = apply_lean(copy.deepcopy(plain), report=report)
    ops = [e.op for e in report.swapped]
    assert ops.count("rms_norm") == 2 * 2 + 1 and ops.count("swiglu") == 2 and ops.count("chunked_linear_cross_entropy") == 1
    _assert_same_training_signal(plain, lean, _ours_loss)
    assert lean.state_dict().keys() == plain.state_dict().keys()


def test_project_llama_with_the_lean_config_flag_is_the_swapped_model():
    swapped = apply_lean(_ours())
    torch.manual_seed(0)
    native = LlamaForCausalLM(dataclasses.replace(TINY_LLAMA, lean=True))
    _assert_same_training_signal(swapped, native, _ours_loss, tol=1e-12)  # the same ops: bitwise


def test_project_llama_lean_saves_fewer_activation_bytes():
    # float32 under bf16 autocast, the bf16-mixed recipe; vocab larger than the hidden size, as in real LMs.
    config = dataclasses.replace(TINY_LLAMA, vocab_size=512)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config)
    lean = apply_lean(copy.deepcopy(plain))
    tokens = _tokens(512, b=4, s=32)
    sizes = {}
    for name, model in (("plain", plain), ("lean", lean)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sizes[name], loss = saved_bytes(lambda m=model: m(tokens, labels=tokens), exclude=list(model.parameters()))
        loss.backward()
    assert sizes["lean"] < 0.6 * sizes["plain"], sizes


def test_applying_twice_changes_nothing_more():
    model = apply_lean(_ours())
    report = LeanReport()
    apply_lean(model, report=report)
    assert report.entries == []


def test_module_filter_fn_limits_the_swaps():
    report = LeanReport()
    apply_lean(_ours(), module_filter_fn=lambda m, name: name.startswith("model.layers.0."), report=report)
    assert {e.name for e in report.swapped} == {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.0.mlp"}


def test_a_converted_lm_head_keeps_the_plain_loss_and_is_reported():
    model = _ours()

    class Head(nn.Linear):
        pass

    model.lm_head = Head(TINY_LLAMA.hidden_size, TINY_LLAMA.vocab_size, bias=False)
    report = LeanReport()
    apply_lean(model, report=report)
    assert not model.lean_loss
    assert [e.name for e in report.skipped] == [""] and "not a plain nn.Linear" in report.skipped[0].reason


# ---------------------------------------------------------------- transformers models

_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)


def _hf(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config) if not isinstance(config, tuple) else config[0](config[1])
    return model.to(dtype)


def _hf_loss(model):
    tokens = _tokens(model.config.vocab_size)
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize(
    "config",
    [
        transformers.LlamaConfig(**_SMALL),
        transformers.MistralConfig(**_SMALL),
        transformers.Qwen2Config(**_SMALL),
    ],
    ids=["llama", "mistral", "qwen2"],
)
def test_hf_llama_family_swapped_keeps_loss_and_gradients(config):
    plain = _hf(config)
    report = LeanReport()
    lean = apply_lean(copy.deepcopy(plain), report=report)
    assert sum(isinstance(m, LeanRMSNorm) for m in lean.modules()) == 2 * 2 + 1
    assert sum(isinstance(m, LeanSwiGLUMLP) for m in lean.modules()) == 2
    assert [e.op for e in report.swapped].count("chunked_linear_cross_entropy") == 1
    _assert_same_training_signal(plain, lean, _hf_loss)
    assert lean.state_dict().keys() == plain.state_dict().keys()
    # Without labels (or without gradients) the forward is the plain one and returns logits.
    tokens = _tokens(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(lean(input_ids=tokens).logits, plain(input_ids=tokens).logits)
        assert lean(input_ids=tokens, labels=tokens).logits is not None


def test_hf_gpt2_swapped_keeps_loss_and_gradients():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    plain = _hf(config)
    lean = apply_lean(copy.deepcopy(plain))
    assert sum(isinstance(m, LeanLayerNorm) for m in lean.modules()) == 2 * 2 + 1
    assert [m.approximate for m in lean.modules() if isinstance(m, LeanGELU)] == ["tanh", "tanh"]
    _assert_same_training_signal(plain, lean, _hf_loss)
    # Norms and GELU alone, in float64: exact up to float64 rounding.
    plain64 = _hf(config, torch.float64)
    lean64 = apply_lean(copy.deepcopy(plain64), loss=False)
    tokens = _tokens(96)
    _assert_same_training_signal(plain64, lean64, lambda m: m.transformer(input_ids=tokens).last_hidden_state.pow(2).mean(), tol=F64_TOL)


@pytest.mark.parametrize("model_cls,config_cls", [(transformers.BertModel, transformers.BertConfig), (transformers.RobertaModel, transformers.RobertaConfig)], ids=["bert", "roberta"])
def test_hf_bert_family_swapped_keeps_outputs_and_gradients(model_cls, config_cls):
    config = config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96, hidden_dropout_prob=0, attention_probs_dropout_prob=0)
    plain = _hf((model_cls, config), torch.float64)
    lean = apply_lean(copy.deepcopy(plain))
    assert sum(isinstance(m, LeanLayerNorm) for m in lean.modules()) == 1 + 2 * 2  # embeddings + two per layer
    assert [m.approximate for m in lean.modules() if isinstance(m, LeanGELU)] == ["none", "none"]
    tokens = _tokens(96)
    _assert_same_training_signal(plain, lean, lambda m: m(input_ids=tokens).last_hidden_state.pow(2).mean(), tol=F64_TOL)


def test_hf_llama_under_bf16_autocast_is_as_accurate_as_the_plain_model():
    config = transformers.LlamaConfig(**_SMALL)
    ref = _hf(config, torch.float64)
    plain = copy.deepcopy(ref).float()
    lean = apply_lean(copy.deepcopy(plain))
    r_loss, r_grads = _loss_and_grads(ref, _hf_loss)
    errs = {}
    for name, model in (("plain", plain), ("lean", lean)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = _loss_and_grads(model, _hf_loss)
        errs[name] = (rel_err(loss, r_loss), max(rel_err(grads[n], g) for n, g in r_grads.items()))
    # Both run the same bf16 matmuls; the lean one may round differently, not worse (25% slack).
    assert errs["lean"][0] <= 1.25 * errs["plain"][0] + 1e-5, errs
    assert errs["lean"][1] <= 1.25 * errs["plain"][1] + 1e-5, errs


def test_hf_causal_lm_with_the_lean_loss_deep_copies_and_pickles():
    import pickle

    lean = apply_lean(_hf(transformers.LlamaConfig(**_SMALL)))
    for clone in (copy.deepcopy(lean), pickle.loads(pickle.dumps(lean))):
        assert clone.forward.model is clone
        assert rel_err(_hf_loss(clone), _hf_loss(lean)) < 1e-15
