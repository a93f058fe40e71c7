"""Run by test_meta_init.py as a script: Lightning re-launches this file once per rank (gloo, 2 CPU processes).

``exact OUT``: a tiny ``CausalLMModule`` under ``ModelParallelStrategy`` with CompAct
(compressed), built on ``meta`` and materialized shard by shard (``empty_init``), against
the same module built whole on each rank and initialized by the same keyed init; plus a
full checkpoint loaded into the sharded model (only rank 0 reads it).

``rss OUT MODE``: a big LLaMA (2.1 GB in float32) started with ``MODE`` = ``meta`` or
``full``; each rank records its peak RSS when fit starts (everything is built, sharded and
initialized; the optimizer has no state yet).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1] / "benchmarks" / "common"))  # host_peak_bytes, shared with gpu_meta_init
from helpers import full_state, make_trainer  # noqa: E402
from provenance import host_peak_bytes  # noqa: E402

from lightning_compact import CompActCallback  # noqa: E402
from lightning_compact.models import CausalLMModule  # noqa: E402

WORLD, STEPS, SEED = 2, 3, 7
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
# 8 × 50.3 M + 2 × 65.5 M = 534 M parameters: 2.1 GB in float32, well above a process's own half GB.
BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
           max_position_embeddings=16)
BIG_PARAMS = 8 * (4 * 2048 * 2048 + 3 * 2048 * 5504 + 2 * 2048) + 2 * 32000 * 2048 + 2048


class Record(pl.Callback):
    def __init__(self, snapshot: bool = True):
        self.snapshot = snapshot
        self.initial = None
        self.rss_at_start = None
        self.losses: list[float] = []

    def on_fit_start(self, trainer, pl_module):
        self.rss_at_start = host_peak_bytes()

    def on_train_start(self, trainer, pl_module):
        if self.snapshot:
            self.initial = full_state(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def loader(rank: int, vocab: int, n: int = 12, seq: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n * WORLD, seq), generator=g)
    return DataLoader([{"input_ids": t} for t in tokens[rank::WORLD]], batch_size=2, shuffle=False)


def trainer_for(out_dir: Path, callbacks, max_steps: int) -> pl.Trainer:
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    return make_trainer(out_dir, callbacks, devices=WORLD, strategy=strategy, use_distributed_sampler=False,
                        max_steps=max_steps, precision="32-true", deterministic=False)


def exact(out_dir: Path) -> None:
    results = {}
    rank = 0
    for kind in ("meta", "full"):
        if kind == "meta":
            module = CausalLMModule("llama_60m", config_overrides=TINY, lr=1e-2, empty_init=True, init_seed=SEED)
            results["meta_before_fit"] = all(t.is_meta for t in module.model.parameters())
        else:
            module = CausalLMModule("llama_60m", config_overrides=TINY, lr=1e-2)
            module.model.reset_parameters(seed=SEED)  # the whole model on each rank, then sharded
        record = Record()
        trainer = trainer_for(out_dir / kind, [CompActCallback(rank=4, update_proj_gap=2), record], STEPS)
        rank = trainer.global_rank
        trainer.fit(module, loader(rank, TINY["vocab_size"]))
        results[f"{kind}_initial"] = record.initial
        results[f"{kind}_final"] = full_state(module.model)
        results[f"{kind}_losses"] = record.losses
        results[f"{kind}_weight_shards"] = sorted({m.weight_shards for m in module.modules() if hasattr(m, "weight_shards")})
    # A full checkpoint (written by the test) loaded into the sharded model; rank 1 never reads it.
    module = CausalLMModule("llama_60m", config_overrides=TINY, empty_init=True, init_seed=SEED,
                            init_checkpoint=str(out_dir / "checkpoint.pt"))
    record = Record()
    trainer_for(out_dir / "loaded", [CompActCallback(rank=4), record], 1).fit(module, loader(rank, TINY["vocab_size"]))
    results["loaded_initial"] = record.initial
    torch.save(results, out_dir / f"rank{rank}.pt")


def rss(out_dir: Path, mode: str) -> None:
    before = host_peak_bytes()
    module = CausalLMModule("llama_60m", config_overrides=BIG, empty_init=mode == "meta", init_seed=SEED)
    record = Record(snapshot=False)  # gathering the full state would hold the whole model
    trainer = trainer_for(out_dir / mode, [CompActCallback(rank=0.25), record], 1)
    trainer.fit(module, loader(0, 100, n=1, seq=8))
    torch.save({"before_build": before, "at_fit_start": record.rss_at_start, "after_step": host_peak_bytes()},
               out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, what, *rest = sys.argv[1:]
    {"exact": exact, "rss": rss}[what](Path(out), *rest)
