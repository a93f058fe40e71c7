"""apply_checkpointing with CompAct inside: the same loss and gradients as without, and less kept for backward.

Exactness is checked in float64 against the same model (same weights, same projections)
without checkpointing: recomputation replays the same ops on the same inputs, and
CompAct's ``P`` comes from the same keys (or the same cache), so the results agree to
float64 rounding (in practice bit for bit).
"""

from __future__ import annotations

import copy
import importlib

import lightning.pytorch as pl
import pytest
import torch
from helpers import PlainLM, make_trainer, token_loader
from lean_helpers import rel_err
from torch import nn

from lightning_compact import CompActCallback, CompActConfig, CompActLinear, LeanActivations, convert_to_compact
from lightning_compact.checkpointing import (
    apply_checkpointing,
    checkpointed_modules,
    is_block,
    restore_checkpointing,
)
from lightning_compact.lean import apply_lean
from lightning_compact.models.llama import LlamaConfig, LlamaForCausalLM

F64_TOL = 1e-12
GRANULARITIES = ["selective", "blocks"]
# With a fraction too: the first ceil(F * N) blocks checkpointed, the others plain.
WITH_FRACTIONS = [*GRANULARITIES, "blocks:0.5"]
CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _benchmark_module():
    # The byte counter lives with the benchmark that reports its figures (benchmarks/cpu/ is on sys.path: conftest.py).
    return importlib.import_module("checkpointing_memory")


def _tokens(vocab: int, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def _llama(**compact) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).double()
    if compact:
        convert_to_compact(model, config=CompActConfig(rank=0.25, **compact))
    return model.train()


def _loss_and_grads(model: nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref: nn.Module, test: nn.Module, loss_fn, expect: set[str] | None = None) -> dict[str, torch.Tensor]:
    r_loss, r_grads = _loss_and_grads(ref, loss_fn)
    loss, grads = _loss_and_grads(test, loss_fn)
    assert rel_err(loss, r_loss) <= F64_TOL
    assert grads.keys() == r_grads.keys() and len(grads) > 0
    for name, grad in r_grads.items():
        assert rel_err(grads[name], grad) <= F64_TOL, name
    if expect is not None:
        assert expect <= grads.keys()
    return grads


def _llama_loss(model: nn.Module) -> torch.Tensor:
    tokens = _tokens(CONFIG.vocab_size)
    return model(tokens, labels=tokens)


@pytest.mark.parametrize("granularity", WITH_FRACTIONS)
@pytest.mark.parametrize("grad_mode", ["compressed", "decompressed"])
@pytest.mark.parametrize("share_projection", [False, True], ids=["own-P", "shared-P"])
def test_project_llama_with_compact_checkpointed_has_the_same_loss_and_gradients(granularity, grad_mode, share_projection):
    ref = _llama(grad_mode=grad_mode, share_projection=share_projection)
    test = apply_checkpointing(copy.deepcopy(ref), granularity)
    wrapped = CONFIG.num_hidden_layers // 2 if granularity.endswith(":0.5") else CONFIG.num_hidden_layers
    assert len(list(checkpointed_modules(test))) == wrapped
    # The gradient each mode promises is there: δ's in compressed mode, W's otherwise.
    field = "weight_delta" if grad_mode == "compressed" else "weight"
    layers = [n for n, m in test.named_modules() if isinstance(m, CompActLinear)]
    assert len(layers) >= 6 * CONFIG.num_hidden_layers  # q, k, v, gate, up, down (o_proj: default exclusions)
    grads = _assert_same(ref, test, _llama_loss, expect={f"{n}.{field}" for n in layers})
    if grad_mode == "compressed":
        assert not any(f"{n}.weight" in grads for n in layers)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_projection_cache_path_is_exact_under_checkpointing(granularity):
    ref = _llama(grad_mode="compressed", cache_projections=True)
    ref_loss = _llama_loss(ref)  # first forward: the layers decide to keep their cache
    ref_loss.backward()
    assert all(m.projection_cache is not None for m in ref.modules() if isinstance(m, CompActLinear))
    test = apply_checkpointing(copy.deepcopy(ref), granularity)
    _assert_same(ref, test, _llama_loss)


@pytest.mark.parametrize("granularity", WITH_FRACTIONS)
def test_lean_and_compact_checkpointed_have_the_same_loss_and_gradients(granularity):
    ref = apply_lean(_llama(grad_mode="compressed"))
    _assert_same(ref, apply_checkpointing(copy.deepcopy(ref), granularity), _llama_loss)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_bf16_autocast_checkpointed_has_the_same_loss_and_gradients(granularity):
    # The recomputation runs under the forward's autocast state: the same bf16 ops.
    ref = _llama(grad_mode="compressed").float()
    test = apply_checkpointing(copy.deepcopy(ref), granularity)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_loss, r_grads = _loss_and_grads(ref, _llama_loss)
        loss, grads = _loss_and_grads(test, _llama_loss)
    assert torch.equal(loss, r_loss)
    assert grads.keys() == r_grads.keys()
    for name, grad in r_grads.items():
        assert torch.equal(grads[name], grad), name


# ---------------------------------------------------------------- transformers models

transformers = pytest.importorskip("transformers")

_HF_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=96, max_position_embeddings=64)


def _hf_loss(model: nn.Module) -> torch.Tensor:
    tokens = _tokens(model.config.vocab_size)
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("grad_mode", ["compressed", "decompressed"])
def test_hf_llama_with_compact_checkpointed_has_the_same_loss_and_gradients(granularity, grad_mode):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_HF_SMALL)).double().train()
    convert_to_compact(ref, config=CompActConfig(rank=0.25, grad_mode=grad_mode))
    test = apply_checkpointing(copy.deepcopy(ref), granularity)
    assert [type(m).__name__ for _, m, _ in checkpointed_modules(test)] == ["LlamaDecoderLayer"] * 2
    field = "weight_delta" if grad_mode == "compressed" else "weight"
    layers = [n for n, m in test.named_modules() if isinstance(m, CompActLinear)]
    assert layers
    # use_cache is on in the config: the wrapper turns the cache off inside the checkpoint.
    _assert_same(ref, test, _hf_loss, expect={f"{n}.{field}" for n in layers})


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_hf_gpt2_with_compact_checkpointed_has_the_same_loss_and_gradients(granularity):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    ref = transformers.GPT2LMHeadModel(config).double().train()
    convert_to_compact(ref, config=CompActConfig(rank=0.25, grad_mode="compressed"))
    test = apply_checkpointing(copy.deepcopy(ref), granularity)
    assert [type(m).__name__ for _, m, _ in checkpointed_modules(test)] == ["GPT2Block"] * 2
    _assert_same(ref, test, _hf_loss)


def test_recognised_blocks():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, vocab_size=96))
    assert [n for n, m in bert.named_modules() if is_block(m)] == ["encoder.layer.0", "encoder.layer.1"]
    assert not any(is_block(m) for m in _llama().modules() if type(m).__name__ != "LlamaDecoderLayer")
    names = [n for n, _, _ in checkpointed_modules(apply_checkpointing(_llama(), "blocks"))]
    assert names == ["model.layers.0", "model.layers.1"]


# ---------------------------------------------------------------- what is kept for backward


def _retained(model: nn.Module) -> int:
    """Bytes alive at the end of the forward (saved tensors, checkpoint inputs, the selective cache)."""
    bench = _benchmark_module()
    tokens = _tokens(CONFIG.vocab_size, (4, 32))
    with bench.LiveTensorBytes([*model.parameters(), *model.buffers(), tokens]) as live:
        loss = model(tokens, labels=tokens)
        retained = live.current - loss.untyped_storage().nbytes()
    loss.backward()
    return retained


def test_checkpointing_keeps_less_and_selective_keeps_x_p_not_x():
    plain = {g: _retained(apply_checkpointing(_llama(), g)) for g in GRANULARITIES}
    plain[None] = _retained(_llama())
    assert plain["blocks"] < plain["selective"] < plain[None]
    assert _retained(apply_checkpointing(_llama(), "blocks", module_filter_fn=lambda m, n: False)) == plain[None]
    compact = {g: _retained(apply_checkpointing(_llama(grad_mode="compressed"), g)) for g in GRANULARITIES}
    # Selective keeps each CompAct layer's x·P ([tokens, r], r = n/4), never its input:
    # exactly the x·P bytes more than the plain model under selective checkpointing. (o_proj
    # reads SDPA's kept output, which it saves instead of an x·P: nothing more there.)
    tokens = 4 * 32
    xp = sum(tokens * m.rank * 8 for n, m in _llama(grad_mode="compressed").named_modules()
             if isinstance(m, CompActLinear) and not n.endswith("o_proj"))
    assert compact["selective"] - plain["selective"] == xp
    # Blocks recompute x·P too: nothing more than the plain model's block inputs.
    assert compact["blocks"] == plain["blocks"]


def test_a_fraction_of_the_blocks_keeps_the_bytes_in_between():
    # Identical blocks, each either checkpointed or not: the retained bytes are additive per
    # block, so checkpointing one of two blocks keeps exactly the mean of none and both.
    for model in (_llama, lambda: apply_lean(_llama(grad_mode="compressed"))):
        none, both = _retained(model()), _retained(apply_checkpointing(model(), "blocks"))
        half = _retained(apply_checkpointing(model(), "blocks:0.5"))
        assert both < half < none
        assert 2 * half == none + both


def test_a_fraction_wraps_the_first_blocks_and_switches():
    model = _llama()
    apply_checkpointing(model, "blocks:0.5")
    assert [(n, g) for n, _, g in checkpointed_modules(model)] == [("model.layers.0", "blocks")]
    apply_checkpointing(model, "blocks")
    assert [n for n, _, _ in checkpointed_modules(model)] == ["model.layers.0", "model.layers.1"]
    apply_checkpointing(model, "selective:0.5")  # a smaller fraction unwraps the rest
    assert [(n, g) for n, _, g in checkpointed_modules(model)] == [("model.layers.0", "selective")]
    apply_checkpointing(model, "blocks:0.3")  # ceil(0.3 x 2) = 1
    assert [(n, g) for n, _, g in checkpointed_modules(model)] == [("model.layers.0", "blocks")]
    for bad in ("blocks:0", "blocks:1.5", "blocks:half", "blocks:"):
        with pytest.raises(ValueError, match="blocks:0.5"):
            apply_checkpointing(model, bad)


# ---------------------------------------------------------------- lifecycle


def test_restore_and_reapply():
    model = _llama()
    state_keys = model.state_dict().keys()
    apply_checkpointing(model, "selective")
    assert model.state_dict().keys() == state_keys
    assert {g for _, _, g in checkpointed_modules(model)} == {"selective"}
    apply_checkpointing(model, "blocks")  # switches, does not stack
    assert {g for _, _, g in checkpointed_modules(model)} == {"blocks"}
    copied = copy.deepcopy(model)  # the copy is wrapped too, and restorable
    assert [n for n, _, _ in checkpointed_modules(copied)] == ["model.layers.0", "model.layers.1"]
    restore_checkpointing(model)
    assert list(checkpointed_modules(model)) == []
    assert all("forward" not in m.__dict__ for m in model.modules())
    restore_checkpointing(copied)
    assert list(checkpointed_modules(copied)) == []
    with pytest.raises(ValueError, match="granularity"):
        apply_checkpointing(model, "everything")


def test_eval_and_no_grad_forwards_are_plain(monkeypatch):
    import lightning_compact.checkpointing as ckpt

    calls: list[int] = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = apply_checkpointing(_llama(grad_mode="compressed"), "selective")
    ref = restore_checkpointing(copy.deepcopy(model))
    tokens = _tokens(CONFIG.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))
    assert torch.equal(model.eval()(tokens), ref.eval()(tokens))
    assert calls == []  # neither a no_grad nor an eval forward goes through checkpoint
    model.train()(tokens, labels=tokens)
    assert len(calls) == CONFIG.num_hidden_layers


# ---------------------------------------------------------------- Lightning


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, checkpointing: str | None) -> tuple[list[float], PlainLM, LeanActivations]:
    torch.manual_seed(0)
    module, record = PlainLM(), _Losses()
    lean = LeanActivations(checkpointing=checkpointing)
    make_trainer(tmp_path, callbacks=[record, lean, CompActCallback(rank=0.25, grad_mode="compressed")]).fit(module, token_loader())
    return record.losses, module, lean


@pytest.mark.parametrize("granularity", WITH_FRACTIONS)
def test_lean_activations_checkpointing_in_a_trainer(tmp_path, granularity, caplog):
    caplog.set_level("INFO")
    ref, _, _ = _fit(tmp_path, None)
    losses, module, lean = _fit(tmp_path, granularity)
    assert len(losses) == len(ref) == 4
    # Same ops on the same values, float32: the very same losses, step by step.
    assert losses == ref
    kind, wrapped = granularity.partition(":")[0], (1 if granularity.endswith(":0.5") else 2)  # of PlainLM's 2 blocks
    assert f"checkpoint({kind})" in caplog.text
    assert [e.op for e in lean.report.swapped].count(f"checkpoint({kind})") == wrapped
    assert list(checkpointed_modules(module)) == []  # restored at teardown


def test_lean_activations_rejects_an_unknown_granularity():
    for bad in ("all", "blocks:0", "blocks:2"):
        with pytest.raises(ValueError, match="checkpointing"):
            LeanActivations(checkpointing=bad)


# ---------------------------------------------------------------- the shared x·P (functional.py)


def test_shared_x_p_is_not_reused_after_an_in_place_resample():
    # The shared x·P is held while its input lives (selective checkpointing needs it), so
    # it must also notice a new window written into the same key tensor.
    from lightning_compact.functional import compact_linear, observe_compressed_inputs
    from lightning_compact.projection import build_projection, seed_keys

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64, generator=g)
    w = torch.randn(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.tensor(seed_keys(1), dtype=torch.int32)
    seen: list[torch.Tensor] = []
    with observe_compressed_inputs(lambda input, compressed: seen.append(compressed)):
        compact_linear(x, w, rank=2, seed=keys, share_compressed=True)
        compact_linear(x, w, rank=2, seed=keys, share_compressed=True)
        keys.copy_(torch.tensor(seed_keys(2), dtype=torch.int32))  # what a resample does
        compact_linear(x, w, rank=2, seed=keys, share_compressed=True)
    assert seen[1] is seen[0] and seen[2] is not seen[0]
    assert rel_err(seen[2], x @ build_projection(8, 2, keys, dtype=torch.float64)) <= F64_TOL
