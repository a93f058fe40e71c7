"""Run by test_sharded_estimate.py with ``torch.distributed.run``: one real FSDP2 step per rank, measured."""

import dataclasses
import sys
import threading
import weakref

import torch
import torch.distributed as dist

from lightning_compact._torch_private import torch_dispatch_mode
from lightning_compact.memory.estimator import Variant, estimate
from lightning_compact.memory.recipe import RunShape

# Shared with the test: a small LLaMA, real float32 tensors on the CPU.
SHAPE = RunShape(
    model="llama_60m", batch_size=2, seq_len=32, precision="32-true", device_type="cpu",
    config_overrides={"vocab_size": 256, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                      "num_attention_heads": 4},
)
VARIANTS = {"baseline": Variant(), "compressed_n4": Variant(0.25, "compressed")}


class OffThreadFrees(torch_dispatch_mode()):  # type: ignore[misc]
    """Counts the storages made by ops it sees whose last reference dies on another thread (gloo's).

    Such a free happens whenever that thread lets go, so the measured peak would depend on
    thread timing (issue 24's flaky test); a deterministic measurement has none.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._seen: set[int] = set()

    def _off_thread(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.count += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the StorageImpl's address: one finalizer per storage
                if key not in self._seen and storage.nbytes():
                    self._seen.add(key)
                    weakref.finalize(storage, self._off_thread)
                    weakref.finalize(storage, self._seen.discard, key)
        return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    out = {}
    for name, variant in VARIANTS.items():
        shape = dataclasses.replace(SHAPE, world_size=dist.get_world_size(), strategy="fsdp2")
        with OffThreadFrees() as frees:
            result = estimate(shape, variant, fake=False)
        out[name] = {**result.peak.as_dict(), "off_thread_frees": frees.count}
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
    # Leave together: a rank that tears gloo down while another is still writing its
    # results can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
