"""The memory benchmark scripts run on a CPU, and the GPU one without datasets/jsonargparse."""

import json

from helpers import REPO, WITHOUT_DATA_DEPS, run_python


def test_gpu_validation_script_cpu_path_runs_without_datasets_or_jsonargparse(tmp_path):
    out = tmp_path / "gpu.json"
    # The paper's three variants, then the (tiny) recipe as configured with CompAct switched
    # off and a smaller micro-batch, as a planner's pick is pasted: lean alone, a fourth case.
    proc = run_python("-c", WITHOUT_DATA_DEPS, "benchmarks/gpu/gpu_validate_estimator.py", "--cpu-smoke", "--variants", "paper",
                "recipe", "--batch-size", "1", "--no-compact", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["passed"] and len(data["cases"]) == 4
    assert [c["variant"] for c in data["cases"]][-1] == "recipe"
    assert all(c["shape"]["batch_size"] == 1 and c["shape"]["compact_rank"] is None for c in data["cases"])
    assert all(abs(c["rel_error"]) <= data["info"]["tolerance"] for c in data["cases"])


def test_compare_methods_reports_every_method_with_ratios_to_the_baseline(tmp_path):
    out = tmp_path / "cmp.json"
    only = ["baseline", "CompAct n/4 compressed", "checkpointing", "GaLore n/4"]
    proc = run_python("benchmarks/cpu/compare_methods.py", "--device", "cpu", "--batch-size", "1", "--seq-len", "32",
                "--num-layers", "1", "--steps", "1", "--only", *only, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["methods"]
    assert list(rows) == only
    for label in only[:3]:
        assert rows[label]["peak_bytes"] > 0 and rows[label]["step_seconds"] > 0
    # GaLore is measured when galore-torch imports, and skipped with the reason otherwise.
    assert "peak_bytes" in rows["GaLore n/4"] or "galore-torch" in rows["GaLore n/4"]["skipped"]
    assert "x base" in proc.stdout


def test_compare_methods_has_lean_rows_and_skips_liger_kernel_on_cpu(tmp_path):
    out = tmp_path / "cmp.json"
    only = ["baseline", "lean", "CompAct n/4 compressed + lean", "CompAct n/8 compressed + lean + checkpointing blocks",
            "liger-kernel"]
    # 512 tokens: fewer and the chunked loss's saved [vocab, hidden] weight gradient
    # outweighs the [tokens, hidden] inputs CompAct compresses.
    proc = run_python("benchmarks/cpu/compare_methods.py", "--device", "cpu", "--batch-size", "4", "--seq-len", "128",
                "--num-layers", "1", "--steps", "1", "--only", *only, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["methods"]
    assert list(rows) == only
    base, lean, both, checkpointed = (rows[k]["largest"]["activations"] for k in only[:4])
    assert checkpointed < both < lean < base
    assert rows["liger-kernel"]["skipped"] == "liger-kernel runs on CUDA only"


def test_estimate_vs_paper_reprints_both_recorded_tables():
    # The tables of RESULTS §4 from their JSON, without estimating again (the first was
    # written before 0.2 renamed the mode "decompress" to "decompressed").
    results = REPO / "benchmarks" / "results"
    table = run_python("benchmarks/cpu/estimate_vs_paper.py", "--from-json", str(results / "estimate_vs_paper.json"))
    assert table.returncode == 0, table.stderr
    assert "46.34   5.27            47.17   4.44" in table.stdout  # 350M n/4: compressed, then decompressed
    beyond = run_python("benchmarks/cpu/estimate_vs_paper.py", "--from-json", str(results / "estimate_beyond_paper.json"))
    assert beyond.returncode == 0, beyond.stderr
    assert "lean + n/4 + checkpoint blocks" in beyond.stdout and "0.092" in beyond.stdout
