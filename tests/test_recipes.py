"""Recipes carry the paper's hyperparameters and say where they come from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_compact.data import GLUE_TASKS, PACKAGED

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# The paper's pretraining setup (Section 4.1 / Table 2): size -> (steps, lr, T).
PAPER_PRETRAIN = {"60m": (10_000, 0.01, 50), "130m": (20_000, 0.01, 50), "350m": (60_000, 0.01, 50), "1b": (100_000, 0.003, 200)}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*/*.yaml")), ids=lambda p: p.stem)
def test_recipe_header_says_where_its_numbers_come_from(recipe):
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "lightning-compact fit --config recipes/" in header
    assert "Section" in header or "Table" in header


@pytest.mark.parametrize("size", PAPER_PRETRAIN)
def test_pretraining_recipes_follow_the_paper(size):
    cfg = load(RECIPES / "pretrain" / f"llama_{size}_c4.yaml")
    steps, lr, gap = PAPER_PRETRAIN[size]
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert trainer["max_steps"] == steps and trainer["precision"] == "bf16-mixed"
    assert data["batch_size"] * trainer["accumulate_grad_batches"] == 512
    assert data["seq_len"] == 256 and data["dataset"] == "c4" and data["tokenizer"] == "t5-base"
    assert model["model"] == f"llama_{size}" and model["lr"] == lr
    assert (model["warmup_ratio"], model["min_lr_ratio"], model["decay"]) == (0.1, 0.1, "cosine")
    assert cfg["compact"] == {"enabled": True, "rank": 0.25, "update_proj_gap": gap, "scale": 0.25,
                              "update_rule": "adam", "exclude_modules": ["o_proj"]}  # the paper's update and layers
    # Validation every 1,000 optimizer steps, counted in micro-batches.
    assert trainer["val_check_interval"] == 1000 * trainer["accumulate_grad_batches"]


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_finetuning_recipes_follow_the_paper(task):
    cfg = load(RECIPES / "finetune" / f"roberta_base_glue_{task}.yaml")
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert cfg["trainer"]["max_epochs"] == 30
    assert (data["batch_size"], data["max_length"], data["task"], data["tokenizer"]) == (16, 512, task, "roberta-base")
    assert (model["model"], model["task"], model["pretrained"]) == ("roberta-base", task, True)
    assert (cfg["compact"]["rank"], cfg["compact"]["update_proj_gap"], cfg["compact"]["scale"]) == (8, 500, 2.0)


@pytest.mark.parametrize("name", ["pretrain_llama_tiny", "finetune_minilm"])
def test_quickstarts_need_no_hub_and_run_on_cpu(name):
    cfg = load(RECIPES / "quickstart" / f"{name}.yaml")
    data = cfg["data"]["init_args"]
    assert cfg["trainer"]["accelerator"] == "cpu"
    assert data["dataset"] in PACKAGED
    assert data["tokenizer"] == "byte" or data["tokenizer"] in PACKAGED
    assert cfg["model"]["init_args"]["model"].startswith("llama_") or cfg["model"]["init_args"]["model"] in PACKAGED
    assert cfg["compact"]["enabled"] is True and cfg["memory"]["enabled"] is True


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_fsdp_recipes_shard_the_paper_batch_over_eight_gpus(size):
    from lightning_compact.models import LLAMA_PRESETS

    cfg = load(RECIPES / "pretrain" / f"llama_{size}_c4_fsdp.yaml")
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert strategy["init_args"] == {"data_parallel_size": trainer["devices"], "tensor_parallel_size": 1}
    assert trainer["devices"] == 8 and trainer["precision"] == "bf16-mixed"
    assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] == 512
    assert trainer["val_check_interval"] == 1000 * trainer["accumulate_grad_batches"]
    assert model["model"] == f"llama_{size}" and model["model"] in LLAMA_PRESETS
    assert cfg["compact"]["enabled"] and cfg["compact"]["rank"] == 0.25


@pytest.mark.parametrize("size", ["350m", "1b"])
def test_lean_recipes_are_the_paper_recipe_plus_lean_activations_and_compact(size):
    from lightning_compact.memory.recipe import read_recipe

    paper, lean = (read_recipe(RECIPES / "pretrain" / f"llama_{size}_c4{suffix}.yaml") for suffix in ("", "_lean"))
    assert lean.lean == ("norms", "mlp", "loss") and lean.checkpointing is None  # no matmul recomputed
    assert (lean.compact_rank, lean.grad_mode) == (0.125, "compressed")
    same = ("model", "config_overrides", "batch_size", "seq_len", "precision", "accumulate_grad_batches")
    assert all(getattr(lean, k) == getattr(paper, k) for k in same)
    # The only other change to the training setup: the callback.
    a, b = (load(RECIPES / "pretrain" / f"llama_{size}_c4{suffix}.yaml") for suffix in ("", "_lean"))
    b["trainer"]["callbacks"] = [c for c in b["trainer"]["callbacks"] if c["class_path"] != "lightning_compact.LeanActivations"]
    b["compact"]["rank"] = a["compact"]["rank"]
    assert a == b


def test_the_wheel_ships_every_recipe_and_names_resolve_from_it(tmp_path):
    """Outside a checkout `--config quickstart/pretrain_llama_tiny` must still find the recipe: it is package data."""
    import subprocess
    import sys
    import zipfile

    repo = RECIPES.resolve().parents[1]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(repo)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("lightning_compact-*.whl")
    shipped = {n.removeprefix("lightning_compact/recipes/") for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("lightning_compact/recipes/")}
    on_disk = {str(p.relative_to(RECIPES.resolve())) for p in RECIPES.resolve().glob("*/*.yaml")} | {"README.md"}
    assert shipped == on_disk
    # The installed layout: the package's own recipes/ is the first place a name is looked up.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from lightning_compact.cli import resolve_recipe;"
             "print(resolve_recipe('quickstart/pretrain_llama_tiny'))")
    found = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()) == tmp_path / "site" / "lightning_compact" / "recipes" / "quickstart" / "pretrain_llama_tiny.yaml"
