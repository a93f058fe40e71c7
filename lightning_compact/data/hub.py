"""Fail fast, and say what to do, when a Hugging Face hub dataset or model cannot be reached.

Offline, ``datasets`` and ``transformers`` retry for tens of seconds before giving up
with a generic message. The guard here probes the hub once (a TCP connect with a short
timeout) and raises a :class:`HubUnavailableError` that names the offline alternative.
Nothing global is changed: the environment variables are only read.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

__all__ = ["HubUnavailableError", "hub_offline_reason", "hub_guard"]

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROBE_TIMEOUT_S = 3.0


class HubUnavailableError(ConnectionError):
    """A dataset or model on the Hugging Face hub was asked for and the hub cannot be used."""


def _env_offline() -> str | None:
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]} is set"
    return None


@functools.lru_cache(maxsize=4)
def _probe(host: str, port: int) -> str | None:
    # Cached per process: one probe per run, not per split or file.
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{host} is unreachable ({err.__class__.__name__}: {err})"


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used now (offline variables set, or unreachable), else ``None``."""
    return _env_offline() or _probe(*_endpoint())


def _library_offline() -> bool:
    """Whether ``datasets``/``huggingface_hub`` themselves run offline (read once, at their import)."""
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - datasets depends on it
        return False
    return bool(hub_constants.HF_HUB_OFFLINE)


def _message(what: str, reason: str, alternative: str) -> str:
    return (
        f"Cannot load {what} from the Hugging Face hub: {reason}. "
        f"Offline, use {alternative}. If it is already in your local cache, start the "
        "process with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 to read it from there."
    )


@contextlib.contextmanager
def hub_guard(what: str, alternative: str, *, cache_lookup: bool = False) -> Iterator[bool]:
    """Wrap one hub access; raise :class:`HubUnavailableError` at once when it cannot work.

    Args:
        what: what is being loaded, e.g. ``"dataset 'allenai/c4'"``.
        alternative: the offline replacement to suggest, e.g. ``"dataset: kjv"``.
        cache_lookup: the caller can restrict itself to the local cache (transformers'
            ``local_files_only=True``). Without it (``datasets``, which reads its offline
            switch once at import and otherwise retries for ~25 s), an unreachable hub
            raises before the call unless the library already runs offline.

    Yields:
        ``True`` when the caller should read local files only: the hub cannot be used,
        but a cached copy may still be there.

    Raises:
        HubUnavailableError: the hub cannot be used and the request could not be served
            from the local cache.
    """
    reason = hub_offline_reason()
    if reason is not None and not cache_lookup and not _library_offline():
        raise HubUnavailableError(_message(what, reason, alternative))
    try:
        yield reason is not None
    except HubUnavailableError:
        raise
    except (OSError, ValueError) as err:  # ConnectionError, LocalEntryNotFoundError, DatasetNotFoundError, ...
        if reason is None and not _is_connection_error(err):
            raise  # online and a genuine error (typo in a name, bad config): let it through
        raise HubUnavailableError(_message(what, reason or f"{type(err).__name__}: {err}", alternative)) from err


def _is_connection_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "Timeout"})
