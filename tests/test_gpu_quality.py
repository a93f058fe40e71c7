"""CPU smoke test of benchmarks/gpu/gpu_quality.py: prepare a KJV slice, train both arms of a tiny LLaMA.

The training runs as on the GPU machine: in a subprocess where ``datasets`` and
``jsonargparse`` cannot be imported.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import WITHOUT_DATA_DEPS, run_python

SCRIPT = "benchmarks/gpu/gpu_quality.py"
TINY = '{"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4}'


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_python(*args, timeout=300, OMP_NUM_THREADS="1")


def _train(tokens: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run("-c", WITHOUT_DATA_DEPS, SCRIPT, "train", "--tokens", str(tokens), "--out", str(out),
                "--device", "cpu", "--precision", "32", "--batch", "2", "--seq", "32", "--eval-batches", "2",
                "--config-overrides", TINY, *extra)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("gpu_quality") / "kjv_slice.pt"
    proc = _run(SCRIPT, "prepare", "--out", str(path), "--max-chars", "20000")
    if proc.returncode != 0 and "pip install" in proc.stderr:
        pytest.skip(f"packaged corpus or tokenizer missing: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens" in proc.stdout
    return path


def test_prepare_writes_wordpiece_tokens_with_a_tail_validation_split(tokens):
    import torch

    data = torch.load(tokens, weights_only=True)
    meta, ids = data["meta"], data["tokens"]
    assert ids.dtype == torch.int32 and ids.numel() == meta["n_tokens"] > 1000
    assert meta["vocab_size"] == 30522 and meta["tokenizer"] == "all-minilm-l6-v2"
    assert int(ids.max()) < meta["vocab_size"] and (ids == meta["separator_id"]).any()
    assert meta["n_val_tokens"] == meta["n_tokens"] - meta["val_start"] == round(0.02 * meta["n_tokens"])
    assert meta["n_chars"] <= 20000


def test_train_both_arms_same_init_and_batches_different_weights(tokens, tmp_path):
    out = tmp_path / "q.json"
    proc = _train(tokens, out, "--seeds", "0", "--steps", "6", "--eval-every", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"baseline", "compact"}
    base, comp = runs["baseline"], runs["compact"]
    for run in (base, comp):
        assert run["status"] == "finished" and run["steps_done"] == 6, run
        assert [p["step"] for p in run["val_curve"]] == [0, 3, 6]
        assert all(math.isfinite(p["loss"]) for p in run["val_curve"]) and math.isfinite(run["final_val_loss"])
        assert [p["step"] for p in run["train_curve"]] == [0, 5]
    assert comp["n_converted_layers"] > 0 and comp["n_compressed_layers"] == comp["n_converted_layers"]
    assert comp["optimizer"] == "CompActAdamW" and base["optimizer"] == "AdamW"
    # Same init and the same first batch: the first loss is identical (CompActLinear's forward is
    # nn.Linear's); the updates differ (compressed Adam in r-space), so the final weights do.
    assert base["init_weights_sha256"] == comp["init_weights_sha256"]
    assert base["first_step_loss"] == comp["first_step_loss"]
    assert base["val_curve"][0]["loss"] == comp["val_curve"][0]["loss"]
    assert base["final_weights_sha256"] != comp["final_weights_sha256"]
    ratio = result["ratio_final_ppl"]
    assert ratio["n_seeds"] == 1 and ratio["per_seed"]["0"] == pytest.approx(comp["final_val_ppl"] / base["final_val_ppl"])
    assert "| compact |" in proc.stdout and "Paper (Table 2" in proc.stdout


def test_time_limit_truncates_the_running_pair_and_skips_later_seeds(tokens, tmp_path):
    out = tmp_path / "q.json"
    # Seed 0 starts (no estimate yet) and its baseline is stopped at the limit; its CompAct arm
    # stops before its first step; seed 1 is not started.
    proc = _train(tokens, out, "--seeds", "0,1", "--steps", "100000", "--eval-every", "50000", "--time-limit", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [(r["seed"], r["status"]) for r in result["runs"]] == [
        (0, "truncated"), (0, "truncated"), (1, "skipped"), (1, "skipped")]
    base, comp = result["runs"][:2]
    assert 0 < base["steps_done"] < 100000 and comp["steps_done"] == 0
    assert math.isfinite(base["final_val_loss"]) and [p["step"] for p in base["val_curve"]] == [0, base["steps_done"]]
    assert result["ratio_final_ppl"]["n_seeds"] == 0


def test_missing_token_file_names_the_prepare_command(tmp_path):
    proc = _run("-c", WITHOUT_DATA_DEPS, SCRIPT, "train", "--tokens", str(tmp_path / "none.pt"),
                "--out", str(tmp_path / "q.json"), "--device", "cpu")
    assert proc.returncode != 0
    assert "gpu_quality.py prepare --out" in proc.stderr
