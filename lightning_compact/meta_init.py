"""Start a big model sharded: build it on ``meta``, shard it, then give each rank only its shard.

A 7B model in float32 is 27 GB; built whole on each of 8 ranks before FSDP2 shards it,
that is 216 GB of host memory per node before the first step. torchtitan and
Lightning's FSDP2 examples build on the ``meta`` device (no storage), call
``fully_shard``, and only then allocate (``to_empty``) and initialize each rank's rows.
CompAct converts a ``meta`` model without allocating anything either, so the order is:
build on meta → convert → ``fully_shard`` → :func:`materialize_` → optionally
:func:`load_full_state_dict`.

The initialization must not depend on how the model is sharded. :func:`keyed_normal_`
draws each block of :data:`ROW_BLOCK` rows of a parameter from its own generator, seeded
by ``(seed, parameter name, block)``: a rank holding rows ``[a, b)`` draws just the blocks
that cover them, and the values equal a single process's :func:`keyed_normal_` of the
whole tensor for any number of ranks. (Draws are per device type: a CPU run and a CUDA
run of the same seed differ, as ``torch.manual_seed`` runs do.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_compact.distributed import is_dtensor

__all__ = [
    "ROW_BLOCK",
    "has_meta_tensors",
    "keyed_normal_",
    "load_full_state_dict",
    "materialize_",
    "read_full_state_dict",
]

ROW_BLOCK = 256  # rows drawn from one generator: few generators for a big embedding, little waste per shard


def _block_seed(seed: int, key: str, block: int) -> int:
    # A stable hash (Python's hash() differs between processes): every rank derives the same seed.
    digest = hashlib.blake2b(f"{seed}:{key}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``tensor``'s local rows (a view that writes ``tensor``) and the global index of the first one.

    A ``DTensor`` may be replicated or sharded by rows (FSDP2's ``Shard(0)``, on any mesh
    dimensions), split as ``torch.chunk`` splits: ``ceil(rows / size)`` rows per rank.
    """
    if not is_dtensor(tensor):
        return tensor, 0
    local = tensor.to_local()
    start, length = 0, tensor.shape[0]
    coordinate = tensor.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard(0):
            raise ValueError(
                f"keyed initialization supports row-sharded (Shard(0)) and replicated tensors, got {tensor.placements}; "
                "shard by rows (fully_shard's default) or initialize the full tensor and distribute it"
            )
        size = tensor.device_mesh.size(mesh_dim)
        chunk = math.ceil(length / size)
        offset = min(coordinate[mesh_dim] * chunk, length)
        start, length = start + offset, min(chunk, length - offset)
    if local.shape[0] != length:
        raise ValueError(f"unexpected local shard of {tuple(local.shape)} rows for rows [{start}, {start + length})")
    return local, start


@torch.no_grad()
def keyed_normal_(tensor: torch.Tensor, *, std: float, seed: int, key: str, mean: float = 0.0) -> torch.Tensor:
    """Fill ``tensor`` with N(mean, std²) values that depend only on ``(seed, key, row)``.

    ``tensor`` may be a plain tensor or a row-sharded ``DTensor``: its local rows get the
    values the same rows of the full tensor get, so a sharded and a single-process
    initialization agree exactly. Values are drawn in float32 and cast to the tensor's
    dtype. Returns ``tensor``.
    """
    if tensor.ndim == 0:
        raise ValueError(f"{key}: keyed_normal_ needs at least one dimension")
    local, first = _local_rows(tensor)
    rows = local.shape[0]
    if rows == 0:
        return tensor
    total = tensor.shape[0]
    for block in range(first // ROW_BLOCK, (first + rows - 1) // ROW_BLOCK + 1):
        lo, hi = block * ROW_BLOCK, min((block + 1) * ROW_BLOCK, total)
        generator = torch.Generator(device=local.device)
        generator.manual_seed(_block_seed(seed, key, block))
        values = torch.empty((hi - lo, *tensor.shape[1:]), dtype=torch.float32, device=local.device)
        values.normal_(mean, std, generator=generator)
        a, b = max(lo, first), min(hi, first + rows)
        local[a - first:b - first].copy_(values[a - lo:b - lo])
    return tensor


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the ``meta`` device."""
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


@torch.no_grad()
def materialize_(module: nn.Module, device: torch.device | str, init: Callable[[nn.Module], Any]) -> nn.Module:
    """Allocate ``module``'s (local shards of its) tensors on ``device`` and initialize them.

    Call it after ``fully_shard`` so that each rank allocates only its shard. ``init(module)``
    writes every parameter (e.g. ``LlamaForCausalLM.reset_parameters(seed=...)``); buffers
    that were real before (built outside ``meta``, such as rotary tables) keep their
    values; CompAct layers get their projection keys, caches and zero ``weight_delta``
    back. Returns ``module``.
    """
    from lightning_compact.layers import CompActLinear

    kept = {name: b.detach().clone() for name, b in module.named_buffers() if b is not None and not b.is_meta}
    module.to_empty(device=device)
    buffers = dict(module.named_buffers())
    for name, value in kept.items():
        buffers[name].copy_(value)
    init(module)
    for layer in module.modules():
        if isinstance(layer, CompActLinear):
            layer.reset_compact_state()
    return module


def read_full_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict from a file or a directory.

    A directory holds ``*.safetensors`` files or, failing those, ``pytorch_model*.bin``
    (a Hugging Face model folder); a file is a ``.safetensors`` file or anything
    ``torch.save`` wrote (read memory-mapped: pages are read as they are copied).
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin file to load")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update(loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded)
    return state


def _expected_missing(module: nn.Module) -> set[str]:
    # CompAct's weight_delta is not in a plain checkpoint, and a tied weight appears under one name only.
    names = {name for name, _ in module.named_parameters(remove_duplicate=False) if name.endswith("weight_delta")}
    seen: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            names.update({name, seen[id(p)]})
        seen.setdefault(id(p), name)
    return names


def load_full_state_dict(module: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load a full (unsharded) checkpoint into ``module``, sharded by FSDP2 or not.

    Under ``torch.distributed`` with a sharded module only rank 0 reads ``source`` (a
    mapping or what :func:`read_full_state_dict` reads); each tensor is broadcast and every
    rank keeps its rows, so no rank ever holds the whole model. CompAct's ``weight_delta``
    (not in a plain checkpoint) stays zero.

    Raises:
        ValueError: the checkpoint misses a parameter, or has one the module does not.
    """
    sharded = any(is_dtensor(p) for p in module.parameters())
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reader = not (sharded and distributed) or dist.get_rank() == 0
    state: Mapping[str, torch.Tensor] = {}
    if reader:
        state = source if isinstance(source, Mapping) else read_full_state_dict(source)
    own = set(module.state_dict())
    keys: list[Any] = [sorted(state)] if reader else [None]
    if sharded and distributed:
        dist.broadcast_object_list(keys, src=0)
    missing = own - set(keys[0]) - _expected_missing(module)
    unexpected = set(keys[0]) - own
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fit the model: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]} "
            "(a checkpoint of another architecture or size, or one saved with a prefix such as 'model.')"
        )
    if not sharded:
        module.load_state_dict(dict(state), strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=False)
    set_model_state_dict(module, dict(state) if reader else {}, options=options)
