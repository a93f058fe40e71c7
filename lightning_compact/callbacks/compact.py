"""``CompActCallback``: CompAct for an unmodified LightningModule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_compact.distributed import all_reduce_gradients, broadcast_parameters, exclude_from_ddp
from lightning_compact.layers import (
    DEFAULT_EXCLUDED_MODULES,
    CompActConfig,
    CompActLinear,
    ConversionReport,
    convert_to_compact,
    matches_any,
    resolve_rank,
)
from lightning_compact.optim import DEFAULT_SCALE, CompActAdamW, rebind_lr_scheduler, unsupported_reason
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


def _holds_any(optimizer: Optimizer, param_ids: set[int]) -> bool:
    return any(id(p) in param_ids for group in optimizer.param_groups for p in group["params"])


class CompActCallback(Callback):
    r"""Train an existing LightningModule with CompAct: compressed activations for linear layers.

    At ``setup`` (and again at ``on_fit_start``, for layers made in ``configure_model``)
    the module's ``nn.Linear`` layers are swapped in place for
    :class:`~lightning_compact.layers.CompActLinear`, keeping the same Parameters, so
    optimizers, DDP and ``state_dict`` keys are unaffected. Each training forward then
    saves ``x·P`` (rank ``r``) instead of ``x``.

    **Two modes for the weight gradient.** In the paper's full method (*compressed
    mode*) each converted weight keeps its gradient compressed (``[out, r]`` instead of
    ``[out, in]``, in ``weight.compressed_grad``; ``weight.grad`` stays ``None``) and
    :class:`~lightning_compact.optim.CompActAdamW` keeps Adam's moments in that space,
    so gradients and optimizer states of those weights shrink by r/n as well. When
    ``configure_optimizers`` returns ``torch.optim.Adam`` or ``AdamW`` (alone, in a
    list, or in a dict with an LR scheduler), it is replaced by an equivalent
    ``CompActAdamW`` (same parameter groups and hyperparameters; the schedulers are
    re-pointed to it). With any other optimizer the callback falls back to
    *gradient-decompression mode*: the gradient is decompressed to full size (an
    unbiased estimate) and any optimizer works; activation memory is saved either way.

    In compressed mode:

    * gradient accumulation is exact: micro-batches of one step share ``P`` and their
      ``Ĝ`` are summed, as one batch ``K`` times larger would give;
    * ``gradient_clip_val`` (norm) clips the joint norm of all ``.grad`` and all ``Ĝ``.
      ``‖Ĝ‖`` is used, not the norm of the decompressed ``Ĝ Pᵀ``: since ``E[PPᵀ] = I``,
      ``E‖Ĝ‖² = ‖G‖²``, so a threshold tuned without CompAct keeps its meaning, while
      ``‖Ĝ Pᵀ‖`` carries ~``(n+1)/r`` times more energy from the projection noise. Value
      clipping clamps the entries of ``Ĝ``. Both replace Lightning's own clipping for
      the swapped optimizer, so nothing is clipped twice;
    * under DDP the converted weights are kept out of DDP's buckets and their ``Ĝ`` is
      averaged across ranks right before the optimizer step (after the last accumulated
      micro-batch), which is exact because ``P`` is the same on every rank and cuts
      their traffic by r/n. (With ``compress_optimizer="auto"`` this is set up before
      the optimizer is known; if the fallback is taken, their full gradients are
      averaged the same way.) Layers first created in ``configure_model`` appear only
      after DDP has wrapped the model and stay in gradient-decompression mode;
    * 16-bit mixed precision with a gradient scaler is not supported (the scaler does
      not see ``Ĝ``); ``bf16-mixed``, ``bf16-true``, 32 and 64 bit are.

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
            :data:`~lightning_compact.layers.DEFAULT_EXCLUDED_MODULES` (output heads,
            poolers and attention output projections). A list given here replaces the default.
        projection: ``"gaussian"`` (the paper's) or ``"rademacher"``.
        compress_optimizer: ``"auto"`` (default): compressed mode when the optimizer is
            Adam/AdamW (or already ``CompActAdamW``), else gradient decompression with a
            one-time warning. ``True``: compressed mode or a
            ``MisconfigurationException``. ``False``: always gradient decompression.
        scale: α, the scale of the decompressed update in the swapped-in
            ``CompActAdamW`` (groups that already have a ``scale`` keep it). Default
            :data:`~lightning_compact.optim.DEFAULT_SCALE` = 1.0, which keeps the meaning
            of a learning rate tuned for plain AdamW (the entries of ``N Pᵀ`` have the
            size of an Adam step). The paper uses 0.25 for pretraining (with lr 0.01),
            and 2 (r = 8) or 4 (r = 4) for fine-tuning.
        share_projection: one projection for the layers of one parent module that read
            the same input size (q/k/v, gate/up), and one stored ``x·P`` between them
            instead of one each: less activation memory and fewer projections to build.
            Off by default (the paper draws one projection per layer).

    Raises:
        MisconfigurationException: for a bad argument, an unsupported strategy, a
            target pattern that matches no linear layer, or ``compress_optimizer=True``
            with an optimizer or precision that compressed mode does not support.

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
        compress_optimizer: bool | str = "auto",
        scale: float = DEFAULT_SCALE,
        share_projection: bool = False,
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
        if compress_optimizer not in (True, False, "auto"):
            raise MisconfigurationException(
                f"CompActCallback(compress_optimizer={compress_optimizer!r}): must be True, False or 'auto'"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise MisconfigurationException(f"CompActCallback(scale={scale!r}): must be a positive number (α)")
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.seed = seed
        self.projection = projection
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.exclude_modules = tuple(exclude_modules) if exclude_modules is not None else tuple(DEFAULT_EXCLUDED_MODULES)
        self.compress_optimizer = compress_optimizer
        self.scale = float(scale)
        if not isinstance(share_projection, bool):
            raise MisconfigurationException(f"CompActCallback(share_projection={share_projection!r}): must be True or False")
        self.share_projection = share_projection
        self.report = ConversionReport()
        self._table_printed = False
        # Weights CompAct all-reduces itself under DDP (kept out of DDP's buckets).
        self._self_reduced: list[torch.nn.Parameter] = []
        self._clip_plugin: Any = None

    @property
    def layers(self) -> dict[str, CompActLinear]:
        """The converted layers by fully qualified name."""
        return self.report.converted

    @property
    def compressed_layers(self) -> dict[str, CompActLinear]:
        """The converted layers whose gradients and optimizer states are compressed."""
        return {name: layer for name, layer in self.report.converted.items() if layer.compress_grad}

    def _config(self) -> CompActConfig:
        return CompActConfig(
            rank=self.rank,
            projection=self.projection,
            seed=self.seed,
            exclude_modules=self.exclude_modules,
            share_projection=self.share_projection,
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
        self._self_reduced = []
        if isinstance(trainer.strategy, DDPStrategy) and self.compress_optimizer is not False:
            # DDP wraps the model before configure_optimizers runs, so which weights DDP
            # manages must be settled now, before the optimizer is known.
            weights = [layer.weight for layer in self.report.converted.values()]
            exclude_from_ddp(pl_module, weights)
            self._self_reduced = weights

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
        if self.compress_optimizer is not False and self.report.converted:
            self._enter_compressed_mode(trainer)
        # DDP broadcast rank 0's values of the parameters it manages; ours are done here.
        broadcast_parameters(self._self_reduced)
        if not self._table_printed:
            rank_zero_info(self.format_table(_activation_bytes(trainer)))
            self._table_printed = True
        self._apply_schedule(trainer.global_step)

    def _blocker(self, trainer: pl.Trainer, optimizers: list[Optimizer]) -> str | None:
        """Why compressed mode cannot be used in this run, or ``None``."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return f"precision={trainer.precision!r} uses a gradient scaler, which does not see compressed gradients"
        converted = {id(layer.weight) for layer in self.report.converted.values()}
        for opt in optimizers:
            if _holds_any(opt, converted) and not isinstance(opt, CompActAdamW):
                reason = unsupported_reason(opt)
                if reason is not None:
                    return reason
        return None

    def _enter_compressed_mode(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        reason = self._blocker(trainer, strategy.optimizers)
        if reason is not None:
            if self.compress_optimizer is True:
                raise MisconfigurationException(f"CompActCallback(compress_optimizer=True): {reason}.")
            rank_zero_warn(
                f"CompActCallback: {reason}; using gradient-decompression mode (full-size weight gradients and "
                "optimizer states; activation memory is still saved). Pass compress_optimizer=False to silence this."
            )
            return
        converted = {id(layer.weight) for layer in self.report.converted.values()}
        optimizers = list(strategy.optimizers)
        for i, opt in enumerate(optimizers):
            if isinstance(opt, CompActAdamW) or not _holds_any(opt, converted):
                continue  # already compressed, or nothing to compress: the user's optimizer stays
            new = CompActAdamW.from_optimizer(opt, scale=self.scale)
            for config in strategy.lr_scheduler_configs:
                rebind_lr_scheduler(config.scheduler, opt, new)
            optimizers[i] = new
        strategy.optimizers = optimizers  # the setter rebuilds the LightningOptimizer wrappers
        in_compact_adamw = {
            id(p) for opt in optimizers if isinstance(opt, CompActAdamW) for g in opt.param_groups for p in g["params"]
        }
        under_ddp = isinstance(strategy, DDPStrategy)
        reduced = {id(p) for p in self._self_reduced}
        left_to_ddp = []
        for name, layer in self.report.converted.items():
            if id(layer.weight) not in in_compact_adamw:
                continue
            if under_ddp and id(layer.weight) not in reduced:
                left_to_ddp.append(name)  # already in DDP's buckets: DDP needs its full .grad
                continue
            layer.set_compress_grad(True)
        if left_to_ddp:
            rank_zero_warn(
                f"CompActCallback: {len(left_to_ddp)} layers created after DDP wrapped the model (in configure_model) "
                f"keep full-size gradients: {', '.join(left_to_ddp[:4])}{' ...' if len(left_to_ddp) > 4 else ''}"
            )
        if self.compressed_layers:
            self._install_clipping(trainer)

    def _install_clipping(self, trainer: pl.Trainer) -> None:
        # Lightning clips with torch's clip_grad_norm_ over each parameter's .grad, which
        # would miss Ĝ. Its single entry point, the precision plugin's clip_gradients, is
        # wrapped (on this instance, for this fit) so that for CompActAdamW the joint norm
        # of .grad and Ĝ is clipped once; other optimizers keep Lightning's behaviour.
        # LightningModule.configure_gradient_clipping overrides still go through it.
        plugin = trainer.precision_plugin
        original = plugin.clip_gradients

        def clip_gradients(
            optimizer: Optimizer,
            clip_val: int | float = 0.0,
            gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
        ) -> None:
            if not isinstance(optimizer, CompActAdamW):
                return original(optimizer, clip_val, gradient_clip_algorithm)
            if clip_val <= 0:
                return None
            if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
                optimizer.clip_grad_value_(clip_val)
            else:
                optimizer.clip_grad_norm_(clip_val)
            return None

        plugin.clip_gradients = clip_gradients
        self._clip_plugin = plugin

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # Lightning calls this once per optimizer step, after the last accumulated
        # micro-batch and before clipping: where DDP would have synchronised.
        if self._self_reduced:
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            all_reduce_gradients([p for p in self._self_reduced if id(p) in in_optimizer])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._clip_plugin is not None and "clip_gradients" in vars(self._clip_plugin):
            del self._clip_plugin.clip_gradients
        self._clip_plugin = None

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
        n_compressed = len(self.compressed_layers)
        if n_compressed:
            header += (
                f"\nGradients and Adam moments of {n_compressed} of them kept compressed (CompActAdamW, "
                f"scale={self.scale:g}); the others decompress their gradients to full size."
                if n_compressed < len(self.report.converted)
                else f"\nTheir gradients and Adam moments are kept compressed (CompActAdamW, scale={self.scale:g})."
            )
        elif self.report.converted:
            header += "\nWeight gradients are decompressed to full size (gradient-decompression mode)."
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
