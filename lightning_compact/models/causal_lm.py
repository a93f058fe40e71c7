"""``CausalLMModule``: next-token pretraining of a LLaMA preset or a ``transformers`` causal LM."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import Perplexity

from lightning_compact.distributed import is_dtensor
from lightning_compact.meta_init import has_meta_tensors, load_full_state_dict, materialize_
from lightning_compact.models.hf import build_hf_model
from lightning_compact.models.llama import LLAMA_PRESETS, LlamaConfig, LlamaForCausalLM
from lightning_compact.models.schedule import Decay, adamw_with_schedule

__all__ = ["CausalLMModule", "build_llama", "decoder_layers"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a causal LM: this project's LLaMA, ``transformers``' LLaMA family or GPT-2."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        found: Any = model
        for attr in path.split("."):
            found = getattr(found, attr, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(f"Cannot find the decoder layers of {type(model).__name__} (looked for model.layers, transformer.h, gpt_neox.layers, model.decoder.layers)")


def build_llama(preset: str, overrides: dict[str, Any] | None = None) -> LlamaForCausalLM:
    """A :class:`LlamaForCausalLM` from a preset name and field overrides.

    Raises:
        ValueError: unknown preset or field.
    """
    if preset not in LLAMA_PRESETS:
        raise ValueError(f"Unknown LLaMA preset {preset!r}; choose one of {', '.join(LLAMA_PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"config_overrides has unknown LlamaConfig fields {unknown}; known: {', '.join(sorted(fields))}")
    return LlamaForCausalLM(dataclasses.replace(LLAMA_PRESETS[preset], **(overrides or {})))


class CausalLMModule(pl.LightningModule):
    """Causal-LM pretraining with AdamW, linear warmup and cosine decay to ``min_lr_ratio``.

    Batches are dicts with ``input_ids`` of shape ``[batch, seq_len]``
    (:class:`~lightning_compact.data.PretrainDataModule`); every position predicts the next.

    Logged keys: ``train/loss`` (each step), ``val/loss`` and ``val/ppl`` (per validation
    run; perplexity from ``torchmetrics``), the same under ``test/`` for ``test``.

    Args:
        model: a LLaMA preset (``llama_60m``, ``llama_130m``, ``llama_350m``, ``llama_1b``),
            or a ``transformers`` causal LM (``hf`` extra): hub name, local directory, or
            with ``pretrained=False`` a model type such as ``llama``.
        config_overrides: config fields to change, e.g. ``{vocab_size: 256, hidden_size: 128}``
            for a tiny model; the vocabulary must cover the tokenizer's.
        pretrained: for a ``transformers`` name: load its weights (ignored for presets).
        lr: peak learning rate (the paper: 0.01; 1B: 0.003).
        weight_decay: AdamW weight decay on matrices.
        betas: AdamW betas.
        warmup_ratio: share of the run spent in linear warmup (the paper: 0.1).
        min_lr_ratio: final learning rate as a fraction of ``lr`` (the paper: 0.1).
        decay: ``cosine`` (the paper), ``linear`` or ``constant`` after warmup.
        empty_init: build the model on the ``meta`` device (no memory) and allocate it in
            :meth:`configure_model`, after ``fully_shard`` under ``ModelParallelStrategy``:
            each rank then holds only its shard, never the whole model. Weights are drawn
            by name (:func:`~lightning_compact.meta_init.keyed_normal_`), equal for any
            number of ranks to a single process's with the same ``init_seed``.
        init_seed: the seed of that initialization (``None``: ``torch.initial_seed()``,
            which ``seed_everything`` sets alike on every rank).
        init_checkpoint: a full (unsharded) state dict to start from: a ``torch.save``
            file, a ``.safetensors`` file or a folder of them (a Hugging Face model
            folder). Loaded in :meth:`configure_model`; when sharded, only rank 0 reads it
            (:func:`~lightning_compact.meta_init.load_full_state_dict`). With
            ``empty_init`` and ``pretrained``, a ``transformers`` model's own weights are
            loaded this way.
    """

    def __init__(
        self,
        model: str = "llama_60m",
        config_overrides: dict[str, Any] | None = None,
        pretrained: bool = False,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.1,
        decay: Decay = "cosine",
        empty_init: bool = False,
        init_seed: int | None = None,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.native = model in LLAMA_PRESETS
        self.init_seed = torch.initial_seed() if init_seed is None else init_seed
        self.init_checkpoint = init_checkpoint
        if self.native:
            with torch.device("meta") if empty_init else contextlib.nullcontext():
                self.model = build_llama(model, config_overrides)
        else:
            self.model = build_hf_model("causal-lm", model, pretrained=pretrained, config_overrides=config_overrides,
                                        empty_init=empty_init)
            if empty_init and pretrained and init_checkpoint is None:
                from lightning_compact.models.hf import hf_checkpoint_dir

                self.init_checkpoint = hf_checkpoint_dir(model)
        self._checkpoint_loaded = False
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.vocab_size:
            raise ValueError(
                f"The tokenizer has {data_vocab} tokens but the model only {self.vocab_size}: "
                f"set `model.config_overrides.vocab_size: {data_vocab}` (or more)."
            )

    def on_fit_start(self) -> None:
        # A validate()/test() before fit leaves metric states created under inference
        # mode, which fit's (no_grad) validation cannot update in place: recreate them here.
        self.val_ppl.reset()
        self.test_ppl.reset()

    def configure_model(self) -> None:
        """Shard with FSDP2 under ``ModelParallelStrategy``, then allocate and load what is still to be.

        Sharding: each decoder layer, then the rest. This runs after
        :class:`~lightning_compact.CompActCallback`'s ``setup``, so the converted layers (and
        their ``weight_delta``) are sharded with their block. A model built on ``meta``
        (``empty_init``) is then materialized, each rank allocating only its shard, and
        ``init_checkpoint`` is loaded once.
        """
        if self.device_mesh is not None and not any(is_dtensor(p) for p in self.parameters()):
            # (configure_model runs for each trainer call: shard once)
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in decoder_layers(self.model):
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        if has_meta_tensors(self.model):
            materialize_(self.model, self.trainer.strategy.root_device, self._initialize)
        if self.init_checkpoint is not None and not self._checkpoint_loaded:
            load_full_state_dict(self.model, self.init_checkpoint)
            self._checkpoint_loaded = True

    def _initialize(self, model: nn.Module) -> None:
        if self.native:
            model.reset_parameters(seed=self.init_seed)
        else:
            from lightning_compact.models.hf import init_hf_weights_

            init_hf_weights_(model, self.init_seed)

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids) if self.native else self.model(input_ids=input_ids).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = batch["input_ids"]
        if self.native:
            loss = self.model(input_ids, labels=input_ids)
        else:
            loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str, ppl: Perplexity) -> torch.Tensor:
        input_ids = batch["input_ids"]
        logits = self._logits(input_ids)[:, :-1].float()
        targets = input_ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        ppl.update(logits, targets)
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True, batch_size=input_ids.size(0))
        self.log(f"{prefix}/ppl", ppl, prog_bar=True, batch_size=input_ids.size(0))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val", self.val_ppl)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test", self.test_ppl)

    def on_validation_end(self) -> None:
        # One line per validation run, so the trend stays on screen above the progress bar.
        if self._trainer is None or self.trainer.sanity_checking:
            return
        metrics = self.trainer.callback_metrics
        if "val/loss" in metrics:
            self.print(
                f"step {self.trainer.global_step}: val/loss {float(metrics['val/loss']):.4f}  "
                f"val/ppl {float(metrics['val/ppl']):.2f}"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        # Plain AdamW so CompActCallback can swap in CompActAdamW; the paper's α
        # (pretraining 0.25) is the callback's `scale` (`--compact.scale`).
        h = self.hparams
        return adamw_with_schedule(
            self, self.model, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas),
            warmup_ratio=h.warmup_ratio, min_lr_ratio=h.min_lr_ratio, decay=h.decay,
        )
