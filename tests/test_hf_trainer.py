"""CompAct inside transformers.Trainer: the same run as the controller's plain loop, accumulation, clipping, resume."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_compact import CompAct
from lightning_compact.layers import CompActLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lightning_compact.integrations.hf import CompActTrainerCallback, compact_adamw  # noqa: E402

N_SAMPLES, SEQ = 8, 16


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (N_SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class InOrder(transformers.Trainer):
    """Batches in dataset order, so the plain loop below sees the very same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def training_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=N_SAMPLES, learning_rate=1e-2,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                    optim="adamw_torch", dataloader_drop_last=True)
    defaults.update(kw)
    return transformers.TrainingArguments(**defaults)


def plain_loop(model, compact, steps, accumulate=1, max_norm=None):
    """The controller in a hand-written loop: what the Trainer run must reproduce."""
    data = Tokens().ids
    compact.convert(model)
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0))
    micro = N_SAMPLES // accumulate
    for step in range(steps):
        compact.step(step)
        for i in range(accumulate):
            batch = data[i * micro:(i + 1) * micro]
            (model(input_ids=batch, labels=batch).loss / accumulate).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    compact.restore(model)
    return model


def assert_same_weights(a, b, rtol=1e-4):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        err = (pa - pb).norm() / pb.norm()
        assert err < rtol, (name, float(err))


@pytest.mark.parametrize("grad_mode", ["decompressed", "compressed"])
@pytest.mark.parametrize("accumulate,max_norm", [(1, None), (2, 0.5)])
def test_trainer_run_equals_the_controller_loop(tmp_path, grad_mode, accumulate, max_norm):
    model = tiny_llama()
    reference = plain_loop(copy.deepcopy(model), CompAct(rank=4, grad_mode=grad_mode, update_proj_gap=2), steps=4,
                           accumulate=accumulate, max_norm=max_norm)
    args = training_args(tmp_path, per_device_train_batch_size=N_SAMPLES // accumulate,
                         gradient_accumulation_steps=accumulate, max_grad_norm=max_norm or 0.0)
    compact = CompAct(rank=4, grad_mode=grad_mode, update_proj_gap=2)
    kw = {}
    if grad_mode == "compressed":
        kw["optimizers"] = (compact_adamw(model, compact, lr=1e-2), None)
    callback = CompActTrainerCallback(compact=compact)
    trainer = InOrder(model=model, args=args, train_dataset=Tokens(), callbacks=[callback], **kw)
    trainer.train()
    # Plain layers again after training, the same Parameters trained.
    assert not any(isinstance(m, CompActLinear) for m in model.modules())
    assert_same_weights(model, reference)
    untouched = tiny_llama()
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(model.parameters(), untouched.parameters()))


def test_compressed_mode_with_the_trainer_s_own_adamw_says_what_to_do(tmp_path):
    model = tiny_llama()
    callback = CompActTrainerCallback(rank=4, grad_mode="compressed")
    trainer = InOrder(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=Tokens(), callbacks=[callback])
    with pytest.raises(ValueError, match="compact_adamw"):
        trainer.train()


def test_resume_from_a_trainer_checkpoint_continues_the_same_run(tmp_path):
    def run(out, steps, resume=None):
        model = tiny_llama()
        compact = CompAct(rank=4, grad_mode="compressed", update_proj_gap=2)
        optimizer = compact_adamw(model, compact, lr=1e-2)
        args = training_args(out, max_steps=steps, save_strategy="steps", save_steps=3)
        trainer = InOrder(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, None),
                          callbacks=[CompActTrainerCallback(compact=compact)])
        trainer.train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "a", 5)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "c", 5, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert_same_weights(resumed, whole, rtol=1e-6)


@pytest.mark.slow
def test_ddp_through_accelerate_on_two_processes(tmp_path):
    """Decompressed mode under the Trainer's own DDP (gloo, 2 CPU processes): both ranks hold the same weights,
    and they are those of one process on the whole batch (every rank uses the same P)."""
    from helpers import run_two_ranks

    r0, r1 = run_two_ranks("hf_ddp_train.py", tmp_path, port_base=39500)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["converted"] > 0
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
    single = tiny_llama()
    plain_loop(single, CompAct(rank=4, grad_mode="decompressed", update_proj_gap=2), steps=4)
    untouched = tiny_llama().state_dict()
    for name, value in single.state_dict().items():
        if not torch.equal(value, untouched[name]):  # trained parameters
            err = (r0["state"][name] - value).norm() / value.norm()
            assert err < 1e-4, (name, float(err))
