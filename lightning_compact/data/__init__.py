"""DataModules for pretraining text and sequence classification, and where their data comes from."""

from lightning_compact.data.classification import ClassificationDataModule, GlueDataModule
from lightning_compact.data.glue import GLUE_TASKS, GlueTask, glue_task
from lightning_compact.data.hub import HubUnavailableError
from lightning_compact.data.packaged import PACKAGED, packaged_path
from lightning_compact.data.text import PretrainDataModule
from lightning_compact.data.tokenizers import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "ClassificationDataModule",
    "GLUE_TASKS",
    "GlueDataModule",
    "GlueTask",
    "HubUnavailableError",
    "PACKAGED",
    "PretrainDataModule",
    "glue_task",
    "load_tokenizer",
    "packaged_path",
]
