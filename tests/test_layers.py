import pytest
import torch
from torch import nn

from helpers import TINY_LLAMA
from lightning_compact.layers import (
    CompActConfig,
    CompActLinear,
    conversion_report,
    convert_to_compact,
    matches_any,
    resolve_rank,
    restore_linear,
)
from lightning_compact.models.llama import LlamaForCausalLM


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(TINY_LLAMA)


def test_conversion_reuses_the_same_parameters_and_state_dict_keys():
    model = _model()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    report = conversion_report(convert_to_compact(model, rank=0.25))
    assert report.converted
    for name, param in model.named_parameters():
        assert param is params_before[name]
    assert list(model.state_dict()) == keys_before
    assert isinstance(model.model.layers[0].self_attn.q_proj, CompActLinear)


def test_checkpoint_of_converted_model_loads_strictly_into_the_plain_model():
    model = _model(0)
    convert_to_compact(model, rank=4)
    plain = _model(1)
    plain.load_state_dict(model.state_dict(), strict=True)
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_default_exclusions_and_rank_resolution():
    model = _model()
    report = conversion_report(convert_to_compact(model, rank=0.25))
    assert "lm_head" in report.skipped and "output head" in report.skipped["lm_head"]
    assert set(report.skipped) == {"lm_head"}  # attention outputs are converted (tests/test_attention_output.py)
    q = report.converted["model.layers.0.self_attn.q_proj"]
    down = report.converted["model.layers.0.mlp.down_proj"]
    assert q.rank == round(0.25 * TINY_LLAMA.hidden_size)
    assert down.rank == round(0.25 * TINY_LLAMA.intermediate_size)  # its own in_features


def test_layers_whose_rank_is_not_smaller_are_left_alone():
    model = _model()
    report = conversion_report(convert_to_compact(model, rank=48))  # hidden 32 < 48 <= intermediate 64
    assert "model.layers.0.self_attn.q_proj" in report.skipped
    assert "rank 48 >= in_features 32" in report.skipped["model.layers.0.self_attn.q_proj"]
    assert "model.layers.0.mlp.down_proj" in report.converted


def test_module_filter_and_second_call_are_respected():
    model = _model()
    report = conversion_report(convert_to_compact(model, rank=4, module_filter_fn=lambda m, name: name.endswith("up_proj")))
    assert set(report.converted) == {f"model.layers.{i}.mlp.up_proj" for i in range(2)}
    again = conversion_report(convert_to_compact(model, rank=4))
    assert set(report.converted) <= set(again.converted)
    assert again.converted["model.layers.0.mlp.up_proj"] is report.converted["model.layers.0.mlp.up_proj"]


def test_eval_mode_and_no_grad_are_plain_linear():
    model = _model()
    tokens = torch.randint(0, 64, (2, 8))
    ref = model(tokens)
    convert_to_compact(model, rank=4)
    model.eval()
    assert torch.equal(model(tokens), ref)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(tokens), ref)


def test_training_output_is_exact_and_optimizer_built_before_still_updates():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 64, (2, 8))
    ref = model(tokens, labels=tokens)
    convert_to_compact(model, rank=4)
    loss = model(tokens, labels=tokens)
    assert torch.equal(loss, ref)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_layer_seed_changes_with_window_and_name():
    model = _model()
    report = conversion_report(convert_to_compact(model, rank=4))
    q, k = report.converted["model.layers.0.self_attn.q_proj"], report.converted["model.layers.0.self_attn.k_proj"]
    s0 = q.seed
    q.set_window(1)
    assert q.seed != s0 and q.seed != k.seed


def test_pattern_matching():
    assert matches_any("model.layers.0.self_attn.q_proj", ["q_proj"]) == "q_proj"
    assert matches_any("roberta.encoder.layer.0.attention.output.dense", ["attention.output.dense"])
    assert matches_any("roberta.encoder.layer.0.output.dense", ["attention.output.dense"]) is None
    assert matches_any("model.layers.3.mlp.up_proj", ["*.mlp.*"]) == "*.mlp.*"
    assert matches_any("model.layers.3.mlp.up_proj", ["proj"]) is None  # whole components only


@pytest.mark.parametrize("rank, message", [(0, ">= 1"), (-2, ">= 1"), (1.5, r"\(0, 1\)"), (0.0, r"\(0, 1\)"), (1.0, "rank=1 means r = 1"), (True, "bool"), ("8", "int or a float")])
def test_bad_ranks_say_what_to_change(rank, message):
    with pytest.raises((ValueError, TypeError), match=message):
        resolve_rank(rank, 64)
    with pytest.raises((ValueError, TypeError), match=message):
        CompActConfig(rank=rank)


def test_rank_fraction_rounds_and_is_at_least_one():
    assert resolve_rank(0.25, 10) == 2
    assert resolve_rank(0.01, 10) == 1
    assert resolve_rank(0.99, 10) == 10
    assert resolve_rank(7, 10) == 7


def test_bare_linear_and_ambiguous_arguments_are_refused():
    with pytest.raises(TypeError, match="container"):
        convert_to_compact(nn.Linear(4, 4), rank=2)
    with pytest.raises(ValueError, match="exactly one"):
        convert_to_compact(nn.Sequential(nn.Linear(4, 4)), rank=2, config=CompActConfig(rank=2))


def test_poolers_are_left_alone_by_default():
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(16, 16))
    model.pooler = nn.Module()
    model.pooler.dense = nn.Linear(16, 16)
    report = conversion_report(convert_to_compact(model, rank=4))
    assert "encoder.0" in report.converted
    assert "pooler" in report.skipped["pooler.dense"]


def test_shared_projection_groups_siblings_reading_one_input_size():
    model = _model()
    report = conversion_report(convert_to_compact(model, config=CompActConfig(rank=4, share_projection=True)))
    layer = "model.layers.0"
    seeds = {n.rsplit(".", 1)[-1]: m.seed for n, m in report.converted.items() if n.startswith(layer + ".")}
    assert seeds["q_proj"] == seeds["k_proj"] == seeds["v_proj"]
    assert seeds["gate_proj"] == seeds["up_proj"]
    assert len({seeds["q_proj"], seeds["gate_proj"], seeds["down_proj"]}) == 3
    other_block = report.converted["model.layers.1.self_attn.q_proj"].seed
    assert other_block != seeds["q_proj"]
    unshared = conversion_report(convert_to_compact(_model(), rank=4)).converted
    assert len({unshared[f"{layer}.self_attn.{p}"].seed for p in ("q_proj", "k_proj", "v_proj")}) == 3


def test_shared_projection_keeps_one_compressed_input_and_exact_formula():
    torch.manual_seed(0)
    block = nn.Module()
    block.q, block.k = nn.Linear(32, 16, bias=False).double(), nn.Linear(32, 24, bias=False).double()
    report = conversion_report(convert_to_compact(block, config=CompActConfig(rank=8, share_projection=True)))
    q, k = report.converted["q"], report.converted["k"]
    x = torch.randn(5, 32, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = q(x).sum() + k(x).pow(2).sum()
    compressed = [t for t in saved if t.shape == (5, 8)]
    assert len(compressed) == 2 and compressed[0].untyped_storage().data_ptr() == compressed[1].untyped_storage().data_ptr()
    out.backward()
    from lightning_compact.projection import make_projection

    p = make_projection(32, 8, q.seed, dtype=torch.float64)
    for layer, grad_out in ((q, torch.ones(5, 16, dtype=torch.float64)), (k, 2 * (x @ k.weight.T).detach())):
        expected = grad_out.T @ (x @ p) @ p.T
        assert ((layer.weight.grad - expected).norm() / expected.norm()).item() < 1e-12


def test_a_module_converted_with_other_settings_is_refused_until_restored():
    model = _model()
    convert_to_compact(model, rank=4)
    with pytest.raises(ValueError, match="already converted with other settings: rank=4 \\(asked 2\\)"):
        convert_to_compact(model, config=CompActConfig(rank=2, projection="rademacher"))
    restore_linear(model)
    assert not any(isinstance(m, CompActLinear) for m in model.modules())
    convert_to_compact(model, config=CompActConfig(rank=2, projection="rademacher"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.rank == 2 and q.projection == "rademacher"


def test_restore_gives_back_plain_linears_with_the_same_parameters():
    model = _model()
    before = dict(model.named_parameters())
    convert_to_compact(model, config=CompActConfig(rank=4, grad_mode="compressed"))
    assert restore_linear(model) is model
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_exclusions_add_to_the_defaults_unless_told_otherwise():
    report = conversion_report(convert_to_compact(_model(), config=CompActConfig(rank=4, exclude_modules=["up_proj"])))
    assert "model.layers.0.mlp.up_proj" in report.skipped and "lm_head" in report.skipped
    report = conversion_report(
        convert_to_compact(_model(), config=CompActConfig(rank=4, exclude_modules=["up_proj"], default_exclusions=False))
    )
    assert "model.layers.0.mlp.up_proj" in report.skipped and "model.layers.0.self_attn.o_proj" in report.converted


def test_parametrized_weights_are_skipped_with_their_reason():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    report = conversion_report(convert_to_compact(model, rank=4))
    assert "parametrization" in report.skipped["0"] and "1" in report.converted
    model(torch.randn(3, 16)).sum().backward()


def test_forward_hooks_with_kwargs_survive_the_swap():
    model = nn.Sequential(nn.Linear(16, 16))
    seen = []
    model[0].register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    convert_to_compact(model, rank=4)
    model(torch.randn(2, 16))
    assert seen == [{}]


def test_weights_shared_with_another_module_are_skipped_with_the_holder_named():
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.Linear(16, 10))
    model[2].weight = model[0].weight  # a head tied to the embedding, not named like a head
    report = conversion_report(convert_to_compact(model, rank=4))
    assert report.skipped["2"] == "weight shared with 0" and "1" in report.converted


def test_multihead_attention_out_proj_is_never_listed_as_converted():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1)
    report = conversion_report(convert_to_compact(model, config=CompActConfig(rank=4, default_exclusions=False)))
    assert "MultiheadAttention" in report.skipped["layers.0.self_attn.out_proj"]
    assert set(report.converted) == {"layers.0.linear1", "layers.0.linear2"}


def test_gpt2_conv1d_layers_are_converted_natively_and_restored():
    transformers = pytest.importorskip("transformers")
    from lightning_compact.layers import CompActConv1D

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 64, (2, 8))
    ref = model(tokens, labels=tokens).loss
    convert_to_compact(model, config=CompActConfig(rank=4, grad_mode="compressed"))
    report = conversion_report(model)
    # The attention output too: its input is a fresh copy unless SDPA keeps it (then it is read, not compressed).
    assert set(report.converted) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # [in, out] storage kept
    loss = model(tokens, labels=tokens).loss
    assert torch.equal(loss, ref)
    loss.backward()
    fc = report.converted["transformer.h.0.mlp.c_fc"]
    assert isinstance(fc, CompActConv1D) and fc.weight.grad is None and fc.weight_delta.grad.shape == (128, 4)
    restore_linear(model)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    assert torch.equal(model(tokens, labels=tokens).loss, ref)


def test_shared_projection_works_for_gpt2_conv1d_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).train()
    convert_to_compact(model, config=CompActConfig(rank=4, share_projection=True))
    fc = model.transformer.h[0].mlp.c_fc
    assert fc.seed_name == "transformer.h.0.mlp:in=32"
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, labels=tokens).loss.backward()
    assert fc.weight.grad.shape == (32, 128)  # Conv1D's [in, out] layout


def test_a_module_registered_under_two_names_is_not_a_shared_weight():
    block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    holder = nn.Module()
    holder.model, holder.alias = block, block  # e.g. self.net = self.model
    report = conversion_report(convert_to_compact(holder, rank=4))
    assert set(report.converted) == {"model.0", "model.2"} and not report.skipped
