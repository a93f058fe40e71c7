"""Per-rank memory of multi-process runs: the estimator's step on one rank of ``world_size``.

* ``"fsdp2"``: the model is sharded as :class:`~lightning_compact.models.CausalLMModule`
  shards it under ``ModelParallelStrategy`` (``fully_shard`` on each decoder layer, then
  on the model; CompAct's ``δ`` sharded with its weight) and the step runs on rank 0 of
  a *fake* process group of ``world_size`` ranks (torch's ``"fake"`` backend:
  collectives return at once; every shape, and so every buffer, is a real rank's). The
  tracker then counts what a rank holds: its parameter, gradient and optimizer-state
  shards, the all-gathered parameters of the blocks in flight, and the reduce-scatter
  buffers.
* ``"ddp"``: the single-device step (every rank holds everything) plus DDP's gradient
  buckets, a second copy of every gradient DDP reduces (``gradient_as_bucket_view`` is
  off by default). In compressed mode DDP reduces each ``δ``'s ``Ĝ``, not the weight's
  gradient, so the buckets shrink by r/n for converted weights too.

:class:`~lightning_compact.memory.recipe.RunShape` carries ``world_size`` and ``strategy``
(``STRATEGIES``); its batch is per rank (Lightning's ``data.batch_size`` is per process).
``fake=False`` runs the same step on real CPU tensors inside an initialised process group of ``world_size`` ranks: that is how the
estimate is checked against a real 2-process run (``tests/test_sharded_estimate.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_compact._torch_private import dispatch_modes_disabled, fake_store
from lightning_compact.layers import CompActLinear
from lightning_compact.memory.breakdown import StepMemory

__all__ = ["add_gradients", "ddp_bucket_bytes", "fake_process_group", "shard_for_fsdp2", "untracked_gloo_collectives"]


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """Rank 0 of a process group of ``world_size`` ranks whose collectives do nothing (shapes only)."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised: estimate a sharded run from a fresh process")
    store = fake_store()()  # torch's testing package; PrivateTorchAPIError names the torch to install
    dist.init_process_group("fake", store=store, rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _UntrackedCollective:
    """FSDP2's all-gather or reduce-scatter on gloo, through staging copies no dispatch mode sees.

    A gloo collective runs on a worker thread that still holds its tensors a moment after
    the caller's ``wait`` returns; whoever lets go last frees them. When FSDP's own buffers
    went to gloo, a buffer FSDP had dropped could stay alive into the next ops on a loaded
    machine, so the measured peak of a real step changed from run to run (issue 24: 2 of
    11 runs 5.6% high). Here gloo only ever holds staging copies made with the dispatch
    modes (``MemTracker``) off, so every tracked buffer is freed on the calling thread
    where FSDP drops it, as under the fake backend the estimate runs on. The staging copies
    stand for what NCCL keeps in its own buffers; they are not counted.
    """

    def __init__(self, reduce_scatter: bool) -> None:
        self.reduce_scatter = reduce_scatter

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)  # as FSDP's default, seen by the tracker

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any = None,
                 async_op: bool = False) -> None:
        with torch.no_grad(), dispatch_modes_disabled():
            send, receive = input_tensor.clone(), torch.empty_like(output_tensor)
            if self.reduce_scatter:
                dist.reduce_scatter_tensor(receive, send, op=op, group=group)
            else:
                dist.all_gather_into_tensor(receive, send, group=group)  # synchronous, even if FSDP asked async_op
            output_tensor.copy_(receive)


def _staged_all_reduce(tensor: torch.Tensor, group: Any = None) -> None:
    with torch.no_grad(), dispatch_modes_disabled():
        staged = tensor.clone()
        dist.all_reduce(staged, group=group)
        tensor.copy_(staged)


@contextlib.contextmanager
def untracked_gloo_all_reduce() -> Iterator[None]:
    """CompActAdamW's per-weight norm all-reduces (channel/tensor rules) through staging copies, as
    :class:`_UntrackedCollective` does for FSDP2's collectives: for a measured real gloo step."""
    from lightning_compact import optim

    previous, optim._all_reduce = optim._all_reduce, _staged_all_reduce
    try:
        yield
    finally:
        optim._all_reduce = previous


def untracked_gloo_collectives(modules: Sequence[Any]) -> None:
    """Route the FSDP2 modules' collectives through :class:`_UntrackedCollective` (a real gloo step, measured)."""
    for module in modules:
        module.set_custom_all_gather(_UntrackedCollective(reduce_scatter=False))
        module.set_custom_reduce_scatter(_UntrackedCollective(reduce_scatter=True))


def shard_for_fsdp2(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Any) -> None:
    """Shard ``model`` as ``CausalLMModule.configure_model`` does (CompAct's ``δ`` with its weight).

    ``optimizer`` (made from ``model.parameters()``, no state yet) is pointed at the
    sharded Parameters, which ``fully_shard`` makes anew.
    """
    from torch.distributed.fsdp import fully_shard

    from lightning_compact.models.causal_lm import decoder_layers
    if optimizer.state or len(optimizer.param_groups) != 1:
        raise ValueError("shard_for_fsdp2 needs an optimizer without state, holding model.parameters() in one group")
    layers = [m for m in model.modules() if isinstance(m, CompActLinear) and m.weight_delta is not None]
    for layer in layers:
        layer.set_grad_mode("compressed", materialize=True)  # FSDP2 shards only real storage
    blocks = list(decoder_layers(model))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if dist.get_backend(mesh.get_group()) == "gloo":  # a real step, measured: see _UntrackedCollective
        untracked_gloo_collectives([*blocks, model])
    optimizer.param_groups[0]["params"] = list(model.parameters())
    for layer in layers:
        layer.link_delta()  # the optimizer finds each sharded δ's layer


def ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of DDP's gradient buckets: one copy of each gradient it reduces (compressed weights: their ``Ĝ``)."""
    compressed = {id(m.weight) for m in model.modules() if isinstance(m, CompActLinear) and m.weight_delta is not None}
    return sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and id(p) not in compressed
    )


def add_gradients(step: StepMemory, extra: int) -> StepMemory:
    """``step`` with ``extra`` bytes of gradients alive throughout (DDP's buckets)."""
    grow = lambda b: dataclasses.replace(b, gradients=b.gradients + extra)  # noqa: E731
    return dataclasses.replace(step, peak=grow(step.peak), largest=grow(step.largest))
