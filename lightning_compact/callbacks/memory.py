"""``PeakMemoryMonitor``: peak GPU memory, saved-activation bytes and a per-category breakdown on any device, per epoch and every N steps."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_compact.memory.breakdown import CATEGORIES
from lightning_compact.memory.saved_activations import SavedActivationTracker
from lightning_compact.memory.tracker import MemTrackerUnavailable, StepMemoryTracker, require_mem_tracker

__all__ = ["PeakMemoryMonitor"]

_MIB = 2**20
_BREAKDOWN_KEYS = [f"memory/breakdown/{name}_MiB" for name in (*CATEGORIES, "total")]


class PeakMemoryMonitor(Callback):
    r"""Record the peak memory of training, per epoch and every ``log_every_n_steps`` optimizer steps.

    Two measurements, and optionally a third:

    * On CUDA, ``torch.cuda.max_memory_allocated`` over the epoch (the peak statistics
      are reset when each training epoch starts). Not logged on other devices.
    * On every device, the bytes that one training step keeps alive for its backward
      pass, de-duplicated by storage (q, k and v share one input tensor and count once;
      parameters, and the low-precision weight copies mixed precision saves, are not
      counted: they scale with the model, not the batch). The epoch's value is the largest over its steps.
      When CompAct layers are present it also reports what the same step would have
      saved had they been plain ``nn.Linear`` layers.
    * With ``breakdown=True``, on every device, the peak of one steady-state training
      step split by category (see :class:`~lightning_compact.memory.MemoryBreakdown`),
      from :class:`~lightning_compact.memory.StepMemoryTracker`. The step measured is
      the first of the epoch that runs once the optimizer has state and that ends an
      accumulation window (so it includes the optimizer step); in the first epoch that
      is the second optimizer step.

    Values are the maximum over ranks under DDP. They are logged through
    ``trainer.loggers`` at ``trainer.global_step``, at the end of each training epoch and
    every ``log_every_n_steps`` optimizer steps within it; each value is the peak since
    the epoch started (a running maximum), so a streamed run with ``max_steps`` (one
    epoch) shows its memory before it ends or runs out of memory. Logged keys (MiB):

    * ``memory/cuda_max_allocated_MiB``: only when training on CUDA.
    * ``memory/saved_activations_MiB``: saved-for-backward bytes of the largest step.
    * ``memory/saved_activations_uncompressed_MiB``: the same step without CompAct;
      only when at least one CompAct layer ran.
    * ``memory/breakdown/parameters_MiB``, ``memory/breakdown/gradients_MiB`` (including
      CompAct's compressed gradients), ``memory/breakdown/optimizer_states_MiB``,
      ``memory/breakdown/activations_MiB`` (forward tensors alive at the peak),
      ``memory/breakdown/temporaries_MiB`` (backward tensors other than gradients),
      ``memory/breakdown/other_MiB`` (buffers, the batch) and
      ``memory/breakdown/total_MiB`` (their sum: the step's peak): only with
      ``breakdown=True`` and once such a step ran in the epoch. The categories are
      taken at the moment of the total peak; under DDP each is the maximum over ranks.

    A summary table is printed on rank zero at the end of ``fit``, also with
    ``logger=False``; :attr:`history` holds the per-epoch figures (MiB, with ``epoch``).

    Args:
        track_saved_activations: set ``False`` to skip the saved-tensor hooks (they add
            a little Python work per saved tensor).
        breakdown: measure one step per epoch by category. That step runs under a
            ``TorchDispatchMode`` that sees every operation, so it is several times slower.
        log_every_n_steps: also log every this many optimizer steps (``trainer.global_step``);
            ``None`` follows the Trainer's ``log_every_n_steps``, ``0`` logs per epoch only.

    Raises:
        MisconfigurationException: ``breakdown=True`` on a torch without the
            ``MemTracker`` API it needs.
        ValueError: a negative ``log_every_n_steps``, or a flag that is not ``True``/``False``.
    """

    def __init__(self, track_saved_activations: bool = True, breakdown: bool = False, log_every_n_steps: int | None = None) -> None:
        valid = isinstance(log_every_n_steps, int) and not isinstance(log_every_n_steps, bool) and log_every_n_steps >= 0
        if log_every_n_steps is not None and not valid:
            raise ValueError(
                f"PeakMemoryMonitor(log_every_n_steps={log_every_n_steps!r}): expected an int >= 0 "
                "(0: per epoch only) or None (the Trainer's log_every_n_steps)"
            )
        for name, flag in (("track_saved_activations", track_saved_activations), ("breakdown", breakdown)):
            if not isinstance(flag, bool):  # "no" is truthy: it would silently turn tracking on
                raise ValueError(f"PeakMemoryMonitor({name}={flag!r}): expected True or False")
        self.track_saved_activations = track_saved_activations
        self.breakdown = breakdown
        self.log_every_n_steps = log_every_n_steps
        self._last_logged_step = -1
        self._step_tracker: StepMemoryTracker | None = None
        self._epoch_breakdown: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._tracker: SavedActivationTracker | None = None
        self._epoch_saved = 0
        self._epoch_uncompressed = 0
        self._epoch_compressed_layers = 0

    @staticmethod
    def _on_cuda(trainer: pl.Trainer) -> bool:
        return trainer.strategy.root_device.type == "cuda"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.breakdown:
            try:
                require_mem_tracker()
            except MemTrackerUnavailable as err:
                raise MisconfigurationException(f"PeakMemoryMonitor(breakdown=True): {err}") from err

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_saved = self._epoch_uncompressed = self._epoch_compressed_layers = 0
        self._epoch_breakdown = {}
        if self._on_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.track_saved_activations:
            self._tracker = SavedActivationTracker(exclude=[pl_module]).__enter__()
        if self.breakdown and not self._epoch_breakdown and self._steady_state_step(trainer, batch_idx):
            self._step_tracker = StepMemoryTracker(
                modules=[pl_module], optimizers=trainer.optimizers, tensors=_tensors_in(batch), closure_steps=True
            ).__enter__()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Lightning runs the forward and backward inside optimizer.step(closure): only what
        # is made from here on belongs to the optimizer.
        if self._step_tracker is not None:
            self._step_tracker.optimizer_update_begins()

    @staticmethod
    def _steady_state_step(trainer: pl.Trainer, batch_idx: int) -> bool:
        ends_window = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        return ends_window and any(opt.state for opt in trainer.optimizers)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._close_step_tracker()
        self._close_tracker()
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        step = trainer.global_step
        # global_step moves only on optimizer steps: with accumulation, log once per window.
        # `trainer.loggers` is the same on every rank, so all ranks join the reduce or none.
        if every and trainer.loggers and step > 0 and step % every == 0 and step != self._last_logged_step:
            values = self._reduced(trainer, self._epoch_values(trainer))
            if values:
                self._log(trainer, values)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_step_tracker()
        self._close_tracker()

    def _close_step_tracker(self) -> None:
        # Entered after the saved-activation tracker, so closed before it.
        if self._step_tracker is None:
            return
        self._step_tracker.__exit__(None, None, None)
        peak = self._step_tracker.result().peak
        self._step_tracker = None
        self._epoch_breakdown = {key: value / _MIB for key, value in zip(_BREAKDOWN_KEYS, peak.as_dict().values())}

    def _close_tracker(self) -> None:
        if self._tracker is None:
            return
        self._tracker.__exit__(None, None, None)
        step = self._tracker.result()
        self._tracker = None
        if step.bytes >= self._epoch_saved:
            self._epoch_saved = step.bytes
            self._epoch_uncompressed = step.uncompressed_bytes
            self._epoch_compressed_layers = step.compressed_layers

    def _epoch_values(self, trainer: pl.Trainer) -> dict[str, float]:
        """This rank's peaks (MiB) since the epoch started."""
        values = {}
        if self._on_cuda(trainer):
            values["memory/cuda_max_allocated_MiB"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / _MIB
        if self._epoch_saved > 0:  # no step ran (or tracking is off): nothing measured, nothing logged
            values["memory/saved_activations_MiB"] = self._epoch_saved / _MIB
            if self._epoch_compressed_layers:
                values["memory/saved_activations_uncompressed_MiB"] = self._epoch_uncompressed / _MIB
        values.update(self._epoch_breakdown)
        return values

    @staticmethod
    def _reduced(trainer: pl.Trainer, values: dict[str, float]) -> dict[str, float]:
        # Every rank calls the hooks that call this, so the collective lines up across ranks.
        if trainer.world_size > 1 and values:
            reduced = trainer.strategy.reduce(
                torch.tensor(list(values.values()), dtype=torch.float64, device=trainer.strategy.root_device),
                reduce_op="max",
            )
            values = dict(zip(values, reduced.tolist()))
        return values

    def _log(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        self._last_logged_step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = self._reduced(trainer, self._epoch_values(trainer))
        if not values:
            return
        self.history.append({"epoch": trainer.current_epoch, **values})
        if trainer.global_step != self._last_logged_step:  # else the step log just sent these values
            self._log(trainer, values)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history:
            rank_zero_info(self.summary())

    def summary(self) -> str:
        """A table of :attr:`history`, one row per epoch."""
        columns = [
            ("memory/cuda_max_allocated_MiB", "CUDA peak"),
            ("memory/saved_activations_MiB", "saved for backward"),
            ("memory/saved_activations_uncompressed_MiB", "without CompAct"),
            ("memory/breakdown/total_MiB", "step peak (breakdown)"),
        ]
        present = [(k, title) for k, title in columns if any(k in row for row in self.history)]
        rows = [["epoch", *(title for _, title in present)]]
        if any("memory/saved_activations_uncompressed_MiB" in row for row in self.history):
            rows[0].append("CompAct saves")
        for row in self.history:
            cells = [str(int(row["epoch"]))]
            cells += [f"{row[k]:.1f} MiB" if k in row else "-" for k, _ in present]
            if len(rows[0]) > len(present) + 1:
                base = row.get("memory/saved_activations_uncompressed_MiB")
                saved = row.get("memory/saved_activations_MiB")
                cells.append(f"{100 * (1 - saved / base):.1f}%" if base else "-")
            rows.append(cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        text = "Peak memory per training epoch\n" + "\n".join(lines)
        last = next((row for row in reversed(self.history) if _BREAKDOWN_KEYS[-1] in row), None)
        if last is not None:
            parts = ", ".join(f"{title} {last[key]:.1f}" for key, title in zip(_BREAKDOWN_KEYS, CATEGORIES.values()))
            text += f"\nStep peak by category, epoch {int(last['epoch'])} (MiB): {parts}"
        return text

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]


def _tensors_in(batch: Any) -> list[torch.Tensor]:
    """The tensors of a batch (nested lists, tuples and dicts), counted as ``other``."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        return [t for item in batch for t in _tensors_in(item)]
    return []
