"""``SequenceClassificationModule``: fine-tune a ``transformers`` classifier, with GLUE's metrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lightning_compact.data.glue import glue_task
from lightning_compact.models.hf import build_hf_model
from lightning_compact.models.schedule import Decay, adamw_with_schedule

__all__ = ["SequenceClassificationModule", "task_metrics"]


def _metric(name: str, num_labels: int) -> Metric:
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    if num_labels == 2:
        return {"acc": Accuracy(task="binary"), "f1": F1Score(task="binary"), "mcc": MatthewsCorrCoef(task="binary")}[name]
    kwargs = {"task": "multiclass", "num_classes": num_labels}
    return {
        "acc": Accuracy(**kwargs),
        "f1": F1Score(average="macro", **kwargs),
        "mcc": MatthewsCorrCoef(**kwargs),
    }[name]


def task_metrics(task: str | None, num_labels: int) -> MetricCollection:
    """The standard metrics of a GLUE task, or accuracy and F1 (macro above two classes).

    CoLA: Matthews correlation; STS-B: Pearson and Spearman; MRPC and QQP: F1 and
    accuracy; the rest: accuracy. Keys: ``mcc``, ``pearson``, ``spearman``, ``f1``, ``acc``.
    """
    names = glue_task(task).metrics if task is not None else ("acc", "f1")
    return MetricCollection({name: _metric(name, num_labels) for name in names})


class SequenceClassificationModule(pl.LightningModule):
    """Fine-tune a ``transformers`` sequence classifier (the ``hf`` extra).

    Batches come from :class:`~lightning_compact.data.ClassificationDataModule` or
    :class:`~lightning_compact.data.GlueDataModule`.

    Logged keys: ``train/loss`` (each step); ``val/loss`` and ``val/<metric>`` per
    validation run, the same under ``test/``, where ``<metric>`` is the task's (see
    :func:`task_metrics`).

    Args:
        model: packaged alias (``all-minilm-l6-v2``), local directory or hub name
            (``roberta-base``); with ``pretrained=False`` also a model type (``roberta``).
        task: a GLUE task name (sets ``num_labels`` and the metrics), or ``None``.
        num_labels: classes (1 = regression); required when ``task`` is ``None``.
        pretrained: load the weights (fine-tuning) or initialise from the config.
        config_overrides: config fields to change (dropout, or tiny sizes for tests).
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices.
        betas: AdamW betas.
        warmup_ratio: share of the run in linear warmup.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        decay: ``linear`` (Hugging Face's fine-tuning default), ``cosine`` or ``constant``.
    """

    def __init__(
        self,
        model: str = "roberta-base",
        task: str | None = None,
        num_labels: int | None = None,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.0,
        min_lr_ratio: float = 0.0,
        decay: Decay = "linear",
    ) -> None:
        super().__init__()
        if task is not None:
            expected = glue_task(task).num_labels
            if num_labels is not None and num_labels != expected:
                raise ValueError(f"GLUE task {task!r} has {expected} labels, not num_labels={num_labels}")
            num_labels = expected
        if num_labels is None or num_labels < 1:
            raise ValueError("Set num_labels (classes; 1 for regression), or a GLUE task that implies it.")
        self.save_hyperparameters()
        self.num_labels = num_labels
        self.model = build_hf_model(
            "sequence-classification", model, pretrained=pretrained, config_overrides=config_overrides, num_labels=num_labels
        )
        metrics = task_metrics(task, num_labels)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_labels = getattr(datamodule, "num_labels", None)
        if data_labels is not None and data_labels != self.num_labels:
            raise ValueError(
                f"The data has {data_labels} labels but the model {self.num_labels}: set `model.num_labels: {data_labels}`."
            )

    def on_fit_start(self) -> None:
        # A validate()/test() before fit leaves metric states created under inference
        # mode, which fit's (no_grad) validation cannot update in place: recreate them here.
        self.val_metrics.reset()
        self.test_metrics.reset()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str, metrics: MetricCollection) -> torch.Tensor:
        out = self.model(**batch)
        preds = out.logits.squeeze(-1) if self.num_labels == 1 else out.logits.argmax(-1)
        metrics.update(preds, batch["labels"])
        size = batch["labels"].size(0)
        self.log(f"{prefix}/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict(metrics, prog_bar=True, batch_size=size)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test", self.test_metrics)

    def configure_optimizers(self) -> dict[str, Any]:
        # Plain AdamW so CompActCallback can swap in CompActAdamW; the paper's α
        # (2 for r=8, 4 for r=4) is the callback's `scale` (`--compact.scale`).
        h = self.hparams
        return adamw_with_schedule(
            self, self.model, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas),
            warmup_ratio=h.warmup_ratio, min_lr_ratio=h.min_lr_ratio, decay=h.decay,
        )
