"""``CompAct``: the Lightning-free driver of a CompAct run.

Everything a training loop needs besides its own forward/backward/step, usable from a
plain PyTorch loop, from ``lightning.fabric`` and (through
:class:`~lightning_compact.callbacks.compact.CompActCallback`, a thin adapter) from the
Trainer::

    compact = CompAct(rank=0.25, grad_mode="compressed")
    model = compact.convert(model)                     # layer swap, same Parameters
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))  # -> CompActAdamW
    for step, batch in enumerate(loader):
        compact.step(step)                             # the seed schedule: P for this step
        loss = model(batch).loss
        loss.backward()
        opt.step(); opt.zero_grad()
    compact.restore(model)                             # plain nn.Linear again

Under DDP, call ``compact.convert(model, ddp=True)`` before wrapping the model and
``compact.broadcast_weights()`` after (DDP no longer broadcasts the compressed weights).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_compact.distributed import broadcast_parameters, decompress, exclude_from_ddp, is_dtensor
from lightning_compact.functional import GRAD_MODES
from lightning_compact.layers import (
    CompActConfig,
    CompActLinear,
    ConversionReport,
    conversion_report,
    convert_to_compact,
    matches_any,
    restore_linear,
)
from lightning_compact.optim import (
    DEFAULT_SCALE,
    DEFAULT_UPDATE_RULE,
    UPDATE_RULES,
    CompActAdamW,
    PENDING_BASIS,
    compress_moments_,
    decompress_moments_,
    put_deltas_in_place_of_weights,
    put_weights_back,
    unsupported_reason,
)
from lightning_compact.projection import DEFAULT_PROJECTION, build_projection, layer_seed, seed_keys, window_for_step

__all__ = ["CompAct"]


class CompAct:
    """Convert a model, drive its projection schedule, swap its optimizer, restore it.

    Args:
        rank: an ``int`` (absolute rank) or a ``float`` in (0, 1) (fraction of each
            layer's ``in_features``, e.g. ``0.25`` for the paper's r = n/4).
        update_proj_gap: optimizer steps between projection resamples (the paper's T).
        seed: base seed of the projections; the same on every rank.
        grad_mode: ``"compressed"`` (the paper's full method: ``Ĝ`` in each layer's
            ``weight_delta.grad``, Adam moments in r-space via :class:`CompActAdamW`) or
            ``"decompressed"`` (full-size ``weight.grad``, any optimizer).
        target_modules: name patterns of the layers to convert (default: all linear layers).
        exclude_modules: name patterns left uncompressed, added to the default exclusions.
        default_exclusions: keep the default exclusions (output heads, poolers, PEFT's
            ``lora_B``; see :data:`~lightning_compact.layers.DEFAULT_EXCLUDED_MODULES`); ``False``
            leaves only ``exclude_modules``. The paper also leaves ``o_proj`` exact:
            ``exclude_modules=["o_proj"]``.
        projection: ``"gaussian"`` (the paper's), ``"orthogonal"`` (its QR: lower variance at the same
            rank, beyond the paper; see :func:`~lightning_compact.projection.make_projection`) or ``"rademacher"``.
        scale: α of the decompressed update in :class:`CompActAdamW`.
        share_projection: one projection (and one stored ``x·P``) for the layers of one
            module that read the same input (q/k/v, gate/up).
        cache_projections: ``True``, ``False`` or ``"auto"``; see :class:`CompActConfig`.
        moment_carry: the :class:`CompActAdamW` made or edited by :meth:`optimizer` carries
            its first moment into each new basis (beyond the paper; off by default).
            Not with ``projection="principal"`` (its past projections cannot be rebuilt).
        principal_rank: with ``projection="principal"``, k principal directions per layer
            (an int, or a fraction of each layer's rank); see :class:`CompActConfig`.
        update_rule: how the :class:`CompActAdamW` made by :meth:`optimizer` turns its r-space
            moments into a weight update: ``"channel"`` (default, beyond the paper: APOLLO-style
            per-channel rescaling of ``Ĝ Pᵀ``), ``"adam"`` (the paper's) or ``"tensor"`` (one
            scale per tensor); see :data:`~lightning_compact.optim.UPDATE_RULES`. Groups that
            already have an ``update_rule`` keep it.
    """

    def __init__(
        self,
        rank: int | float,
        *,
        update_proj_gap: int = 50,
        seed: int = 0,
        grad_mode: str = "compressed",
        target_modules: Sequence[str] | None = None,
        exclude_modules: Sequence[str] = (),
        default_exclusions: bool = True,
        projection: str = DEFAULT_PROJECTION,
        scale: float = DEFAULT_SCALE,
        share_projection: bool = False,
        cache_projections: bool | str = "auto",
        moment_carry: bool = False,
        principal_rank: int | float = 0.5,
        update_rule: str = DEFAULT_UPDATE_RULE,
    ) -> None:
        if update_rule not in UPDATE_RULES:
            raise ValueError(
                f"update_rule={update_rule!r}: must be one of {UPDATE_RULES} ('adam': the paper's update; "
                "'channel'/'tensor': APOLLO-style rescaling of the compressed gradient, beyond the paper)"
            )
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(
                f"update_proj_gap={update_proj_gap!r}: must be a positive int (optimizer steps between "
                "projection resamples; the paper uses 50 for pretraining)"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ValueError(f"scale={scale!r}: must be a positive, finite number (α)")
        if target_modules is not None and (
            isinstance(target_modules, str) or not all(isinstance(p, str) for p in target_modules)
        ):
            raise TypeError("target_modules must be a list of name patterns")
        self.config = CompActConfig(
            rank=rank,
            projection=projection,
            seed=seed,
            grad_mode=grad_mode,
            exclude_modules=tuple(exclude_modules),
            default_exclusions=default_exclusions,
            share_projection=share_projection,
            cache_projections=cache_projections,
            principal_rank=principal_rank,
        )
        self.update_proj_gap = update_proj_gap
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.scale = float(scale)
        self.moment_carry = bool(moment_carry)
        if self.moment_carry and projection == "principal":
            raise ValueError(
                "moment_carry=True moves the moments from the old P to the new one, rebuilt from its seed; "
                "projection='principal' is built from the data and cannot be rebuilt: use moment_carry=False "
                "with it, or another projection"
            )
        # Bases of projection="principal" loaded from a checkpoint, by layer name, until their window starts.
        self._restored_bases: dict[str, dict[str, Any]] = {}
        self.update_rule = update_rule
        self.report = ConversionReport()
        self._window: int | None = None
        # The CompActAdamW handed out by optimizer(): restore() gives each its weights back.
        self._optimizers: weakref.WeakSet[CompActAdamW] = weakref.WeakSet()

    # -- conversion ---------------------------------------------------------------------

    @property
    def layers(self) -> dict[str, CompActLinear]:
        """The converted layers by fully qualified name."""
        return self.report.converted

    @property
    def compressed_layers(self) -> dict[str, CompActLinear]:
        """The converted layers in compressed gradient mode."""
        return {name: layer for name, layer in self.layers.items() if layer.grad_mode == "compressed"}

    def _filter(self) -> Callable[[nn.Module, str], bool] | None:
        targets = self.target_modules
        return None if targets is None else (lambda _m, name: matches_any(name, targets) is not None)

    def convert(
        self, module: nn.Module, *, ddp: bool = False, fsdp: bool = False, grad_mode: str | None = None
    ) -> nn.Module:
        """Swap ``module``'s eligible ``nn.Linear`` layers for :class:`CompActLinear`; returns ``module``.

        Args:
            ddp: the module will be wrapped in ``DistributedDataParallel`` (call this
                before wrapping): in compressed mode each ``weight_delta`` gets real
                storage and the weights are kept out of DDP's buckets (they get no ``.grad``).
            fsdp: the module will be sharded with FSDP2's ``fully_shard`` (call this before
                sharding): in compressed mode each ``weight_delta`` gets real storage, which
                FSDP2 shards by rows like its weight (``[out/world, r]`` per rank).
            grad_mode: override the configured mode for the layers converted by this call
                (e.g. ``"decompressed"`` for layers made after DDP wrapped the model).
        """
        config = self.config
        if grad_mode is not None and grad_mode != config.grad_mode:
            if grad_mode not in GRAD_MODES:
                raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
            config = dataclasses.replace(config, grad_mode=grad_mode)
        before = set(self.layers)
        convert_to_compact(module, config=config, module_filter_fn=self._filter())
        self.report.merge(conversion_report(module))
        new = [layer for name, layer in self.layers.items() if name not in before]
        if (ddp or fsdp) and config.grad_mode == "compressed" and new:
            for layer in new:
                layer.set_grad_mode("compressed", materialize=True)
            if ddp:
                exclude_from_ddp(module, [layer.weight for layer in new])
        if self._window is not None:
            self._set_window(self._window, new, force=True)
        return module

    def unmatched_targets(self) -> list[str]:
        """``target_modules`` patterns that named no linear layer of the converted modules."""
        if self.target_modules is None:
            return []
        return [p for p in self.target_modules if not any(matches_any(n, [p]) for n in self.report.shapes)]

    def broadcast_weights(self, src: int = 0) -> None:
        """Under DDP in compressed mode: copy rank ``src``'s compressed weights to every rank."""
        broadcast_parameters([layer.weight for layer in self.compressed_layers.values()], src=src)

    def restore(self, module: nn.Module) -> nn.Module:
        """Swap every converted layer of ``module`` back to ``nn.Linear`` (same Parameters); returns ``module``.

        Each optimizer made by :meth:`optimizer` gets the restored weights back in place of
        their ``weight_delta`` (same group and position), so it keeps training them; their
        compressed moments are decompressed at their next step (see
        :func:`~lightning_compact.optim.decompress_moments_`: exact first moment, approximate second).
        """
        layers = list(self.compressed_layers.values())
        for optimizer in list(self._optimizers):
            put_weights_back(optimizer, layers)
        self._optimizers = weakref.WeakSet()
        restore_linear(module)
        self.report = ConversionReport()
        self._window = None
        return module

    # -- schedule -----------------------------------------------------------------------

    def window(self, global_step: int) -> int:
        """The resample window of an optimizer step (the one place the schedule lives)."""
        return window_for_step(global_step, self.update_proj_gap)

    def set_seed(self, seed: int) -> None:
        """Change the base seed (e.g. to a checkpoint's); applied at the next :meth:`step`."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"CompAct.set_seed(seed={seed!r}): must be an int")
        self.config = dataclasses.replace(self.config, seed=seed)
        self._window = None

    def set_update_proj_gap(self, update_proj_gap: int) -> None:
        """Change T (e.g. to a checkpoint's); applied at the next :meth:`step`."""
        self.update_proj_gap = update_proj_gap
        self._window = None

    def step(self, global_step: int) -> None:
        """Use the projections of optimizer step ``global_step`` (call before its forward).

        Micro-batches of one step share ``P``; every rank derives the same ``P``; a resumed
        run derives the projections the uninterrupted run used.
        """
        window = self.window(global_step)
        if window != self._window:
            self._set_window(window, self.layers.values(), force=self._window is None)
            self._window = window

    def follow(self, optimizer: Optimizer, start_step: int = 0) -> torch.utils.hooks.RemovableHandle:
        """Drive the projection schedule from ``optimizer``'s steps, for a loop that cannot call :meth:`step`.

        Sets step ``start_step``'s projections now and the next step's after each
        ``optimizer.step()`` (a step post-hook), so a foreign training loop (e.g.
        ``litgpt.pretrain.fit`` under Fabric) runs CompAct without an edit. Pass the optimizer
        that actually steps (the one :meth:`optimizer` returned in compressed mode), and
        ``start_step`` = the number of optimizer steps already taken when resuming. A step
        skipped by a gradient scaler (inf/nan) does not advance the schedule. Returns the
        hook's handle (``.remove()`` to stop).
        """
        count = [int(start_step)]
        self.step(count[0])

        def advance(_optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
            count[0] += 1
            self.step(count[0])

        return optimizer.register_step_post_hook(advance)

    def _set_window(self, window: int, layers: Iterable[CompActLinear], force: bool) -> None:
        # Siblings sharing key and cache tensors (share_projection) are written once.
        keys_done: set[int] = set()
        caches_done: set[int] = set()
        for layer in layers:
            if force:
                layer.base_seed = self.config.seed  # a checkpoint may have restored another one
            layer.window = window
            if id(layer.projection_keys) not in keys_done:
                layer.write_projection_keys()
                keys_done.add(id(layer.projection_keys))
            cache = layer.projection_cache
            if cache is not None and id(cache) not in caches_done:
                layer.refresh_projection_cache()
                caches_done.add(id(cache))
            if self._restored_bases:
                self._restore_basis(layer, window)

    def _restore_basis(self, layer: CompActLinear, window: int) -> None:
        # A checkpoint taken inside a window holds the P the interrupted run built from data
        # that the resumed run will not see again: put it back, or the run would diverge.
        saved = self._restored_bases.pop(layer.layer_name, None)
        if saved is None or int(saved["window"]) != window or layer.projection != "principal":
            return  # another window: this one's P is built from its first micro-batch, as before
        basis, cache = saved["basis"], layer.projection_cache
        if tuple(basis.shape) != tuple(cache.shape):
            raise ValueError(
                f"{layer.layer_name}: the checkpoint's principal basis has shape {tuple(basis.shape)} where this run "
                f"needs {tuple(cache.shape)}; resume with the same rank"
            )
        cache.copy_(basis)
        layer.basis_window, layer.basis_pending = window, bool(saved["pending"])

    def set_projection_dtype(self, dtype: torch.dtype | None) -> None:
        """Keep cached projections in ``dtype`` (e.g. the autocast dtype, so no cast per forward)."""
        leaders: dict[int, torch.Tensor] = {}
        for layer in self.layers.values():
            layer.cache_dtype = dtype
            cache = layer.projection_cache
            if cache is None or dtype is None or cache.dtype == dtype:
                continue
            if id(cache) not in leaders:
                layer.refresh_projection_cache(dtype)
                leaders[id(cache)] = layer.projection_cache
            else:
                layer.projection_cache = leaders[id(cache)]

    def note_sharding(self) -> None:
        """Record how many ranks share each converted weight (FSDP2's ``fully_shard``; call it after sharding).

        ``cache_projections="auto"`` then weighs a layer's cache against the rows of the
        weight a rank holds, not the whole weight: every rank holds the whole ``P``.
        """
        for layer in self.layers.values():
            weight = layer.weight
            shards = 1
            if is_dtensor(weight):  # the mesh dimensions it is sharded over (not those it is replicated over)
                for dim, placement in enumerate(weight.placements):
                    shards *= weight.device_mesh.size(dim) if placement.is_shard() else 1
            layer.weight_shards = shards

    @property
    def projection_cache_bytes(self) -> int:
        """Bytes held by the projection caches (each shared cache counted once)."""
        seen: dict[int, int] = {}
        for layer in self.layers.values():
            if layer.projection_cache is not None:
                seen[id(layer.projection_cache)] = layer.projection_cache_bytes
        return sum(seen.values())

    # -- optimizer ----------------------------------------------------------------------

    def holds_converted(self, optimizer: Optimizer) -> bool:
        """Whether ``optimizer`` holds a converted layer's weight or ``weight_delta``."""
        ids = {id(layer.weight) for layer in self.layers.values()}
        ids |= {id(layer.weight_delta) for layer in self.compressed_layers.values()}
        return any(id(p) in ids for group in optimizer.param_groups for p in group["params"])

    def unsupported_reason(self, optimizer: Optimizer) -> str | None:
        """Why ``optimizer`` cannot train the compressed layers (``None``: it can, or it holds none of them)."""
        if isinstance(optimizer, CompActAdamW) or not self.holds_converted(optimizer):
            return None
        return unsupported_reason(optimizer)

    def optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer to train with: ``optimizer`` itself, or an equivalent :class:`CompActAdamW`.

        In compressed mode a ``torch.optim.Adam``/``AdamW`` holding converted weights is
        replaced (same groups and hyperparameters, each ``weight_delta`` in its weight's
        place); a ``CompActAdamW`` has its groups edited likewise. Other optimizers raise.
        Under FSDP2 call it after ``fully_shard`` (which makes new Parameter objects).

        Raises:
            ValueError: compressed mode with an optimizer that has no compressed form.
        """
        self.note_sharding()
        if not self.compressed_layers or not self.holds_converted(optimizer):
            return optimizer
        for layer in self.compressed_layers.values():
            layer.link_delta()  # fully_shard made new δ Parameters: mark them for CompActAdamW
        reason = self.unsupported_reason(optimizer)
        if reason is not None:
            raise ValueError(f"{reason}; use Adam/AdamW, or grad_mode='decompressed'")
        if isinstance(optimizer, CompActAdamW):
            put_deltas_in_place_of_weights(optimizer.param_groups, self.compressed_layers.values())
            optimizer.moment_carry = optimizer.moment_carry or self.moment_carry
        else:
            optimizer = CompActAdamW.from_optimizer(
                optimizer, scale=self.scale, layers=self.compressed_layers.values(), moment_carry=self.moment_carry,
                update_rule=self.update_rule,
            )
        self._optimizers.add(optimizer)
        return optimizer

    def projection_at(self, layer: CompActLinear, window: int) -> torch.Tensor:
        """``layer``'s ``P`` (``[in, rank]``, float32) in resample window ``window`` of this run's seed.

        A data-dependent projection (``"principal"``) cannot be rebuilt for another window:
        its current ``P`` is returned.
        """
        if layer.projection == "principal":
            return layer.projection_matrix(dtype=torch.float32)
        keys = torch.tensor(seed_keys(layer_seed(self.config.seed, layer.seed_name, window)), dtype=torch.int32)
        return build_projection(layer.in_features, layer.rank, keys.to(layer.weight.device), projection=layer.projection)

    def convert_optimizer_state(self, optimizer: Optimizer, state_dict: dict[str, Any], global_step: int) -> int:
        """Make a checkpoint's optimizer state (``optimizer.state_dict()`` format, edited in place) fit ``optimizer``.

        For a switch between CompAct's compressed mode and full-size gradients (plain
        training, ``grad_mode="decompressed"``, another optimizer): where ``optimizer`` holds
        a ``weight_delta`` and the checkpoint full-size moments, they are compressed with the
        ``P`` of step ``global_step``; where it holds a converted layer's weight and the
        checkpoint ``[out, rank]`` moments, they are decompressed with the ``P`` of the
        checkpoint's last step (:func:`~lightning_compact.optim.compress_moments_`,
        :func:`~lightning_compact.optim.decompress_moments_`: exact first moment, approximate
        second, with a warning). Parameters are matched by position, as torch's
        ``load_state_dict`` does. Returns how many states were converted.
        """
        by_weight = {id(layer.weight): layer for layer in self.layers.values()}
        saved = [i for group in state_dict["param_groups"] for i in group["params"]]
        current = [p for group in optimizer.param_groups for p in group["params"]]
        converted = 0
        deltas = {id(layer.weight_delta): layer for layer in self.compressed_layers.values()}
        for index, p in zip(saved, current):
            state = state_dict["state"].get(index)
            moments = state.get("exp_avg") if state else None
            if moments is None:
                continue
            delta_of, layer = deltas.get(id(p)), by_weight.get(id(p))
            if PENDING_BASIS in state:  # saved after a restore: still compressed, with the P they are in
                if delta_of is not None and moments.shape == p.shape:
                    del state[PENDING_BASIS]
                elif delta_of is None:
                    decompress_moments_(state, p)
                    converted += 1
                continue
            if moments.shape == p.shape:
                continue
            if delta_of is not None and moments.numel() == delta_of.weight.numel():
                proj = self.projection_at(delta_of, self.window(global_step)).to(moments.device)
                compress_moments_(state, p, proj)
            elif layer is not None and tuple(moments.shape) == (layer.out_features, layer.rank):
                proj = self.projection_at(layer, self.window(max(global_step - 1, 0))).to(moments.device)
                decompress_moments_(state, p, proj)
            else:
                continue
            converted += 1
        return converted

    @torch.no_grad()
    def decompress_grads_(self) -> None:
        """Turn each compressed gradient into a full-size ``weight.grad`` (``Ĝ Pᵀ``, added), and free ``Ĝ``.

        For optimizers without a compressed form in a run whose layers are compressed
        (e.g. under DDP, where the mode is fixed before the optimizer is known): call it
        after the backward (after the reduction) and before ``optimizer.step()``. The
        ``weight_delta`` then has no ``.grad``, so the optimizer skips it.
        """
        for layer in self.compressed_layers.values():
            delta = layer.weight_delta
            if delta.grad is None:
                continue
            full = decompress(delta.grad, layer.projection_matrix(dtype=delta.grad.dtype), like=layer.linear_weight())
            if layer.transposed:
                full = full.t()
            w = layer.weight
            w.grad = full if w.grad is None else w.grad.add_(full)
            delta.grad = None

    # -- reporting and state ------------------------------------------------------------

    def format_table(self, bytes_per_element: int = 2, *, decompressed_before_step: bool = False) -> str:
        """The converted and skipped layers, their ranks and the activation bytes saved per token.

        The gradient line says what is true of this run: moments kept compressed only once
        :meth:`optimizer` has made a :class:`CompActAdamW`; ``decompressed_before_step``: the
        loop calls :meth:`decompress_grads_` before a foreign optimizer's step.
        """
        rows = [("layer", "in -> out", "rank", "saved/token")]
        saved_total = 0
        for name, layer in self.layers.items():
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
            f"CompAct: {len(self.layers)} linear layers compressed, {len(self.report.skipped)} left as they are "
            f"(projection={self.config.projection}, resampled every {self.update_proj_gap} steps)"
        )
        n_compressed = len(self.compressed_layers)
        some = f"{n_compressed} of them" if n_compressed < len(self.layers) else "them"
        rest = "; the others decompress their gradients to full size" if n_compressed < len(self.layers) else ""
        if n_compressed and decompressed_before_step:
            header += (
                f"\nCompressed gradients of {some} are decompressed to full size before each optimizer step "
                f"(the optimizer has no compressed form, so its moments are full size){rest}."
            )
        elif n_compressed and len(self._optimizers):
            header += f"\nGradients and Adam moments of {some} kept compressed (CompActAdamW, scale={self.scale:g}){rest}."
        elif n_compressed:
            header += (
                f"\nGradients of {some} are compressed (in weight_delta.grad){rest}; no CompActAdamW has been made "
                "for them yet: train with `compact.optimizer(torch.optim.AdamW(...))`, or call "
                "`compact.decompress_grads_()` before another optimizer's step."
            )
        elif self.layers:
            header += "\nWeight gradients are decompressed to full size (grad_mode='decompressed')."
        footer = (
            f"Up to {saved_total} B per token fewer saved for the backward pass "
            f"({bytes_per_element} B per element; layers sharing one input, like q/k/v, save less together)."
        )
        deltas = [layer.weight_delta for layer in self.layers.values() if layer.weight_delta is not None]
        if deltas:
            # Lightning's model summary counts them as parameters: say what they are.
            count = sum(d.numel() for d in deltas)
            footer += (
                f"\nweight_delta: {count / 1e6:.2f} M parameters the model summary counts as trainable beside the "
                "model's own: each compressed layer's [out, r] carrier of Ĝ and of its r-space moments, always zero "
                "in the forward, dropped by restore."
            )
        return "\n".join([header, *lines, footer])

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to rebuild the same projections."""
        state: dict[str, Any] = {"seed": self.config.seed, "update_proj_gap": self.update_proj_gap}
        bases = {
            name: {"window": layer.basis_window, "pending": layer.basis_pending,
                   "basis": layer.projection_cache.detach().to("cpu", copy=True)}
            for name, layer in self.layers.items()
            if layer.projection == "principal" and layer.projection_cache is not None and layer.basis_window is not None
        }
        if bases:
            # projection="principal": P is built from data, so it is state (tensors and ints:
            # loads with weights_only; the model's state_dict keys stay unchanged).
            state["principal_bases"] = bases
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: its seed and T, and the principal bases of the window it was saved in.

        The bases are applied at the next :meth:`step` (or :meth:`convert` of a layer made later)
        whose window is the one they were built in; the same step then continues bit-exactly.
        """
        if "seed" in state and state["seed"] != self.config.seed:
            self.set_seed(int(state["seed"]))
        if "update_proj_gap" in state and state["update_proj_gap"] != self.update_proj_gap:
            self.set_update_proj_gap(int(state["update_proj_gap"]))
        self._restored_bases = dict(state.get("principal_bases", {}))
        self._window = None  # re-derive every layer's window (and apply the bases) at the next step

