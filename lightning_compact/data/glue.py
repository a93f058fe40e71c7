"""The GLUE tasks the paper fine-tunes RoBERTa-base on: columns, label counts, metrics."""

from __future__ import annotations

import dataclasses

__all__ = ["GLUE_TASKS", "GlueTask", "glue_task"]


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task as stored in the hub dataset ``nyu-mll/glue``.

    Attributes:
        text_columns: one column (single sentence) or two (a sentence pair).
        num_labels: classes; 1 means regression (STS-B).
        metrics: the task's standard metrics, first one the headline figure.
        val_split: the labelled evaluation split (GLUE's test labels are hidden).
    """

    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    val_split: str = "validation"


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2, ("mcc",)),
    "sst2": GlueTask(("sentence",), 2, ("acc",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("f1", "acc")),
    "qqp": GlueTask(("question1", "question2"), 2, ("f1", "acc")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("acc",), val_split="validation_matched"),
    "qnli": GlueTask(("question", "sentence"), 2, ("acc",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("acc",)),
}


def glue_task(name: str) -> GlueTask:
    """Look up a task by name, case- and dash-insensitively (``SST-2`` -> ``sst2``).

    Raises:
        ValueError: not one of :data:`GLUE_TASKS`.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[key]
