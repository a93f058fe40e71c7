"""Run by test_fsdp.py as a script: Lightning re-launches this file once per rank.

FSDP2 through ``ModelParallelStrategy`` (gloo, 2 CPU processes): the module shards each
decoder layer, each linear layer and the root in ``configure_model``, as Lightning
documents. In one launch, per gradient mode: an uninterrupted run of ``STEPS`` steps, the
same run stopped after its first epoch and resumed from a distributed checkpoint and
from a full one, and (for the traffic count) one epoch of the baseline without CompAct.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from helpers import PlainLM, full_state, make_trainer, token_loader  # noqa: E402

from lightning_compact import CompActCallback  # noqa: E402

# Shared with test_fsdp.py: the single-process run on the global batch uses them too.
SETTINGS = dict(accumulate_grad_batches=2, gradient_clip_val=0.5, precision="32-true")
# One epoch is 3 optimizer steps (24 samples, 2 per rank, 2 micro-batches per step); the run has 2 epochs
# and is interrupted after the first (Lightning resumes a plain DataLoader only at an epoch boundary).
STEPS, N_SAMPLES, LOCAL_BATCH, WORLD, RANK, GAP = 6, 24, 2, 2, 4, 2
EPOCH_STEPS = N_SAMPLES // (WORLD * LOCAL_BATCH * SETTINGS["accumulate_grad_batches"])


class ShardedLM(PlainLM):
    """The plain LM of the tests, sharded by FSDP2 in ``configure_model``."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if isinstance(module, nn.Linear):  # CompActLinear too: one reduce-scatter per weight, to count them
                fully_shard(module, mesh=mesh)
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def rank_loader(rank: int) -> DataLoader:
    """Rank ``rank``'s share of each global batch: samples ``rank::WORLD`` (in order, as the single-process run)."""
    tokens = token_loader(n_samples=N_SAMPLES).dataset.tensors[0]
    return DataLoader(TensorDataset(tokens[rank::WORLD]), batch_size=LOCAL_BATCH, shuffle=False)


class ReduceScatterCounter:
    """Counts the elements FSDP2 reduce-scatters per optimizer step (it calls torch.distributed's collective)."""

    NAMES = ("reduce_scatter_single", "reduce_scatter_tensor")  # the name FSDP2 calls differs across torch versions

    def __init__(self):
        self.sent: list[int] = []
        self.trainer = None
        self._originals = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

    def __enter__(self):
        for name, original in self._originals.items():
            setattr(dist, name, self._wrap(original))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _wrap(self, original):
        def counted(*args, **kwargs):
            tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
            step = self.trainer.global_step
            while len(self.sent) <= step:
                self.sent.append(0)
            self.sent[step] += tensor.numel()
            return original(*args, **kwargs)

        return counted


def trainer_for(out_dir: Path, callbacks, max_epochs: int, distributed_ckpt: bool = True, **kwargs) -> pl.Trainer:
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed_ckpt)
    return make_trainer(out_dir, callbacks, devices=WORLD, strategy=strategy, use_distributed_sampler=False,
                        max_epochs=max_epochs, max_steps=-1, **{"enable_checkpointing": True, **SETTINGS, **kwargs})


def fresh_module() -> ShardedLM:
    torch.manual_seed(0)  # FSDP2 shards each rank's own copy: every rank starts from the same weights
    return ShardedLM()


def main(out_dir: Path, grad_mode: str, update_rule: str | None = None) -> None:
    results = {}
    rank = None

    # The baseline (no CompAct): how much a step reduce-scatters without compression
    # (the traffic test runs it; the update-rule tests skip it).
    if update_rule is None:
        module = fresh_module()
        trainer = trainer_for(out_dir / "baseline", [], max_epochs=1, enable_checkpointing=False)
        with ReduceScatterCounter() as counter:
            counter.trainer = trainer
            trainer.fit(module, rank_loader(trainer.global_rank))
        rank = trainer.global_rank
        results["baseline_sent"] = counter.sent

    # The uninterrupted run.
    module = fresh_module()
    cb = CompActCallback(rank=RANK, update_proj_gap=GAP, grad_mode=grad_mode, update_rule=update_rule)
    trainer = trainer_for(out_dir / "full_run", [cb], max_epochs=STEPS // EPOCH_STEPS, enable_checkpointing=False)
    rank = trainer.global_rank
    with ReduceScatterCounter() as counter:
        counter.trainer = trainer
        trainer.fit(module, rank_loader(rank))
    results["state"] = full_state(module)
    results["sent"] = counter.sent
    results["converted"] = sorted(cb.report.converted)
    results["compressed"] = sorted(cb.compressed_layers)
    results["converted_numel"] = sum(
        cb.report.shapes[name][0] * cb.report.shapes[name][1] for name in cb.report.converted
    )
    results["compressed_numel"] = sum(RANK * cb.report.shapes[name][1] for name in cb.report.converted)
    # After fit the layers stay (FSDP2 holds them) but act as plain linear layers.
    results["restored"] = [type(m).__name__ for m in module.modules() if hasattr(m, "active")]
    results["active_after_fit"] = [m.active for m in module.modules() if hasattr(m, "active")]

    # Stopped after the first epoch, resumed from its checkpoint: distributed, then full.
    for kind, distributed_ckpt in (("dcp", True), ("full", False)):
        ckpt_dir = out_dir / f"ckpt_{kind}"
        module = fresh_module()
        ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1)
        compact = CompActCallback(rank=RANK, update_proj_gap=GAP, grad_mode=grad_mode, update_rule=update_rule)
        trainer = trainer_for(out_dir / kind, [compact, ckpt], max_epochs=1, distributed_ckpt=distributed_ckpt)
        trainer.fit(module, rank_loader(rank))
        path = ckpt_dir / f"epoch=0-step={EPOCH_STEPS}.ckpt"
        module = fresh_module()
        compact = CompActCallback(rank=RANK, update_proj_gap=GAP, grad_mode=grad_mode, update_rule=update_rule)
        trainer = trainer_for(out_dir / kind, [compact], max_epochs=STEPS // EPOCH_STEPS,
                              distributed_ckpt=distributed_ckpt, enable_checkpointing=False)
        trainer.fit(module, rank_loader(rank), ckpt_path=path)
        results[f"resumed_{kind}"] = full_state(module)
        results[f"ckpt_{kind}_is_dir"] = path.is_dir()

    torch.save(results, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])  # out_dir, grad_mode[, update_rule]
