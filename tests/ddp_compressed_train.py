"""Run by test_ddp_compressed.py as a script: Lightning's `ddp` strategy re-launches this file once per rank.

Each rank starts from a different initialisation, so the run also checks that rank 0's
weights reach every rank (DDP broadcasts the weights it manages, CompAct the others).
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from helpers import PlainLM, make_trainer, token_loader  # noqa: E402

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

from lightning_compact import CompActCallback  # noqa: E402

# Shared with test_ddp_compressed.py: the single-process run on the global batch uses them too.
SETTINGS = dict(max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.5, precision="64-true")
N_SAMPLES, LOCAL_BATCH, WORLD = 48, 4, 2


class DDPIgnoreRecorder(pl.Callback):
    """Records which parameters the DDP wrapper leaves alone (the wrapper is gone after fit),
    and installs a communication hook (Lightning registers one only on CUDA)."""

    ignored: list[str] = []

    def __init__(self, hook=None):
        self.hook = hook

    def on_train_start(self, trainer, pl_module):
        self.ignored = sorted(trainer.strategy.model.parameters_to_ignore)
        if self.hook is not None:
            trainer.strategy.model.register_comm_hook(None, self.hook)


def rank_loader(rank: int) -> DataLoader:
    """Rank ``rank``'s share of the single-process loader's batches: samples ``rank::WORLD``.

    (Lightning's DistributedSampler would shuffle; an explicit split keeps the global
    batch of each step equal to the single-process run's.)
    """
    tokens = token_loader(n_samples=N_SAMPLES).dataset.tensors[0]
    return DataLoader(TensorDataset(tokens[rank::WORLD]), batch_size=LOCAL_BATCH, shuffle=False)


def main(out_dir: Path, optimizer: str, update_rule: str | None = None, projection: str = "gaussian") -> None:
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(rank)
    module = PlainLM(optimizer=optimizer)

    cb = CompActCallback(rank=4, update_proj_gap=2, update_rule=update_rule, projection=projection)

    # Count the elements of compressed gradients that DDP's reducer sends, per step.
    sent: dict[int, int] = {}

    def counting_hook(state, bucket):
        deltas = {id(layer.weight_delta) for layer in cb.layers.values()}
        step = trainer.global_step
        sent[step] = sent.get(step, 0) + sum(p.numel() for p in bucket.parameters() if id(p) in deltas)
        return allreduce_hook(state, bucket)

    recorder = DDPIgnoreRecorder(counting_hook)
    trainer = make_trainer(out_dir, [cb, recorder], devices=WORLD, strategy="ddp", use_distributed_sampler=False,
                           **SETTINGS)
    trainer.fit(module, rank_loader(rank))
    torch.save(
        {
            "state": module.state_dict(),
            "sent": [sent.get(step, 0) for step in range(SETTINGS["max_steps"])],
            "compressed_numel": sum(layer.rank * layer.out_features for layer in cb.layers.values()),
            "full_numel": sum(layer.weight.numel() for layer in cb.layers.values()),
            "ignored_by_ddp": recorder.ignored,
            "converted": sorted(f"{name}.weight" for name in cb.layers),
            "compressed": sorted(f"{name}.weight" for name in cb.compressed_layers),
            "projections": {name: layer.projection_matrix().clone() for name, layer in cb.layers.items()},
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])  # out_dir, optimizer[, update_rule[, projection]]
