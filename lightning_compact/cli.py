"""``lightning-compact``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``estimate``).

``estimate`` is not a Trainer command: it runs one training step of a recipe's model
under FakeTensorMode (nothing allocated) and prints where the memory goes; see
:mod:`lightning_compact.memory.estimator` (``lightning-compact estimate --help``).

Two callback groups are added to Lightning's usual ``trainer``/``model``/``data`` ones:

* ``compact``: :class:`~lightning_compact.CompActCallback` (``--compact.rank 0.25``,
  ``--compact.update_proj_gap 50``, ...), on unless ``--compact.enabled false``, which
  gives the baseline run of the same recipe;
* ``memory``: :class:`~lightning_compact.PeakMemoryMonitor`, on unless
  ``--memory.enabled false``.

Example::

    lightning-compact fit --config recipes/quickstart/pretrain_llama_tiny.yaml
    lightning-compact fit --config recipes/quickstart/pretrain_llama_tiny.yaml --compact.enabled false
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that recipes and flags may name these classes by their short names.
import lightning_compact.data  # noqa: F401
import lightning_compact.models.causal_lm  # noqa: F401
import lightning_compact.models.classification  # noqa: F401
from lightning_compact import CompActCallback, PeakMemoryMonitor

__all__ = ["CompactCLI", "main", "run_cli"]

# Callback groups with an on/off switch: nested key -> class.
SWITCHED_CALLBACKS: dict[str, type[Callback]] = {"compact": CompActCallback, "memory": PeakMemoryMonitor}

# The CLI's default rank: the paper's middle setting, r = n/4 of each layer's input size.
DEFAULT_RANK = 0.25


def _switched(class_type: type[Callback], *args: Any, enabled: bool = True, **kwargs: Any) -> Callback | None:
    # jsonargparse instantiator: the `enabled` key is the CLI's, not the callback's.
    return class_type(*args, **kwargs) if enabled else None


class CompactCLI(LightningCLI):
    """``LightningCLI`` with CompAct and peak-memory callback groups that can be switched off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Re-running a recipe into the same log directory should not fail on config.yaml.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in {"fit", "validate", "test"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, callback in SWITCHED_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)
            parser.add_argument(
                f"--{key}.enabled", type=bool, default=True,
                help=f"Use {callback.__name__} (false: leave it out, e.g. for a baseline run).",
            )
            parser.add_instantiator(_switched, callback, subclasses=False)
        parser.set_defaults({"compact.rank": DEFAULT_RANK})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # As LightningCLI's, minus the switched-off (None) callbacks.
        keys = self._parser(self.subcommand).callback_keys
        extra = [cb for cb in (self._get(self.config_init, key) for key in keys) if cb is not None]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, extra)


def run_cli(args: Sequence[str] | None = None) -> CompactCLI:
    """Run the Trainer CLI on ``args`` (default: ``sys.argv``); returns it for tests and notebooks."""
    return CompactCLI(args=None if args is None else list(args))


def main(args: Sequence[str] | None = None) -> int:
    """The console script: ``estimate`` or a Trainer subcommand. Returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["estimate"]:
        from lightning_compact.memory.estimator import main as estimate_main

        return estimate_main(argv[1:])
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
