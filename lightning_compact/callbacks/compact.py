"""``CompActCallback``: CompAct for an unmodified LightningModule.

A thin adapter from the Trainer's hooks to :class:`~lightning_compact.controller.CompAct`,
which holds the logic (conversion, seed schedule, optimizer swap, restore) and serves
plain PyTorch and Fabric loops as well.
"""

from __future__ import annotations

import weakref
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
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_compact.controller import CompAct
from lightning_compact.layers import CompActLinear, ConversionReport, resolve_rank
from lightning_compact.optim import DEFAULT_SCALE, DEFAULT_UPDATE_RULE, rebind_lr_scheduler
from lightning_compact.projection import DEFAULT_PROJECTION

__all__ = ["CompActCallback"]

_BYTES_PER_ELEMENT = {"64": 8, "32": 4, "16": 2, "bf16": 2}
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _activation_bytes(trainer: pl.Trainer) -> int:
    """Bytes per stored activation element under the trainer's precision setting."""
    precision = str(trainer.precision)
    return _BYTES_PER_ELEMENT.get(precision.split("-")[0], 2)


def _check_strategy(strategy: Strategy) -> None:
    # Whole tensors on each rank (single device, DDP) or FSDP2's row-sharded DTensors
    # (ModelParallelStrategy). FSDP1 and DeepSpeed hand the layer flat shards.
    # (DeepSpeedStrategy subclasses DDPStrategy, hence the explicit refusal first.)
    if isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)):
        raise MisconfigurationException(
            f"CompActCallback does not support the {type(strategy).__name__} strategy (its flat parameter shards "
            "hide the layers' weights). For sharded training use FSDP2: `strategy=ModelParallelStrategy()` "
            "with `fully_shard` called in `configure_model`; or DDP (`strategy='ddp'`)."
        )
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
        return
    raise MisconfigurationException(
        f"CompActCallback does not support the {type(strategy).__name__} strategy. Use a single device, DDP "
        "(`strategy='ddp'`, 'ddp_spawn', 'ddp_notebook') or FSDP2 (`strategy=ModelParallelStrategy()`)."
    )


class CompActCallback(Callback):
    r"""Train an existing LightningModule with CompAct: compressed activations for linear layers.

    At ``setup`` (and again at ``on_fit_start``, for layers made in ``configure_model``)
    the module's ``nn.Linear`` layers are swapped in place for
    :class:`~lightning_compact.layers.CompActLinear`, keeping the same Parameters, so
    optimizers, DDP and ``state_dict`` keys are unaffected. Each training forward then
    saves ``x·P`` (rank ``r``) instead of ``x``.

    **Two gradient modes.** In the paper's full method (``grad_mode="compressed"``) each
    converted layer owns a ``weight_delta`` Parameter ``δ`` (``[out, r]``, a broadcast
    zero, never in ``state_dict``) whose ordinary ``.grad`` is the compressed gradient
    ``Ĝ``; ``weight.grad`` stays ``None`` and
    :class:`~lightning_compact.optim.CompActAdamW` keeps Adam's moments in that space,
    so gradients and optimizer states of those weights shrink by r/n as well. When
    ``configure_optimizers`` returns ``torch.optim.Adam`` or ``AdamW`` (alone, in a
    list, or in a dict with an LR scheduler), it is replaced by an equivalent
    ``CompActAdamW`` (same parameter groups and hyperparameters, each ``δ`` in its
    weight's group; the schedulers are re-pointed to it). With ``grad_mode="auto"``
    (default) and any other optimizer, each ``Ĝ`` is decompressed to a full-size
    ``weight.grad`` (``Ĝ Pᵀ``, unbiased) right before the optimizer step, with one
    warning; ``grad_mode="decompressed"`` does that in every backward instead, with no
    ``δ`` at all. Activation memory is saved in every mode.

    Because ``Ĝ`` is a ``.grad``, Lightning handles it by its standard means: gradient
    accumulation is exact (micro-batches of one step share ``P``); ``gradient_clip_val``
    clips the joint norm of every ``.grad`` including ``Ĝ`` (``E‖Ĝ‖² = ‖G‖²``, so a
    threshold tuned without CompAct keeps its meaning); ``grad_norm`` counts it; under
    DDP the reducer averages ``Ĝ`` (exact, since ``P`` is the same on every rank, and
    r/n of the traffic), while the converted weights, which get no ``.grad``, are kept
    out of DDP's buckets and broadcast at start-up by the callback. Layers first created
    in ``configure_model`` appear only after DDP has wrapped the model and use
    ``grad_mode="decompressed"``. Under FSDP2 (``ModelParallelStrategy`` with
    ``fully_shard`` in ``configure_model``, which runs after this callback's ``setup``)
    each ``δ`` is sharded by rows with its weight, FSDP2 reduce-scatters ``Ĝ`` (r/n of
    the traffic) and ``CompActAdamW`` updates each rank's rows; FSDP1 and DeepSpeed are
    refused. Every precision is supported: ``16-mixed`` with a gradient scaler unscales each
    ``Ĝ`` like any gradient (it is the ``.grad`` of a parameter the optimizer holds), clipping
    follows the unscale, and a step with an inf/nan gradient is skipped without touching the
    moments (``tests/test_grad_scaler.py``).

    **Lifecycle.** At the end of ``fit`` (and when it fails) every converted layer is
    swapped back to a plain ``nn.Linear`` with the same Parameters: a later loop trains
    the module as if CompAct had never been there. Layers sharded by FSDP2 stay in place
    (FSDP2 holds them) but are deactivated: they act exactly as ``nn.Linear``.

    The projection of every layer changes every ``update_proj_gap`` optimizer steps,
    derived from ``trainer.global_step`` alone: all micro-batches of an accumulated step
    share ``P``, every rank uses the same ``P``, and a resumed run continues with the
    projections the uninterrupted run would have used.

    **Resume.** ``rank`` and ``projection`` must be the checkpoint's (the optimizer's moments
    live in their space; another value raises with the one to use); ``seed``,
    ``update_proj_gap`` and ``scale`` are taken from the checkpoint, with a warning if they
    differ. A switch of gradient mode is converted: a plain checkpoint resumed with the
    callback has its Adam moments compressed with the next step's ``P``, and a compressed
    checkpoint resumed with ``grad_mode="decompressed"`` (or an optimizer without a
    compressed form) has them decompressed (first moment exactly, second approximately,
    with a warning). To finish a compressed run without CompAct, resume it once with
    ``grad_mode="decompressed"``: without the callback no CompAct code runs, and torch's
    Adam fails on the ``[out, r]`` moments (Lightning warns that the checkpoint holds a
    ``CompActCallback`` state).

    Nothing is logged; a table of converted and skipped layers is printed on rank zero.

    Args:
        rank: an ``int`` (absolute rank, ``>= 1``) or a ``float`` in (0, 1) (fraction of
            each layer's ``in_features``, e.g. ``0.25`` for the paper's r = n/4).
        update_proj_gap: optimizer steps between projection resamples (the paper's T).
        seed: base seed of the projections; the same on every rank.
        target_modules: name patterns of the layers to convert (default: all linear
            layers). Each pattern must match at least one linear layer.
        exclude_modules: name patterns left uncompressed, in addition to
            :data:`~lightning_compact.layers.DEFAULT_EXCLUDED_MODULES` (output heads,
            poolers and attention output projections).
        default_exclusions: ``False`` drops those defaults (only ``exclude_modules`` apply).
        projection: ``"gaussian"`` (the paper's), ``"orthogonal"`` (its QR: lower variance at the same
            rank, beyond the paper; see :func:`~lightning_compact.projection.make_projection`) or ``"rademacher"``.
        grad_mode: ``"auto"`` (default): compressed, with Adam/AdamW swapped for
            ``CompActAdamW``, or with each ``Ĝ`` decompressed before the step for other
            optimizers (one warning). ``"compressed"``: compressed or a
            ``MisconfigurationException``. ``"decompressed"``: full-size gradients from
            every backward, any optimizer.
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
        cache_projections: keep each window's ``P`` in memory instead of rebuilding it in
            every forward/backward: ``True``, ``False`` or ``"auto"`` (kept unless it exceeds
            both a quarter of the activation bytes the layer saves and the layer's weight). In ``bf16-mixed`` and
            ``16-mixed`` the cache is kept in the autocast dtype.
        moment_carry: beyond the paper, off by default: at each resample the swapped-in
            ``CompActAdamW`` moves the first moment into the new basis and resets each row
            of the second to its mean (see :class:`~lightning_compact.optim.CompActAdamW`;
            RESULTS §7: better on the mean of 3 seeds, not on every seed). Not with
            ``projection="principal"``.
        principal_rank: with ``projection="principal"`` (beyond the paper, PRAC-style: each
            window's ``P`` holds the top directions of the layer's input plus random ones in
            their complement, see :mod:`lightning_compact.principal`), k, the number of
            principal columns: an int, or a float in (0, 1), a fraction of each layer's rank
            (default 0.5); at most r − 1. The bases are saved in this callback's state, so a
            resumed run continues bit-exactly.
        update_rule: how the swapped-in ``CompActAdamW`` turns its r-space moments into the
            weight update: ``"channel"`` (the default, beyond the paper, APOLLO-style: ``Ĝ Pᵀ``
            with each output channel rescaled to the norm of the Adam direction's row),
            ``"adam"`` (the paper's ``N Pᵀ``) or ``"tensor"`` (one such scale per weight,
            APOLLO-Mini-like); see :class:`~lightning_compact.optim.CompActAdamW`. ``None``:
            the default. Not used with ``grad_mode="decompressed"`` (passing one is an error).

    Raises:
        MisconfigurationException: for a bad argument, an unsupported strategy, a
            target pattern that matches no linear layer, or ``grad_mode="compressed"``
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
        default_exclusions: bool = True,
        projection: str = DEFAULT_PROJECTION,
        grad_mode: str = "auto",
        scale: float = DEFAULT_SCALE,
        share_projection: bool = False,
        cache_projections: bool | str = "auto",
        moment_carry: bool = False,
        principal_rank: int | float = 0.5,
        update_rule: str | None = None,
    ) -> None:
        try:
            resolve_rank(rank, in_features=2)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"CompActCallback(rank={rank!r}): {err}") from err
        if grad_mode not in ("auto", "compressed", "decompressed"):
            raise MisconfigurationException(
                f"CompActCallback(grad_mode={grad_mode!r}): must be 'auto', 'compressed' or 'decompressed'"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(f"CompActCallback(seed={seed!r}): must be an int")
        flags = (("share_projection", share_projection), ("default_exclusions", default_exclusions),
                 ("moment_carry", moment_carry))
        for arg, value in flags:
            if not isinstance(value, bool):
                raise MisconfigurationException(f"CompActCallback({arg}={value!r}): must be True or False")
        if exclude_modules is not None and (
            isinstance(exclude_modules, str) or not all(isinstance(p, str) for p in exclude_modules)
        ):
            raise MisconfigurationException("CompActCallback(exclude_modules=...): must be a list of name patterns")
        try:
            self.compact = CompAct(
                rank,
                update_proj_gap=update_proj_gap,
                seed=seed,
                grad_mode="decompressed" if grad_mode == "decompressed" else "compressed",
                target_modules=target_modules,
                exclude_modules=tuple(exclude_modules or ()),
                default_exclusions=default_exclusions,
                projection=projection,
                scale=scale,
                share_projection=share_projection,
                cache_projections=cache_projections,
                moment_carry=moment_carry,
                principal_rank=principal_rank,
                update_rule=DEFAULT_UPDATE_RULE if update_rule is None else update_rule,
            )
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"CompActCallback: {err}") from err
        if grad_mode == "decompressed" and float(scale) != DEFAULT_SCALE:
            raise MisconfigurationException(
                f"CompActCallback(scale={scale!r}): α scales CompActAdamW's compressed update, which "
                "grad_mode='decompressed' does not use; drop scale or use grad_mode='compressed'/'auto'"
            )
        if grad_mode == "decompressed" and update_rule is not None:
            raise MisconfigurationException(
                f"CompActCallback(update_rule={update_rule!r}): the update rule is CompActAdamW's, which "
                "grad_mode='decompressed' does not use; drop update_rule or use grad_mode='compressed'/'auto'"
            )
        self.grad_mode = grad_mode
        self._report = self.compact.report  # kept after fit, when the controller's is reset
        # Whether this (or the last) fit decompresses Ĝ before each step (an optimizer
        # without a compressed form); kept after fit as part of its record.
        self._decompressed_before_step = False

    # The settings, read from the controller (one place per fact).
    @property
    def rank(self) -> int | float:
        return self.compact.config.rank

    @property
    def seed(self) -> int:
        return self.compact.config.seed

    @property
    def update_proj_gap(self) -> int:
        return self.compact.update_proj_gap

    @property
    def scale(self) -> float:
        return self.compact.scale

    @property
    def report(self) -> ConversionReport:
        """Which layers the current (or last) fit converted and skipped, and why."""
        return self._report

    @property
    def layers(self) -> dict[str, CompActLinear]:
        """The layers the current (or last) fit converted, by fully qualified name.

        After ``fit`` they are no longer in the module (plain ``nn.Linear`` layers with the
        same Parameters took their place), but they still hold each ``weight_delta``.
        """
        return self._report.converted

    @property
    def compressed_layers(self) -> dict[str, CompActLinear]:
        """The converted layers whose gradients and optimizer states were kept compressed."""
        if self._decompressed_before_step:
            return {}
        return {name: layer for name, layer in self.layers.items() if layer.grad_mode == "compressed"}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy)
        # DDP wraps the model before configure_optimizers runs, so which weights DDP
        # manages (the compressed ones get no .grad) is settled now; FSDP2 shards what
        # configure_model (after this hook) hands it, each δ included.
        strategy = trainer.strategy
        self.compact.convert(
            pl_module, ddp=isinstance(strategy, DDPStrategy), fsdp=isinstance(strategy, ModelParallelStrategy)
        )
        self._report = self.compact.report
        self._decompressed_before_step = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Layers made in configure_model exist only now; under DDP they are already in
        # DDP's buckets, which wait for their full-size .grad (and under FSDP2 those already
        # sharded are skipped, with the reason in the table).
        late = "decompressed" if isinstance(trainer.strategy, (DDPStrategy, ModelParallelStrategy)) else None
        self.compact.convert(pl_module, grad_mode=late)
        unmatched = self.compact.unmatched_targets()
        if unmatched:
            names = ", ".join(list(self.report.shapes)[:8])
            raise MisconfigurationException(
                f"CompActCallback(target_modules=...): {unmatched} match no linear layer. "
                f"Linear layers in this model include: {names}"
            )
        if not self.layers:
            rank_zero_warn(
                "CompActCallback converted no layer: the model has no eligible nn.Linear "
                "(see the skip reasons below); training runs uncompressed."
            )
        self._decompressed_before_step = False
        self.compact.note_sharding()
        if self.compact.compressed_layers:
            self._swap_optimizers(trainer)
        if isinstance(trainer.strategy, DDPStrategy):
            self.compact.broadcast_weights()  # DDP broadcast only the parameters it manages
        self.compact.set_projection_dtype(_AUTOCAST_DTYPES.get(str(trainer.precision)))
        decompressed = self._decompressed_before_step or any(
            layer.grad_mode == "decompressed" for layer in self.layers.values())
        if trainer.gradient_clip_val and decompressed:
            # Clipping sees the full-size estimate Ĝ·Pᵀ, whose norm is about √(n/r)·‖G‖: the joint
            # norm grows, and the exact gradients of the layers left alone are shrunk with it.
            rank_zero_warn(
                f"CompActCallback: gradient_clip_val={trainer.gradient_clip_val} clips decompressed gradients "
                "(Ĝ·Pᵀ, about √(n/r) times the exact norm), so it clips harder than without CompAct and shrinks "
                "the exact gradients of the other parameters too. Use grad_mode='compressed' with Adam/AdamW "
                "(clipping then sees Ĝ, whose expected norm is the exact one), or raise the threshold."
            )
        rank_zero_info(self.format_table(_activation_bytes(trainer)))
        self.compact.step(trainer.global_step)
        self._fit_trainer = weakref.ref(trainer)  # load_state_dict gets no trainer (strategies restoring after setup)
        self._fit_optimizer_states(trainer)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the optimizer states from this very dict after on_fit_start (or, for
        # strategies restoring after setup, right after this hook and load_state_dict): they
        # are converted once the swapped optimizers exist and the checkpoint's seed is adopted.
        self._checkpoint = checkpoint
        if self._started_trainer() is not None and self.state_key not in checkpoint.get("callbacks", {}):
            self._fit_optimizer_states(trainer)

    def _started_trainer(self) -> pl.Trainer | None:
        ref = getattr(self, "_fit_trainer", None)
        return ref() if ref is not None else None

    def _fit_optimizer_states(self, trainer: pl.Trainer) -> None:
        """Convert the checkpoint's optimizer states across a switch of gradient mode (CompAct on/off)."""
        checkpoint, self._checkpoint = getattr(self, "_checkpoint", None), None
        if checkpoint is None:
            return
        step = int(checkpoint.get("global_step", 0))
        for optimizer, state in zip(trainer.strategy.optimizers, checkpoint.get("optimizer_states") or ()):
            if isinstance(state, dict) and "state" in state and "param_groups" in state:
                self.compact.convert_optimizer_state(optimizer, state, step)

    def _swap_optimizers(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        reasons = [r for r in map(self.compact.unsupported_reason, strategy.optimizers) if r is not None]
        if reasons:
            if self.grad_mode == "compressed":
                raise MisconfigurationException(f"CompActCallback(grad_mode='compressed'): {reasons[0]}.")
            rank_zero_warn(
                f"CompActCallback: {reasons[0]}; each compressed gradient is decompressed to full size before the "
                "optimizer step (activation memory is still saved; scale is not used). Pass "
                "grad_mode='decompressed' to silence this."
            )
            self._decompressed_before_step = True
            return
        optimizers = list(strategy.optimizers)
        for i, opt in enumerate(optimizers):
            new = self.compact.optimizer(opt)
            if new is not opt:
                for config in strategy.lr_scheduler_configs:
                    rebind_lr_scheduler(config.scheduler, opt, new)
                optimizers[i] = new
        strategy.optimizers = optimizers  # the setter rebuilds the LightningOptimizer wrappers

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.compact.step(trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # After the last accumulated micro-batch (and DDP's reduction), before clipping.
        if self._decompressed_before_step:
            self.compact.decompress_grads_()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: pl.LightningModule) -> None:
        # The module leaves fit as it came: plain nn.Linear layers, same Parameters (and the
        # swapped optimizers hold the weights again, see CompAct.restore).
        self._fit_trainer = None
        self._checkpoint = None
        if self.compact.layers:
            self.compact.restore(pl_module)

    def format_table(self, bytes_per_element: int = 2) -> str:
        """The converted and skipped layers, their ranks and the activation bytes saved per token."""
        return self.compact.format_table(bytes_per_element, decompressed_before_step=self._decompressed_before_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        ranks = {name: layer.rank for name, layer in self.layers.items()}
        return {**self.compact.state_dict(), "rank": self.rank, "projection": self.compact.config.projection,
                "scale": self.scale, "layer_ranks": ranks}

    def _check_saved_settings(self, saved: dict[str, Any]) -> None:
        # The optimizer's compressed moments live in the space of the checkpoint's projection
        # and rank: another one would mix bases silently or fail on shapes, so it is refused.
        projection = self.compact.config.projection
        if saved.get("projection", projection) != projection:
            raise MisconfigurationException(
                f"CompActCallback(projection={projection!r}): the checkpoint was saved with "
                f"projection={saved['projection']!r}, and its optimizer moments live in that projection's space. "
                f"Resume with projection={saved['projection']!r}, or start a new fit from the weights alone "
                "(load the model's state_dict, no ckpt_path)."
            )
        ranks = saved.get("layer_ranks")
        if ranks is not None:
            differ = [(n, r, self.layers[n].rank) for n, r in ranks.items() if n in self.layers and self.layers[n].rank != r]
        else:  # a checkpoint of 0.2: only the configured rank was saved
            differ = [("every layer", saved["rank"], self.rank)] if saved.get("rank", self.rank) != self.rank else []
        if differ:
            name, theirs, mine = differ[0]
            raise MisconfigurationException(
                f"CompActCallback(rank={self.rank!r}): {name} gets rank {mine} where the checkpoint's has {theirs}, "
                f"so its optimizer moments do not fit. Resume with rank={saved.get('rank')!r} as the checkpoint "
                "was saved, or start a new fit from the weights alone (load the model's state_dict, no ckpt_path)."
            )
        scale = saved.get("scale", self.scale)
        if scale != self.scale:
            # Like lr, α is restored with the optimizer's param groups: say so and agree with them.
            rank_zero_warn(
                f"CompActCallback: scale={self.scale} differs from the checkpoint's {scale}; continuing with the "
                "checkpoint's value (the optimizer's param groups restore it, as they restore lr)."
            )
            self.compact.scale = float(scale)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_saved_settings(state_dict)
        # The checkpoint's schedule wins, so the resumed run reuses the same projections.
        for key in ("seed", "update_proj_gap"):
            mine = getattr(self, key)
            saved = state_dict.get(key, mine)
            if saved != mine:
                rank_zero_warn(
                    f"CompActCallback: {key}={mine} differs from the checkpoint's {saved}; "
                    "continuing with the checkpoint's value so the projections match the interrupted run."
                )
                if key == "seed":
                    self.compact.set_seed(saved)
                else:
                    self.compact.set_update_proj_gap(saved)
        self.compact.load_state_dict(state_dict)  # and projection="principal"'s bases
        trainer = self._started_trainer()
        if trainer is not None:  # a strategy that restores after setup: the optimizers exist already
            self._fit_optimizer_states(trainer)

