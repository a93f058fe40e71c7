"""``lightning-compact``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``estimate``, ``demo``).

``demo`` runs :mod:`lightning_compact.demo`: the baseline, CompAct and CompAct with lean
activations side by side on a tiny offline model, one table and one picture.

``estimate`` is not a Trainer command: it runs one training step of a recipe's model
under FakeTensorMode (nothing allocated) and prints where the memory goes; see
:mod:`lightning_compact.memory.estimator` (``lightning-compact estimate --help``). Its
flags are named like the recipe keys they override (``--data.batch_size``).

Configuration mistakes the CLI can name (an invalid ``--compact.*`` or ``--memory.*``
value, a GPU recipe on a machine without a GPU) end with one ``error:`` line and exit
status 2, as a bad flag does, instead of a traceback; a hub dataset, tokenizer or model
that cannot be reached ends with one line too (its offline alternative), exit status 1.

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

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that recipes and flags may name these classes by their short names.
import lightning_compact.data  # noqa: F401
import lightning_compact.models.causal_lm  # noqa: F401
import lightning_compact.models.classification  # noqa: F401
from lightning_compact import CompActCallback, PeakMemoryMonitor
from lightning_compact.data.hub import HubUnavailableError
from lightning_compact.data.packaged import MissingPackageError

__all__ = ["CompActCLI", "ConfigError", "main", "resolve_recipe", "run_cli"]

# Callback groups with an on/off switch: nested key -> class.
SWITCHED_CALLBACKS: dict[str, type[Callback]] = {"compact": CompActCallback, "memory": PeakMemoryMonitor}

# The CLI's default rank: the paper's middle setting, r = n/4 of each layer's input size.
DEFAULT_RANK = 0.25


DESCRIPTION = (
    "CompAct (compressed activations) for PyTorch Lightning: train, validate or test a recipe "
    "(--config recipes/...), or estimate its memory."
)
ESTIMATE_HELP = (
    "Estimate the peak memory of one training step of a recipe, baseline vs CompAct, without a GPU; "
    "with --budget, plan the fastest configuration that fits (see `lightning-compact estimate --help`)."
)


class ConfigError(ValueError):
    """A configuration the CLI rejects before training; :func:`main` prints it as one ``error:`` line."""


def _switched(class_type: type[Callback], *args: Any, enabled: bool = True, **kwargs: Any) -> Callback | None:
    # jsonargparse instantiator: the `enabled` key is the CLI's, not the callback's.
    if not enabled:
        return None
    try:
        return class_type(*args, **kwargs)
    except (ValueError, MisconfigurationException) as err:
        # Only the group's own arguments reach the constructor: a user error, not a bug.
        key = next(k for k, cls in SWITCHED_CALLBACKS.items() if cls is class_type)
        raise ConfigError(f"invalid --{key}.* setting: {err}") from err


def _no_gpu_message(accelerator: str, recipe: str = "<recipe>") -> str | None:
    """Why ``accelerator`` cannot run here, or ``None``; checked before Lightning's "No supported gpu backend found!"."""
    if accelerator not in ("gpu", "cuda"):
        return None
    mps = accelerator == "gpu" and torch.backends.mps.is_available()
    if torch.cuda.is_available() or mps:
        return None
    return (
        f"this recipe needs a GPU (trainer.accelerator: {accelerator}) and this machine has none that torch can use "
        f"(torch {torch.__version__}, torch.cuda.is_available() is False). To run it on the CPU anyway (slow: it is "
        "sized for a GPU), add `--trainer.accelerator cpu`; to see its memory without a GPU, run "
        f"`lightning-compact estimate --config {recipe}`; recipes/quickstart/ has recipes made for a CPU."
    )


class StepRunProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without "Epoch 0/-2" in a run bounded by ``max_steps``.

    Such a run has ``max_epochs = -1``, which the bar prints as ``/{max_epochs - 1}``.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            bounded = f"Epoch {current_epoch}/{self.trainer.max_epochs - 1}"
            steps = f"Epoch {current_epoch} (max_steps {self.trainer.max_steps})"
            description = description.replace(bounded, steps, 1)
        return description


class _ShortUsageParser(LightningArgumentParser):
    # On a bad value, jsonargparse prints the whole usage (70+ lines for `fit`) above the
    # one line that matters; point to --help instead.
    def format_usage(self) -> str:
        return f"usage: {self.prog.replace(' [options]', '')} [-h] [-c CONFIG] [--KEY VALUE ...]\n"


class CompActCLI(LightningCLI):
    """``LightningCLI`` with CompAct and peak-memory callback groups that can be switched off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Re-running a recipe into the same log directory should not fail on config.yaml.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _ShortUsageParser)
        # prog: the console script's name also under `python -m lightning_compact.cli`.
        kwargs.setdefault("parser_kwargs", {"prog": "lightning-compact", "description": DESCRIPTION})
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Listed in `--help` only: main() hands `estimate` to the estimator before this parser runs.
        estimate = self.init_parser(description=ESTIMATE_HELP, add_help=False)
        parser._subcommands_action.add_subcommand("estimate", estimate, help=ESTIMATE_HELP)
        demo_help = "baseline, CompAct and CompAct + lean side by side on a tiny offline model (about 2 minutes on a CPU)"
        demo = self.init_parser(description=demo_help, add_help=False)
        parser._subcommands_action.add_subcommand("demo", demo, help=demo_help)

    def before_instantiate_classes(self) -> None:
        if self.subcommand in ("estimate", "demo"):
            raise ConfigError(f"`{self.subcommand}` is not a Trainer command: run it through lightning_compact.cli.main([...])")
        # Lightning checks the accelerator when it builds the Trainer and says only "No
        # supported gpu backend found!"; say what to do before anything is built.
        config = self.config[self.subcommand] if self.subcommand else self.config
        accelerator = config.get("trainer.accelerator")
        recipes = [str(path) for path in config.get("config") or []]
        message = _no_gpu_message(accelerator, recipes[-1] if recipes else "<recipe>") if isinstance(accelerator, str) else None
        if message is not None:
            raise ConfigError(message)

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
        callbacks = [*extra, *(trainer_config.get("callbacks") or [])]
        if (trainer_config.get("enable_progress_bar") is not False and importlib.util.find_spec("rich") is not None
                and not any(isinstance(cb, ProgressBar) for cb in callbacks)):
            extra.append(StepRunProgressBar())  # the bar Lightning would pick (rich installed), minus "Epoch 0/-2"
        return self._instantiate_trainer(trainer_config, extra)


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: the installed package's ``recipes``, then a checkout's ``recipes/``."""
    package = Path(__file__).resolve().parent
    return [d for d in (package / "recipes", package.parent / "recipes") if d.is_dir()]


def resolve_recipe(value: str) -> str:
    """A ``--config`` value: a file as given, else the shipped recipe of that name, else unchanged.

    ``quickstart/pretrain_llama_tiny`` (or with ``.yaml``) names
    ``recipes/quickstart/pretrain_llama_tiny.yaml`` wherever the package is installed.
    """
    if "\n" in value or Path(value).exists():
        return value
    for folder in recipe_dirs():
        for name in (value, f"{value}.yaml"):
            candidate = folder / name
            if candidate.is_file():
                return str(candidate)
    return value


def _resolve_configs(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_recipe(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_recipe(arg.removeprefix("--config="))
    return out


def run_cli(args: Sequence[str] | None = None) -> CompActCLI:
    """Run the Trainer CLI on ``args`` (default: ``sys.argv``); returns it for tests and notebooks."""
    return CompActCLI(args=None if args is None else list(args))


def main(args: Sequence[str] | None = None) -> int:
    """The console script: ``estimate`` or a Trainer subcommand. Returns the exit status."""
    argv = _resolve_configs(list(sys.argv[1:] if args is None else args))
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (it warns when given args too)
    if argv[:1] == ["estimate"]:
        from lightning_compact.memory.planner import main as estimate_main  # the estimator, or with --budget the plan

        return estimate_main(argv[1:])
    if argv[:1] == ["demo"]:
        from lightning_compact.demo import main as demo_main  # baseline, CompAct, CompAct + lean side by side

        try:
            return demo_main(argv[1:])
        except MissingPackageError as err:
            print(f"lightning-compact demo: error: {err}", file=sys.stderr)
            return 2
    try:
        # None, not argv, when reading sys.argv: LightningCLI warns when given both.
        run_cli(None if args is None else argv)
    except (ConfigError, MisconfigurationException, MissingPackageError, HubUnavailableError) as err:
        # Each message names the fix; a traceback through jsonargparse and Lightning would bury it.
        # MisconfigurationException: a setting only checked once the model exists (e.g. a
        # --compact.target_modules that matches no layer); MissingPackageError: an extra not installed.
        command = next((a for a in argv if a in CompActCLI.subcommands()), None)
        print(f"lightning-compact{' ' + command if command else ''}: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, HubUnavailableError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
