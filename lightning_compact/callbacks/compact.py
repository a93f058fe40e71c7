"""``CompActCallback``: CompAct for an unmodified LightningModule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_compact.layers import (
    DEFAULT_EXCLUDED_MODULES,
    CompActConfig,
    CompActLinear,
    ConversionReport,
    convert_to_compact,
    matches_any,
    resolve_rank,
)
from lightning_compact.projection import PROJECTIONS, window_for_step

__all__ = ["CompActCallback"]

_BYTES_PER_ELEMENT = {"64": 8, "32": 4, "16": 2, "bf16": 2}


def _activation_bytes(trainer: pl.Trainer) -> int:
    """Bytes per stored activation element under the trainer's precision setting."""
    precision = str(trainer.precision)
    return _BYTES_PER_ELEMENT.get(precision.split("-")[0], 2)


def _check_strategy(strategy: Strategy) -> None:
    # Only strategies whose parameters are whole tensors on each rank are supported:
    # sharded ones (FSDP, DeepSpeed, model parallel) hand the layer flat or DTensor
    # shards, which this implementation has not been verified with.
    # (DeepSpeedStrategy subclasses DDPStrategy, hence the explicit refusal first.)
    sharded = isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy))
    if not sharded and isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    raise MisconfigurationException(
        f"CompActCallback does not support the {type(strategy).__name__} strategy. "
        "Use a single device or DDP (`strategy='ddp'`, 'ddp_spawn', 'ddp_notebook'); "
        "sharded strategies (FSDP, DeepSpeed, model parallel) are not supported yet."
    )


class CompActCallback(Callback):
    r"""Train an existing LightningModule with CompAct: compressed activations for linear layers.

    At ``setup`` (and again at ``on_fit_start``, for layers made in ``configure_model``)
    the module's ``nn.Linear`` layers are swapped in place for
    :class:`~lightning_compact.layers.CompActLinear`, keeping the same Parameters, so
    optimizers, DDP and ``state_dict`` keys are unaffected. Each training forward then
    saves ``x·P`` (rank ``r``) instead of ``x``; the weight gradient is an unbiased
    estimate, decompressed to full size.

    The projection of every layer changes every ``update_proj_gap`` optimizer steps,
    derived from ``trainer.global_step`` alone: all micro-batches of an accumulated step
    share ``P``, every rank uses the same ``P``, and a resumed run continues with the
    projections the uninterrupted run would have used.

    Nothing is logged; a table of converted and skipped layers is printed once on rank zero.

    Args:
        rank: an ``int`` (absolute rank, ``>= 1``) or a ``float`` in (0, 1] (fraction of
            each layer's ``in_features``, e.g. ``0.25`` for the paper's r = n/4).
        update_proj_gap: optimizer steps between projection resamples (the paper's T).
        seed: base seed of the projections; the same on every rank.
        target_modules: name patterns of the layers to convert (default: all linear
            layers). Each pattern must match at least one linear layer.
        exclude_modules: name patterns left uncompressed. Default:
            :data:`~lightning_compact.layers.DEFAULT_EXCLUDED_MODULES` (output heads and
            attention output projections). A list given here replaces the default.
        projection: ``"gaussian"`` (the paper's) or ``"rademacher"``.

    Raises:
        MisconfigurationException: for a bad argument, an unsupported strategy, or a
            target pattern that matches no linear layer.

    Example::

        trainer = Trainer(callbacks=[CompActCallback(rank=0.25)])
    """

    def __init__(
        self,
        rank: int | float,
        update_proj_gap: int = 50,
        seed: int = 0,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        projection: str = "gaussian",
    ) -> None:
        try:
            resolve_rank(rank, in_features=1)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"CompActCallback(rank={rank!r}): {err}") from err
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise MisconfigurationException(
                f"CompActCallback(update_proj_gap={update_proj_gap!r}): must be a positive int "
                "(optimizer steps between projection resamples; the paper uses 50 for pretraining)"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(f"CompActCallback(seed={seed!r}): must be an int")
        if projection not in PROJECTIONS:
            raise MisconfigurationException(
                f"CompActCallback(projection={projection!r}): must be one of {', '.join(PROJECTIONS)}"
            )
        for arg, patterns in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
            if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
                raise MisconfigurationException(f"CompActCallback({arg}=...): must be a list of name patterns")
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.seed = seed
        self.projection = projection
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.exclude_modules = tuple(exclude_modules) if exclude_modules is not None else tuple(DEFAULT_EXCLUDED_MODULES)
        self.report = ConversionReport()
        self._table_printed = False

    @property
    def layers(self) -> dict[str, CompActLinear]:
        """The converted layers by fully qualified name."""
        return self.report.converted

    def _config(self) -> CompActConfig:
        return CompActConfig(
            rank=self.rank, projection=self.projection, seed=self.seed, exclude_modules=self.exclude_modules
        )

    def _convert(self, pl_module: pl.LightningModule) -> None:
        targets = self.target_modules
        module_filter = None if targets is None else (lambda _m, name: matches_any(name, targets) is not None)
        self.report.merge(convert_to_compact(pl_module, config=self._config(), module_filter_fn=module_filter))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy)
        self._convert(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(pl_module)  # layers created in configure_model exist only now
        if self.target_modules is not None:
            unmatched = [p for p in self.target_modules if not any(matches_any(n, [p]) for n in self.report.shapes)]
            if unmatched:
                names = ", ".join(list(self.report.shapes)[:8])
                raise MisconfigurationException(
                    f"CompActCallback(target_modules=...): {unmatched} match no linear layer. "
                    f"Linear layers in this model include: {names}"
                )
        if not self.report.converted:
            rank_zero_warn(
                "CompActCallback converted no layer: the model has no eligible nn.Linear "
                "(see the skip reasons below); training runs uncompressed."
            )
        if not self._table_printed:
            rank_zero_info(self.format_table(_activation_bytes(trainer)))
            self._table_printed = True
        self._apply_schedule(trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply_schedule(trainer.global_step)

    def _apply_schedule(self, global_step: int) -> None:
        window = window_for_step(global_step, self.update_proj_gap)
        for layer in self.report.converted.values():
            # The base seed is re-applied too: a checkpoint may have restored another one.
            layer.base_seed = self.seed
            layer.window = window

    def format_table(self, bytes_per_element: int = 2) -> str:
        """The converted and skipped layers, their ranks and the activation bytes saved per token."""
        rows = [("layer", "in -> out", "rank", "saved/token")]
        saved_total = 0
        for name, layer in self.report.converted.items():
            n, m = layer.in_features, layer.out_features
            saved = (n - layer.rank) * bytes_per_element
            saved_total += saved
            rows.append((name, f"{n} -> {m}", str(layer.rank), f"{saved} B"))
        for name, reason in self.report.skipped.items():
            n, m = self.report.shapes[name]
            rows.append((name, f"{n} -> {m}", "-", f"skipped: {reason}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        header = (
            f"CompAct: {len(self.report.converted)} linear layers compressed, {len(self.report.skipped)} left as they are "
            f"(projection={self.projection}, resampled every {self.update_proj_gap} steps)"
        )
        footer = (
            f"Up to {saved_total} B per token fewer saved for the backward pass "
            f"({bytes_per_element} B per element; layers sharing one input, like q/k/v, save less together)."
        )
        return "\n".join([header, *lines, footer])

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "update_proj_gap": self.update_proj_gap, "rank": self.rank, "projection": self.projection}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The checkpoint's schedule wins, so the resumed run reuses the same projections.
        for key in ("seed", "update_proj_gap"):
            saved = state_dict.get(key, getattr(self, key))
            if saved != getattr(self, key):
                rank_zero_warn(
                    f"CompActCallback: {key}={getattr(self, key)} differs from the checkpoint's {saved}; "
                    "continuing with the checkpoint's value so the projections match the interrupted run."
                )
                setattr(self, key, saved)
