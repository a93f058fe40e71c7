"""Pack tokenized documents into fixed-length blocks, documents separated by EOS."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

__all__ = ["pack_batch", "iter_blocks"]


def iter_blocks(documents: Iterable[Sequence[int]], seq_len: int, eos_token_id: int) -> Iterator[list[int]]:
    """Yield ``seq_len``-token blocks of the concatenation ``doc0 EOS doc1 EOS ...``.

    The incomplete tail is dropped, so every block is full and no padding is needed.

    Args:
        documents: token ids, one sequence per document.
        seq_len: tokens per block.
        eos_token_id: appended after each document so the model sees where it ends.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a block predicts its next tokens), got {seq_len}")
    buffer: list[int] = []
    for doc in documents:
        buffer.extend(doc)
        buffer.append(eos_token_id)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            del buffer[:seq_len]


def pack_batch(batch: dict[str, list[list[int]]], seq_len: int, eos_token_id: int) -> dict[str, list[list[int]]]:
    """``datasets.map(batched=True)`` form of :func:`iter_blocks` on the ``input_ids`` column."""
    return {"input_ids": list(iter_blocks(batch["input_ids"], seq_len, eos_token_id))}
