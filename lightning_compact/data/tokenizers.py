"""Tokenizers behind one small interface: a byte-level one that needs no file, or any HF tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from lightning_compact.data.hub import hub_guard
from lightning_compact.data.packaged import local_source

__all__ = ["ByteTokenizer", "HFTokenizer", "TextTokenizer", "load_hf_tokenizer", "load_tokenizer"]


class TextTokenizer(Protocol):
    """What the pretraining data needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no file, no download.

    Byte 0 (NUL), which real text never contains, separates documents.
    """

    vocab_size = 256
    eos_token_id = 0

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != self.eos_token_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``transformers`` tokenizer adapted to :class:`TextTokenizer` (no special tokens added)."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no EOS token to separate packed documents; "
                "use a tokenizer with one (e.g. t5-base) or `tokenizer: byte`."
            )
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_id = int(tokenizer.eos_token_id)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def load_hf_tokenizer(name_or_path: str) -> Any:
    """Load ``transformers.AutoTokenizer`` from a packaged alias, a local directory or a hub name.

    Raises:
        ImportError: ``transformers`` is missing (install ``lightning-compact[hf]``).
        HubUnavailableError: a hub name while the hub cannot be reached.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            f"Tokenizer {name_or_path!r} needs transformers: pip install 'lightning-compact[hf]' "
            "(or use `tokenizer: byte`, which needs nothing)."
        ) from err
    local = local_source(name_or_path)
    if local is not None:
        return AutoTokenizer.from_pretrained(local)
    with hub_guard(
        f"tokenizer {name_or_path!r}",
        "`tokenizer: byte` (pretraining) or `all-minilm-l6-v2` (fine-tuning), or a local tokenizer directory",
        cache_lookup=True,
    ) as local_only:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)


def load_tokenizer(name: str) -> TextTokenizer:
    """``"byte"`` for :class:`ByteTokenizer`, else a ``transformers`` tokenizer name, alias or directory."""
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(load_hf_tokenizer(name))
