"""Where and how a benchmark ran: the one record every benchmark's JSON carries as ``"provenance"``.

Imported by the benchmark scripts (each puts ``benchmarks/common/`` on ``sys.path``); it
needs only torch and this package (no ``datasets``, for the GPU machine), and records
lightning's version when it is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import lightning_compact

ROOT = Path(__file__).resolve().parents[2]


def host_peak_bytes() -> int:
    """This process's peak resident memory (Linux ``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: that survives ``exec``, so a process started by a
    fork (a rank Lightning's launcher starts) would report its parent's peak at the fork.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (a Linux peak-RSS counter)")


def _lightning_version() -> str | None:
    try:
        return importlib.metadata.version("lightning")
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:  # the device machine gets a copy of the working tree, maybe without .git
        git = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return git.stdout.strip() if git.returncode == 0 else None


def provenance(device: torch.device | str | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Date (UTC), versions, commit (and whether the tree had changes), machine, the device the figures come from, and the command's arguments.

    ``device``: where the measured work ran (default: the CUDA device when one is
    available, else the CPU); ``argv``: the arguments given to ``main`` (default: the
    command line's).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{device.type} ({torch.get_num_threads()} threads)"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": _lightning_version(),
        "lightning_compact": lightning_compact.__version__,
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_dirty": None if (status := _git("status", "--porcelain")) is None else bool(status),
        "machine": platform.platform(),
        "device": device_name,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }


def write_json(path: str | Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON to ``path`` (nothing when no path is given), all or nothing."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file
