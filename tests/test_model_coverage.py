"""Model coverage: which layers CompAct converts in each model family, and that one step is right.

Every model is built from a tiny config (no download). For each family the test checks
that the default exclusions convert exactly the layers listed below (the README's "Model
coverage" table), that every converted layer really runs through ``CompActLinear.forward``
and gets its compressed gradient, that the loss and every other gradient equal the plain
model's (CompAct's forward and ``∂L/∂x`` are exact, so only the converted weights'
gradients may differ), and that ``restore_linear`` gives the original module types back.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compact import CompActConfig, CompActLinear, conversion_report, convert_to_compact, restore_linear
from lightning_compact.layers import CompActConv1D

transformers = pytest.importorskip("transformers")
# transformers 5 renamed ViT's layers to the LLaMA style (q_proj, o_proj, mlp.fc1).
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

VOCAB, HIDDEN, FFN, LAYERS, HEADS, SEQ, BATCH, LABELS = 64, 32, 64, 2, 4, 8, 2, 3
RANK = 4


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _decoder_lm(model_cls: str, config_cls: str) -> nn.Module:
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
    )
    return getattr(transformers, model_cls)(config)


def _encoder_classifier(model_cls: str, config_cls: str) -> nn.Module:
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, num_labels=LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return getattr(transformers, model_cls)(config)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, num_labels=LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(config)


class TorchEncoderClassifier(nn.Module):
    """torch's own nn.TransformerEncoder (attention through nn.MultiheadAttention) with a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(HIDDEN, LABELS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def _torch_encoder() -> nn.Module:
    torch.manual_seed(0)
    return TorchEncoderClassifier()


def _lm_loss(model: nn.Module) -> torch.Tensor:
    tokens = _tokens()
    return model(input_ids=tokens, labels=tokens).loss


def _classification_loss(model: nn.Module) -> torch.Tensor:
    return model(input_ids=_tokens(), labels=torch.tensor([0, 2])).loss


def _vit_loss(model: nn.Module) -> torch.Tensor:
    pixels = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model(pixel_values=pixels, labels=torch.tensor([0, 2])).loss


def _torch_encoder_loss(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(_tokens()), torch.tensor([0, 2]))


# Attention outputs (o_proj) are converted: reading SDPA's kept output, they cost no memory.
_LLAMA_LIKE = dict(
    converted={"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"},
    skipped={"lm_head": "output head"},
    n_converted=7 * LAYERS,
)
_BERT_LIKE = dict(
    converted={"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense"},
    n_converted=6 * LAYERS,
)


@dataclasses.dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module], torch.Tensor]
    # Layer names relative to their block (everything up to the last index dropped):
    converted: set[str]
    skipped: dict[str, str]  # name -> start of the reason the report gives
    n_converted: int
    config: dict = dataclasses.field(default_factory=dict)  # CompActConfig overrides


FAMILIES = {
    "llama": Family(lambda: _decoder_lm("LlamaForCausalLM", "LlamaConfig"), _lm_loss, **_LLAMA_LIKE),
    "mistral": Family(lambda: _decoder_lm("MistralForCausalLM", "MistralConfig"), _lm_loss, **_LLAMA_LIKE),
    "qwen2": Family(lambda: _decoder_lm("Qwen2ForCausalLM", "Qwen2Config"), _lm_loss, **_LLAMA_LIKE),
    # transformers' Conv1D ([in, out] weight). The attention output attn.c_proj is converted:
    # its input is a fresh copy, or SDPA's kept output, read in the backward (tests/test_attention_output.py).
    "gpt2": Family(
        _gpt2, _lm_loss,
        converted={"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
        skipped={"lm_head": "output head"},
        n_converted=4 * LAYERS,
    ),
    "bert": Family(
        lambda: _encoder_classifier("BertForSequenceClassification", "BertConfig"), _classification_loss,
        skipped={"bert.pooler.dense": "pooler", "classifier": "output head"},
        **_BERT_LIKE,
    ),
    # RoBERTa's head is a module, classifier.{dense,out_proj}: both excluded as the head.
    "roberta": Family(
        lambda: _encoder_classifier("RobertaForSequenceClassification", "RobertaConfig"), _classification_loss,
        skipped={"classifier.dense": "output head", "classifier.out_proj": "output head"},
        **_BERT_LIKE,
    ),
    # T5's attention outputs ("o") are converted, like GPT-2's and BERT's.
    "t5": Family(
        _t5, _lm_loss,
        converted={"SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
                   "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o",
                   "DenseReluDense.wi", "DenseReluDense.wo"},
        skipped={"lm_head": "output head"},
        n_converted=6 * LAYERS + 10 * LAYERS,  # encoder blocks: self-attention + MLP; decoder: + cross-attention
    ),
    "vit": Family(
        _vit, _vit_loss,
        converted={"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"}
        if _TRANSFORMERS_5 else
        {"attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense",
         "intermediate.dense", "output.dense"},
        skipped={"classifier": "output head"},
        n_converted=6 * LAYERS,
    ),
    "torch_encoder": Family(
        _torch_encoder, _torch_encoder_loss,
        converted={"linear1", "linear2"},
        skipped={"self_attn.out_proj": "nn.MultiheadAttention reads this weight directly", "head": "output head"},
        n_converted=2 * LAYERS,
    ),
    # Without the default exclusions out_proj is still never converted: nn.MultiheadAttention
    # reads out_proj.weight itself, so a CompActLinear there would be listed but never run.
    "torch_encoder_no_default_exclusions": Family(
        _torch_encoder, _torch_encoder_loss,
        converted={"linear1", "linear2", "head"},
        skipped={"self_attn.out_proj": "nn.MultiheadAttention reads this weight directly"},
        n_converted=2 * LAYERS + 1,
        config=dict(default_exclusions=False),
    ),
}


def _relative(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``self_attn.q_proj``; names outside a block stay whole."""
    parts = name.split(".")
    last_index = max((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), default=-1)
    return ".".join(parts[last_index + 1 :])


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_family(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = FAMILIES[family]
    torch.manual_seed(0)
    model = spec.build().train()
    plain = copy.deepcopy(model)
    plain_types = {name: type(m) for name, m in model.named_modules()}
    plain_params = dict(model.named_parameters())
    plain_shapes = {k: v.shape for k, v in model.state_dict().items()}

    # 1. The expected layers, and only real ones, are converted.
    assert convert_to_compact(model, config=CompActConfig(rank=RANK, grad_mode="compressed", **spec.config)) is model
    report = conversion_report(model)
    assert {_relative(n) for n in report.converted} == spec.converted
    assert len(report.converted) == spec.n_converted
    assert {_relative(n): r for n, r in report.skipped.items()}.keys() == spec.skipped.keys()
    for name, reason in report.skipped.items():
        assert reason.startswith(spec.skipped[_relative(name)]), (name, reason)
    # Every linear layer of the model is accounted for, converted or skipped with a reason.
    linear_layers = {n for n, m in plain.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    assert set(report.converted) | set(report.skipped) == linear_layers
    converted_modules = {name for name, m in model.named_modules() if isinstance(m, CompActLinear)}
    assert converted_modules == set(report.converted)
    for name, layer in report.converted.items():
        assert model.get_submodule(name) is layer
        expected_cls = CompActConv1D if plain_types[name].__name__ == "Conv1D" else CompActLinear
        assert type(layer) is expected_cls, name
    # Same Parameters, same checkpoint layout (Conv1D keeps its [in, out] weight).
    assert {k: v.shape for k, v in model.state_dict().items()} == plain_shapes
    assert all(p is plain_params[n] for n, p in model.named_parameters() if not n.endswith("weight_delta"))

    # A layer listed as converted must actually run through CompActLinear.forward.
    ran: set[int] = set()
    compact_forward = CompActLinear.forward

    def recording_forward(self, input):
        ran.add(id(self))
        return compact_forward(self, input)

    monkeypatch.setattr(CompActLinear, "forward", recording_forward)

    # 2. One training step in compressed mode: Ĝ in weight_delta.grad, no weight.grad.
    loss = spec.loss(model)
    loss.backward()
    monkeypatch.undo()
    assert ran == {id(layer) for layer in report.converted.values()}
    for name, layer in report.converted.items():
        assert layer.weight_delta is not None and layer.weight_delta.grad is not None, name
        assert layer.weight_delta.grad.shape == (layer.out_features, RANK), name
        assert torch.count_nonzero(layer.weight_delta.grad) > 0, name
        assert layer.weight.grad is None, name

    # 3. The forward is exact, and so is every gradient but the converted weights'.
    plain_loss = spec.loss(plain)
    plain_loss.backward()
    assert _rel_err(loss.detach(), plain_loss.detach()) < 1e-6, (loss.item(), plain_loss.item())
    converted_weights = {f"{name}.weight" for name in report.converted}
    compared = 0
    for name, p in plain.named_parameters():
        if name in converted_weights:
            continue
        got = model.get_parameter(name).grad
        if p.grad is None:  # e.g. T5's relative attention bias outside the first block
            assert got is None, name
            continue
        assert got is not None, name
        assert _rel_err(got, p.grad) < 1e-5, (name, _rel_err(got, p.grad))
        compared += 1
    assert compared > 0

    # 4. restore_linear gives back the original module types (Conv1D for GPT-2), same
    # Parameters, and a model that computes the plain loss.
    assert restore_linear(model) is model
    assert {name: type(m) for name, m in model.named_modules()} == plain_types
    restored_params = dict(model.named_parameters())
    assert restored_params.keys() == plain_params.keys()
    assert all(restored_params[n] is p for n, p in plain_params.items())
    assert conversion_report(model).converted == {}
    with torch.no_grad():
        assert _rel_err(spec.loss(model), spec.loss(plain)) < 1e-6
