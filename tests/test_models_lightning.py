"""LightningModules: LLaMA presets with overrides, the schedule, per-task metrics, HF adapters."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_compact.models import LLAMA_PRESETS, CausalLMModule, build_llama, task_metrics
from lightning_compact.models.schedule import lr_lambda

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32}


def test_presets_are_selectable_by_name_and_overridable():
    model = build_llama("llama_130m", TINY)
    assert model.config.hidden_size == 32 and model.config.vocab_size == 64
    assert set(LLAMA_PRESETS) == {"llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"}
    with pytest.raises(ValueError, match="llama_60m"):
        build_llama("llama_13b")
    with pytest.raises(ValueError, match="hidden_dim"):
        build_llama("llama_60m", {"hidden_dim": 8})


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    f = lr_lambda(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[-1] == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    linear = lr_lambda(100, 0, 0.0, decay="linear")
    assert linear(50) == pytest.approx(0.5) and linear(100) == 0.0


def _blocks(n: int = 32, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    # A learnable toy language: each sequence counts upwards modulo 64.
    starts = torch.arange(n) % 64
    ids = (starts[:, None] + torch.arange(seq)[None]) % 64
    return [{"input_ids": row} for row in ids]


def test_causal_lm_learns_and_logs_loss_and_perplexity(tmp_path):
    pl.seed_everything(0)
    module = CausalLMModule(model="llama_60m", config_overrides=TINY, lr=0.01, warmup_ratio=0.1)
    data = _blocks()
    trainer = pl.Trainer(
        max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=2, num_sanity_val_steps=0,
    )
    before = trainer.validate(module, DataLoader(data, batch_size=8), verbose=False)[0]
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8))
    after = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/ppl"} <= set(after)
    assert float(after["val/loss"]) < 0.5 * before["val/loss"]
    assert float(after["val/ppl"]) == pytest.approx(math.exp(float(after["val/loss"])), rel=1e-3)
    # Plain AdamW (what CompActCallback looks for) with the per-step schedule at its floor.
    opt = trainer.optimizers[0]
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.1)


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused(tmp_path):
    class Data(pl.LightningDataModule):
        vocab_size = 256

        def train_dataloader(self):
            return DataLoader(_blocks(), batch_size=4)

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size: 256"):
        trainer.fit(CausalLMModule(config_overrides=TINY), datamodule=Data())


@pytest.mark.parametrize(
    "task,keys",
    [("cola", {"mcc"}), ("stsb", {"pearson", "spearman"}), ("mrpc", {"f1", "acc"}), ("qqp", {"f1", "acc"}),
     ("rte", {"acc"}), ("sst2", {"acc"}), ("mnli", {"acc"}), ("qnli", {"acc"}), (None, {"acc", "f1"})],
)
def test_each_glue_task_gets_its_standard_metrics(task, keys):
    num_labels = {"stsb": 1, "mnli": 3, None: 3}.get(task, 2)
    metrics = task_metrics(task, num_labels)
    assert set(metrics.keys()) == keys
    if num_labels == 1:
        target = torch.tensor([0.0, 0.4, 1.0, 0.2])
        preds = 2 * target + 0.1
    else:
        target = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1]) % num_labels
        preds = target.clone()
    values = metrics(preds, target)
    assert all(float(v) == pytest.approx(1.0) for v in values.values())  # perfect predictions


def test_matthews_and_f1_match_their_confusion_matrix_formulas():
    target = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0])
    preds = torch.tensor([1, 1, 1, 1, 1, 0, 0, 1])
    tp, fn, tn, fp = 5, 1, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert float(task_metrics("cola", 2)(preds, target)["mcc"]) == pytest.approx(mcc)
    out = task_metrics("mrpc", 2)(preds, target)
    assert float(out["acc"]) == pytest.approx((tp + tn) / 8)
    assert float(out["f1"]) == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_sequence_classifier_builds_offline_from_a_model_type_and_trains(tmp_path):
    pytest.importorskip("transformers")
    from lightning_compact.models import SequenceClassificationModule

    overrides = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 32, "max_position_embeddings": 32}
    module = SequenceClassificationModule(model="bert", task="stsb", pretrained=False, config_overrides=overrides, lr=1e-3)
    assert module.model.training  # dropout and CompAct compression need train mode
    assert module.model.config.problem_type == "regression" and module.num_labels == 1
    batch = {"input_ids": torch.randint(0, 50, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0.0, 1.0, 2.0, 3.0])}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert loss.ndim == 0 and module.model.classifier.weight.grad is not None
    with pytest.raises(ValueError, match="3 labels"):
        SequenceClassificationModule(model="bert", task="mnli", num_labels=2, pretrained=False, config_overrides=overrides)


def test_hf_causal_lm_from_config_runs_in_the_causal_lm_module():
    pytest.importorskip("transformers")
    overrides = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}
    module = CausalLMModule(model="llama", pretrained=False, config_overrides=overrides)
    batch = {"input_ids": torch.randint(0, 64, (2, 16))}
    assert module._logits(batch["input_ids"]).shape == (2, 16, 64)
    assert module.training_step(batch, 0) > 0
