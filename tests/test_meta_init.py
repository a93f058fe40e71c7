"""Big models start sharded (issue 22): build on ``meta``, convert, shard, materialize each rank's shard."""

import math

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from helpers import make_trainer, run_two_ranks
from meta_init_train import BIG_PARAMS, SEED, STEPS, TINY
from lightning_compact import CompAct, CompActCallback
from lightning_compact.meta_init import (
    ROW_BLOCK,
    has_meta_tensors,
    keyed_normal_,
    load_full_state_dict,
    materialize_,
)
from lightning_compact.models import CausalLMModule
from lightning_compact.models.causal_lm import build_llama


def _tiny_llama(seed: int | None = SEED, meta: bool = False):
    with torch.device("meta") if meta else torch.device("cpu"):
        model = build_llama("llama_60m", TINY)
    if seed is not None and not meta:
        model.reset_parameters(seed=seed)
    return model


def test_keyed_normal_is_a_function_of_seed_name_and_row():
    rows = 2 * ROW_BLOCK + 37
    a = keyed_normal_(torch.empty(rows, 64), std=0.5, seed=1, key="w")
    assert torch.equal(a, keyed_normal_(torch.empty(rows, 64), std=0.5, seed=1, key="w"))
    assert not torch.equal(a, keyed_normal_(torch.empty(rows, 64), std=0.5, seed=2, key="w"))
    assert not torch.equal(a, keyed_normal_(torch.empty(rows, 64), std=0.5, seed=1, key="v"))
    # Each block of rows has its own generator: no two blocks repeat each other.
    assert not torch.equal(a[:ROW_BLOCK], a[ROW_BLOCK:2 * ROW_BLOCK])
    # N(0, 0.25): the sample mean's standard error is std/√n, the variance's about std²·√(2/n).
    n = a.numel()
    assert abs(a.mean().item()) < 4 * 0.5 / math.sqrt(n)
    assert abs(a.var().item() - 0.25) < 4 * 0.25 * math.sqrt(2 / n)
    half = keyed_normal_(torch.empty(rows, 64, dtype=torch.bfloat16), std=0.5, seed=1, key="w")
    assert torch.equal(half, a.to(torch.bfloat16))  # drawn in float32, then cast


def test_keyed_reset_parameters_leaves_the_default_init_alone():
    torch.manual_seed(0)
    default = build_llama("llama_60m", TINY).state_dict()
    torch.manual_seed(0)
    again = build_llama("llama_60m", TINY)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in default.items())
    keyed = _tiny_llama()
    assert not torch.equal(keyed.lm_head.weight, again.lm_head.weight)
    # Its scales: 0.02, and 0.02/√(2L) for the residual projections; unit norms.
    assert abs(keyed.lm_head.weight.std().item() - 0.02) < 0.002
    residual = 0.02 / math.sqrt(2 * TINY["num_hidden_layers"])
    assert abs(keyed.model.layers[0].mlp.down_proj.weight.std().item() - residual) < 0.1 * residual
    assert torch.equal(keyed.model.norm.weight, torch.ones(TINY["hidden_size"]))


@pytest.mark.parametrize("grad_mode", ["compressed", "decompressed"])
def test_compact_converts_a_meta_model_without_allocating(grad_mode):
    model = _tiny_llama(meta=True)
    compact = CompAct(rank=4, grad_mode=grad_mode, share_projection=True)
    compact.convert(model, fsdp=True)
    assert len(compact.layers) == 7 * TINY["num_hidden_layers"]  # it did convert
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)


def test_materialized_meta_model_equals_the_keyed_single_process_model():
    reference = _tiny_llama()
    compact_ref = CompAct(rank=4, cache_projections=True)
    compact_ref.convert(reference)
    model = _tiny_llama(meta=True)
    compact = CompAct(rank=4, cache_projections=True)
    compact.convert(model)
    assert has_meta_tensors(model)
    materialize_(model, "cpu", lambda m: m.reset_parameters(seed=SEED))
    assert not has_meta_tensors(model)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, layer in compact.layers.items():
        ref = compact_ref.layers[name]
        assert torch.equal(layer.projection_keys, ref.projection_keys), name
        assert torch.equal(layer.projection_cache, ref.projection_cache), name
        assert torch.equal(layer.weight_delta, torch.zeros_like(layer.weight_delta)), name
    assert torch.equal(model.model.rotary.inv_freq, reference.model.rotary.inv_freq)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    assert torch.equal(model(ids), reference(ids))


def _loader(n=8):
    tokens = torch.randint(0, TINY["vocab_size"], (n, 16), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader([{"input_ids": t} for t in tokens], batch_size=2)


class _Initial(Callback):
    """The module's weights when training starts (after configure_model materialized them)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_empty_init_module_trains_as_the_keyed_module_does(tmp_path):
    runs = {}
    for kind in ("meta", "full"):
        torch.manual_seed(0)
        module = CausalLMModule("llama_60m", config_overrides=TINY, lr=1e-2, empty_init=kind == "meta", init_seed=SEED)
        if kind == "full":
            module.model.reset_parameters(seed=SEED)
        initial = _Initial()
        make_trainer(tmp_path / kind, [CompActCallback(rank=4, update_proj_gap=2), initial], max_steps=4).fit(
            module, _loader())
        runs[kind] = (initial.state, {k: v.clone() for k, v in module.model.state_dict().items()})
    for name, value in runs["full"][0].items():
        assert torch.equal(runs["meta"][0][name], value), name
    for name, value in runs["full"][1].items():
        assert torch.equal(runs["meta"][1][name], value), name
    assert not torch.equal(runs["full"][1]["lm_head.weight"], runs["full"][0]["lm_head.weight"])  # it trained


def test_init_checkpoint_is_loaded_once_and_checked(tmp_path):
    source = _tiny_llama(seed=11)
    torch.save(source.state_dict(), tmp_path / "ckpt.pt")
    module = CausalLMModule("llama_60m", config_overrides=TINY, empty_init=True, init_checkpoint=str(tmp_path / "ckpt.pt"))
    initial = _Initial()
    make_trainer(tmp_path / "run", [CompActCallback(rank=4), initial], max_steps=1).fit(module, _loader(2))
    for name, value in source.state_dict().items():
        assert torch.equal(initial.state[name], value), name
    # A checkpoint saved with a prefix (as a LightningModule's state_dict has "model.") is refused by name.
    wrong = materialize_(_tiny_llama(meta=True), "cpu", lambda m: m.reset_parameters(seed=0))
    with pytest.raises(ValueError, match="missing .*unexpected .*'model.model.embed_tokens.weight'"):
        load_full_state_dict(wrong, {f"model.{k}": v for k, v in source.state_dict().items()})


def test_hf_model_builds_on_meta_with_real_buffers_and_loads_its_weights(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lightning_compact.models.hf import build_hf_model, init_hf_weights_

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=96, max_position_embeddings=32)
    torch.manual_seed(0)
    reference = build_hf_model("causal-lm", "llama", pretrained=False, config_overrides=tiny)
    model = build_hf_model("causal-lm", "llama", pretrained=False, config_overrides=tiny, empty_init=True)
    assert all(p.is_meta for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert buffers and not any(b.is_meta for b in buffers.values())
    materialize_(model, "cpu", lambda m: init_hf_weights_(m, SEED))
    for name, value in reference.named_buffers():
        assert torch.equal(buffers[name], value), name
    std = reference.config.initializer_range
    weight = model.model.layers[0].mlp.up_proj.weight
    assert abs(weight.std().item() - std) < 0.1 * std
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    # Pretrained weights through CausalLMModule(empty_init=True, pretrained=True): loaded from the folder.
    reference.save_pretrained(tmp_path / "hf")
    module = CausalLMModule(str(tmp_path / "hf"), pretrained=True, empty_init=True)
    initial = _Initial()
    make_trainer(tmp_path / "run", [initial], max_steps=1).fit(module, _loader(2))
    for name, value in reference.state_dict().items():
        assert torch.equal(initial.state[name], value), name


@pytest.mark.slow
def test_two_process_meta_init_matches_the_whole_model_build(tmp_path):
    checkpoint = _tiny_llama(seed=11).state_dict()
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    r0, r1 = run_two_ranks("meta_init_train.py", tmp_path, "exact", port_base=40500, timeout=600)
    assert r0["meta_before_fit"]
    assert r0["meta_weight_shards"] == r0["full_weight_shards"] == [2]  # "auto" weighs the rank's half of each weight
    reference = _tiny_llama().state_dict()
    for name, value in reference.items():
        # Sharded shard by shard, the initial weights are the single process's keyed init, on both ranks...
        assert torch.equal(r0["meta_initial"][name], value), name
        assert torch.equal(r1["meta_initial"][name], value), name
        assert torch.equal(r0["full_initial"][name], value), name
        # ...and training goes exactly as the run that built the whole model on each rank.
        assert torch.equal(r0["meta_final"][name], r0["full_final"][name]), name
        assert torch.equal(r0["loaded_initial"][name], checkpoint[name]), name
        assert torch.equal(r1["loaded_initial"][name], checkpoint[name]), name
    assert r0["meta_losses"] == r0["full_losses"] and len(r0["meta_losses"]) == STEPS
    assert not torch.equal(r0["meta_final"]["lm_head.weight"], reference["lm_head.weight"])  # it trained


@pytest.mark.slow
def test_two_process_meta_init_peak_rss_holds_no_full_model(tmp_path):
    peaks = {}
    for mode in ("full", "meta"):
        (tmp_path / mode).mkdir()
        r0, r1 = run_two_ranks("meta_init_train.py", tmp_path / mode, "rss", mode, port_base=40500, timeout=900)
        peaks[mode] = [r0, r1]
    model_bytes = BIG_PARAMS * 4
    for rank in range(2):
        full, meta = peaks["full"][rank], peaks["meta"][rank]
        print(f"rank {rank}: peak RSS at fit start {full['at_fit_start'] / 2**30:.2f} GiB (whole model built) -> "
              f"{meta['at_fit_start'] / 2**30:.2f} GiB (meta), ratio {meta['at_fit_start'] / full['at_fit_start']:.3f}")
        assert full["at_fit_start"] - full["before_build"] > 0.95 * model_bytes  # the full build did hold it
        # The meta start held its half of the model, plus CompAct's δ rows ([out/2, r] per layer, 0.1 of it).
        assert meta["at_fit_start"] - meta["before_build"] < 0.7 * model_bytes
        assert meta["at_fit_start"] < 0.6 * full["at_fit_start"]  # issue 22's target


def test_the_gpu_start_script_runs_on_a_cpu_without_the_data_dependencies(tmp_path):
    """benchmarks/gpu/gpu_meta_init.py, as the device machine runs it (no datasets, no jsonargparse), on a CPU."""
    import json

    from helpers import WITHOUT_DATA_DEPS, run_python

    out = tmp_path / "start.json"
    proc = run_python("-c", WITHOUT_DATA_DEPS, "benchmarks/gpu/gpu_meta_init.py", "--device", "cpu", "--layers", "2",
                      "--hidden", "128", "--seq", "16", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["arm"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"meta", "host"}
    assert rows["meta"]["parameters"] == rows["host"]["parameters"] > 0
    assert all(math.isfinite(r["loss"]) for r in rows.values())


def test_estimator_says_what_each_rank_builds_at_start():
    from lightning_compact.memory.estimator import startup_note
    from lightning_compact.memory.recipe import RunShape, read_recipe

    shape = read_recipe("recipes/pretrain/llama_7b_c4_fsdp.yaml")
    assert shape.empty_init and shape.world_size == 8
    note = startup_note(shape, 6_738_000_000)
    assert "only its shard" in note and "(3.14 GiB in float32)" in note and "(25.10 GiB)" in note
    whole = startup_note(RunShape("llama_7b", world_size=8, strategy="fsdp2"), 6_738_000_000)
    assert "whole model in host memory (25.10 GiB" in whole and "empty_init: true" in whole


def test_auto_cache_weighs_the_rank_s_shard_of_the_weight():
    # A wide input with a narrow output at one token: P [512, 128] (256 KiB) is below the whole
    # weight [256, 512] (512 KiB) but above a quarter of it (the shard of 4 ranks): dropped then.
    for shards, kept in ((1, True), (4, False)):
        layer = nn.Linear(512, 256, bias=False)
        compact = CompAct(rank=128)
        compact.convert(nn.Sequential(layer))
        converted = next(iter(compact.layers.values()))
        converted.weight_shards = shards
        converted(torch.randn(1, 512, requires_grad=True)).sum().backward()
        assert (converted.projection_cache is not None) is kept, shards
