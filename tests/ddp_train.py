"""Run by test_ddp.py as a script: Lightning's `ddp` strategy re-launches this file once per rank."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import PlainLM, make_trainer, token_loader  # noqa: E402

from lightning_compact import CompActCallback, PeakMemoryMonitor  # noqa: E402


def main(out_dir: Path) -> None:
    torch.manual_seed(0)  # same init on both ranks (DDP also broadcasts rank 0's weights)
    module = PlainLM()
    init = {k: v.clone() for k, v in module.state_dict().items()}
    monitor = PeakMemoryMonitor()
    trainer = make_trainer(out_dir, [cb := CompActCallback(rank=4, update_proj_gap=2), monitor], devices=2,
                           strategy="ddp")
    trainer.fit(module, token_loader(n_samples=32, batch_size=4))
    converted = len(cb.layers)  # the module itself is restored to nn.Linear after fit
    torch.save(
        {"state": module.state_dict(), "init": init, "converted": converted, "history": monitor.history},
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
