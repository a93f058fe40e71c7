"""The fake-tensor estimator: agreement with real tensors, Table 1, recipes, the command line."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_compact.memory import StepMemoryTracker
from lightning_compact.memory.breakdown import CATEGORIES
from lightning_compact.memory.estimator import Variant, estimate, main, variants
from lightning_compact.memory.recipe import CLI_DEFAULT_RANK, RunShape, read_recipe
from lightning_compact.memory.sdpa import cuda_attention_memory

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4)


def small_shape(**changes) -> RunShape:
    base = RunShape(model="llama_60m", config_overrides=SMALL, batch_size=4, seq_len=64, precision="32-true", device_type="cpu")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("variant", [Variant(), Variant(0.25, "compressed"), Variant(0.25, "decompressed")], ids=lambda v: v.label)
def test_fake_step_matches_real_step_per_category(variant, precision):
    shape = small_shape(precision=precision)
    fake, real = estimate(shape, variant), estimate(shape, variant, fake=False)
    # Fake and real tensors run the same ops with the same shapes and storages, so the
    # accounting should agree exactly; 2% leaves room for kernels that allocate
    # differently than their fake (meta) counterparts in other torch versions.
    for name in (*CATEGORIES, "total"):
        for which in ("peak", "largest"):
            f = getattr(fake.step, which).as_dict()[name]
            r = getattr(real.step, which).as_dict()[name]
            assert f == pytest.approx(r, rel=0.02, abs=0.02 * real.peak.total / 100), (which, name)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_table1_formula_equals_measured_savings_on_llama(precision):
    # In this LLaMA no op other than q/k/v (gate/up, down) keeps the converted layers'
    # inputs, and every compressed weight's gradient and moments are [out, r]: the
    # formula's savings are exact, byte for byte (under bf16-mixed too, where each layer
    # saves its own bf16 cast of the float32 input).
    shape = small_shape(precision=precision)
    base = estimate(shape)
    for mode in ("compressed", "decompressed"):
        compact = estimate(shape, Variant(0.25, mode))
        saved = compact.table1.savings()
        assert saved["gradients"] == base.step.largest.gradients - compact.step.largest.gradients
        # The default update rule ("channel") keeps one float per compressed weight beyond the formula's moments.
        weights = 7 * SMALL["num_hidden_layers"]  # q, k, v, o, gate, up, down
        rule_state = weights * (2 if precision == "bf16-true" else 4) if mode == "compressed" else 0
        assert saved["optimizer_states"] == base.optimizer_state_bytes - compact.optimizer_state_bytes + rule_state
        assert saved["activations"] == base.step.largest.activations - compact.step.largest.activations
        assert saved["activations"] > 0
        assert (saved["gradients"] > 0) == (mode == "compressed")


def test_shared_inputs_count_once_in_the_formula():
    compact = estimate(small_shape(), Variant(0.25, "decompressed"))
    before, after = compact.table1.activations
    tokens, d, f, layers = 4 * 64, SMALL["hidden_size"], SMALL["intermediate_size"], SMALL["num_hidden_layers"]
    # Per layer: one input for q/k/v, one for gate/up, one for down (o_proj reads SDPA's kept
    # output: no input of its own, before or after).
    assert before == layers * tokens * (d + d + f) * 4
    # ... but each of the other 6 converted layers stores its own x·P.
    assert after == layers * tokens * (3 * d // 4 + 2 * d // 4 + f // 4) * 4


def test_accumulation_keeps_gradients_alive_through_the_next_micro_batch():
    single = estimate(small_shape())
    accumulated = estimate(small_shape(accumulate_grad_batches=4))
    params = single.peak.parameters
    assert single.peak.gradients < params
    assert accumulated.peak.gradients == params  # the first micro-batch's, at the second's peak


def test_cuda_attention_saves_qkv_output_and_logsumexp_only():
    b, h, seq, d = 2, 4, 128, 32
    with FakeTensorMode(), cuda_attention_memory():
        q, k, v = (torch.empty(b, h, seq, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        with StepMemoryTracker(tensors=[q, k, v]) as tracker:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            merged = out.transpose(1, 2).reshape(b, seq, h * d)  # the output projection's input
        activations = tracker.result().peak.activations
        assert merged._base is not None or merged.untyped_storage().nbytes() == out.untyped_storage().nbytes()
    # The output (a view, no copy) and the float32 log-sum-exp; never [seq, seq] probabilities.
    assert activations == b * h * seq * d * 2 + b * h * seq * 4


def test_cuda_attention_under_autocast_saves_the_low_precision_casts():
    # Rotary embeddings in float32 make q and k float32 under bf16-mixed; CUDA's autocast
    # runs SDPA in bf16 and its kernel saves the bf16 casts, not the float32 originals.
    b, h, seq, d = 2, 4, 128, 32
    with FakeTensorMode(), cuda_attention_memory():
        q, k, v = (torch.empty(b, h, seq, d, dtype=torch.float32, requires_grad=True) for _ in range(3))
        with StepMemoryTracker(tensors=[q, k, v]) as tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert out.dtype == torch.bfloat16
        activations = tracker.result().peak.activations
    assert activations == 4 * b * h * seq * d * 2 + b * h * seq * 4  # q, k, v casts and output, log-sum-exp


def test_cuda_attention_stand_in_refuses_real_tensors():
    q = torch.randn(1, 1, 4, 8)
    with cuda_attention_memory(), pytest.raises(RuntimeError, match="FakeTensorMode"):
        F.scaled_dot_product_attention(q, q, q)


def test_cuda_estimate_rounds_allocations_and_uses_foreach_adam():
    cpu = estimate(small_shape(device_type="cpu"))
    cuda = estimate(small_shape(device_type="cuda"))
    assert cuda.peak.parameters % 512 == 0 and cuda.peak.parameters >= cpu.peak.parameters
    # During its step, foreach AdamW holds a temporary the size of all parameters together,
    # the per-tensor path one the size of the largest parameter (here a quarter of them).
    assert cuda.step.largest.optimizer_states > cpu.step.largest.optimizer_states + 0.5 * cpu.peak.parameters


def test_paper_recipe_is_read_from_its_yaml():
    shape = read_recipe(REPO / "recipes/pretrain/llama_350m_c4.yaml")
    assert (shape.model, shape.batch_size, shape.seq_len) == ("llama_350m", 128, 256)
    assert shape.precision == "bf16-mixed"
    assert shape.accumulate_grad_batches == 4
    assert shape.device_type == "cuda"
    assert shape.config_overrides == {"vocab_size": 32100}
    assert shape.compact_rank == 0.25


def test_recipe_without_compact_section_gets_the_clis_default_rank(tmp_path):
    cli = pytest.importorskip("lightning_compact.cli")
    assert CLI_DEFAULT_RANK == cli.DEFAULT_RANK
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer: {accelerator: cpu, precision: 32}\nmodel: {model: llama_60m}\ndata: {init_args: {max_length: 32, batch_size: 2}}\n")
    shape = read_recipe(recipe)
    assert (shape.compact_rank, shape.device_type, shape.precision, shape.seq_len) == (cli.DEFAULT_RANK, "cpu", "32-true", 32)


def test_recipe_without_a_batch_size_says_which_keys_were_tried(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {init_args: {model: llama_60m}}\ndata: {init_args: {seq_len: 8}}\n")
    with pytest.raises(ValueError, match="data.init_args.batch_size"):
        read_recipe(recipe)


def test_command_line_prints_every_variant_and_writes_chart_and_json(tmp_path, capsys):
    overrides = [f"{k}={v}" for k, v in SMALL.items()]
    png, out = tmp_path / "chart.png", tmp_path / "est.json"
    code = main(["--model", "llama_60m", "--model.config_overrides", *overrides, "--data.batch_size", "2", "--data.seq_len", "32",
                 "--trainer.precision", "32-true", "--compact.rank", "0.25", "--plot", str(png), "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for variant in variants([0.25]):
        assert variant.label in text
    assert "Table 1" in text
    assert png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["results"]] == [v.label for v in variants([0.25])]


def test_command_line_reads_a_recipe_and_applies_overrides(tmp_path, capsys):
    code = main(["--config", str(REPO / "recipes/pretrain/llama_60m_c4.yaml"), "--model.config_overrides", "num_hidden_layers=1",
                 "--data.batch_size", "2", "--data.seq_len", "16", "--compact.rank", "0.5", "--modes", "decompressed", "--no_plot"])
    assert code == 0
    text = capsys.readouterr().out
    assert "batch 2 × seq 16" in text and "CompAct n/2 decompressed" in text and "n/2 compressed" not in text


def test_command_line_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "gpt_5", "--no_plot"])
    assert "llama_7b" in capsys.readouterr().err


def test_llama_1b_recipe_estimates():
    # (How long it takes is a benchmark figure, not a test: RESULTS.md §4.)
    shape = read_recipe(REPO / "recipes/pretrain/llama_1b_c4.yaml")
    base = estimate(shape)
    compact = estimate(shape, Variant(0.125, "compressed"))
    assert compact.peak.total < base.peak.total
    assert base.parameters > 1.0e9


def test_llama_7b_shape_estimates():
    shape = RunShape(model="llama_7b", batch_size=1, seq_len=2048, precision="bf16-true", device_type="cuda")
    base = estimate(shape)
    assert 6.5e9 < base.parameters < 7.0e9
    assert base.peak.parameters == pytest.approx(base.parameters * 2, rel=0.001)


# --- lean options and checkpointing (issue 11, part 4) ---

LEAN_ALL = ("norms", "mlp", "loss")
LEAN_VARIANTS = [Variant(lean=LEAN_ALL), Variant(0.25, "compressed", LEAN_ALL), Variant(checkpointing="blocks"),
                 Variant(0.25, "decompressed", ("loss",), "blocks")]


@pytest.mark.parametrize("variant", LEAN_VARIANTS, ids=lambda v: v.label)
def test_fake_step_matches_real_step_with_lean_options_and_checkpointing(variant):
    shape = small_shape(precision="bf16-mixed")
    fake, real = estimate(shape, variant), estimate(shape, variant, fake=False)
    for name in (*CATEGORIES, "total"):
        assert fake.step.peak.as_dict()[name] == pytest.approx(real.step.peak.as_dict()[name], rel=0.02), name
    base = estimate(shape)
    assert fake.peak.total < base.peak.total


def _real_saved_bytes(shape: RunShape, variant: Variant) -> int:
    from lightning_compact.memory import SavedActivationTracker
    from lightning_compact.memory.estimator import _dtypes, build

    model, _ = build(shape, variant)
    ids = torch.randint(0, SMALL["vocab_size"], (shape.batch_size, shape.seq_len))
    _, autocast = _dtypes(shape.precision)
    with SavedActivationTracker(exclude=[model]) as tracker, torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        model(ids, labels=ids)
    return tracker.result().bytes


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("option", ["norms", "mlp"])
def test_lean_norm_and_mlp_savings_equal_the_real_saved_bytes(option, precision):
    # The lean norm / SwiGLU run the same forward and only save less: the estimator's
    # activation saving must be the real saved-bytes saving to the byte.
    shape = small_shape(precision=precision)
    variant = Variant(lean=(option,))
    estimated = estimate(shape).step.largest.activations - estimate(shape, variant).step.largest.activations
    measured = _real_saved_bytes(shape, Variant()) - _real_saved_bytes(shape, variant)
    assert estimated == measured > 0


@pytest.mark.parametrize("lean", [(), LEAN_ALL], ids=["plain", "lean"])
def test_estimated_activations_are_the_real_saved_bytes_plus_the_losss_transients(lean):
    # The estimator counts the forward's tensors alive at their largest: what autograd
    # saved (SavedActivationTracker on real tensors) plus the loss's transient buffers.
    # Those are bounded: the plain loss holds the float32 logits and their shifted copy
    # (2 x [tokens, vocab] float32); the chunked loss at most 4 [chunk, vocab] float32
    # blocks (logits, softmax-gradient and their reductions), chunks sized as on CUDA.
    # float32 only: under autocast the estimator also counts the weights' bf16 casts,
    # which SavedActivationTracker leaves out by design.
    from lightning_compact.lean.cross_entropy import default_chunk_size
    from lightning_compact.memory.estimator import cuda_loss_chunks

    shape, variant = small_shape(), Variant(lean=lean)
    tokens, vocab = shape.batch_size * shape.seq_len, SMALL["vocab_size"]
    with cuda_loss_chunks():
        gap = estimate(shape, variant).step.largest.activations - _real_saved_bytes(shape, variant)
    chunk = default_chunk_size(tokens, SMALL["hidden_size"], vocab)
    assert chunk < tokens // 2  # several chunks, so the bound below is tighter than the plain one
    bound = 4 * chunk * vocab * 4 if lean else 2 * tokens * vocab * 4
    assert 0 <= gap <= bound + 4096  # + a few scalars (loss, counts)


def test_checkpointing_blocks_keeps_only_the_layer_inputs_across_the_forward():
    shape = small_shape()
    base, blocks = estimate(shape), estimate(shape, Variant(checkpointing="blocks"))
    assert blocks.step.largest.activations < 0.6 * base.step.largest.activations
    # Recomputation happens in the backward: its tensors are temporaries, not activations.
    assert blocks.step.largest.temporaries > 0


def test_unknown_checkpointing_granularity_names_the_known_ones():
    with pytest.raises(ValueError, match="known: blocks"):
        Variant(checkpointing="everything")


def test_lean_recipe_is_read_from_the_callback_and_the_native_switch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_compact.LeanActivations\n      init_args: {mlp: false}\n"
        "model: {model: llama_60m}\ndata: {batch_size: 2, seq_len: 8}\n"
    )
    assert read_recipe(recipe).lean == ("norms", "loss")
    recipe.write_text("model: {model: llama_60m, config_overrides: {lean: true}}\ndata: {batch_size: 2, seq_len: 8}\n")
    shape = read_recipe(recipe)
    assert shape.lean == LEAN_ALL and "lean" not in shape.config_overrides  # the baseline variant stays plain


def test_json_lists_the_recipe_as_configured_under_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    overrides = "{" + ", ".join(f"{k}: {v}" for k, v in SMALL.items()) + "}"
    recipe.write_text(
        "trainer: {accelerator: cpu, precision: 32, callbacks: [{class_path: lightning_compact.LeanActivations}]}\n"
        f"model: {{model: llama_60m, config_overrides: {overrides}}}\ndata: {{batch_size: 8, seq_len: 64}}\n"
        "compact: {rank: 0.125, grad_mode: decompressed}\n"
    )
    out = tmp_path / "est.json"
    assert main(["--config", str(recipe), "--compact.rank", "0.25", "--no_plot", "--json", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(out.read_text())["results"]}
    assert {"baseline", "CompAct n/4 compressed", "recipe"} <= set(rows)
    assert (rows["recipe"]["rank"], rows["recipe"]["mode"], rows["recipe"]["lean"]) == (0.125, "decompressed", list(LEAN_ALL))
    assert rows["recipe"]["peak"]["total"] < rows["CompAct n/4 decompressed"]["peak"]["total"]


def test_every_registered_checkpointing_granularity_runs_under_the_cuda_model():
    # Checkpointing recomputes in the backward, where torch function modes do not apply:
    # the CUDA attention stand-in must still be the attention that runs (else the
    # recomputation runs other ops than the forward and torch's checkpoint refuses).
    from lightning_compact.memory.checkpointing_options import checkpointing_granularities

    shape = small_shape(precision="bf16-mixed", device_type="cuda")
    base = estimate(shape).step.largest.activations
    for name in checkpointing_granularities():
        assert estimate(shape, Variant(checkpointing=name)).step.largest.activations < base, name
    from lightning_compact.memory import sdpa

    assert F.scaled_dot_product_attention is sdpa._ORIGINAL_SDPA  # restored after the estimate
