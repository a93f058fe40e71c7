"""The Lightning-free CompAct driver in a plain PyTorch loop and in a Fabric loop."""

import copy

import pytest
import torch
from torch import nn

from helpers import TINY_LLAMA, token_loader
from lightning_compact import CompAct, CompActAdamW, CompActCallback, CompActLinear
from lightning_compact.models.llama import LlamaForCausalLM
from lightning_compact.projection import layer_seed


def _train_plain(model, compact, loader, lr=1e-2, clip=None):
    """The loop of the README's plain-PyTorch section, one optimizer step per batch."""
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=lr))
    for step, (tokens,) in enumerate(loader):
        compact.step(step)
        model(tokens, labels=tokens).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return opt


def test_a_plain_loop_trains_with_compressed_gradients_and_restores_the_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_LLAMA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compact = CompAct(rank=4, update_proj_gap=2)
    assert compact.convert(model) is model
    opt = _train_plain(model, compact, token_loader())
    assert isinstance(opt, CompActAdamW)
    up = model.model.layers[0].mlp.up_proj
    assert up.window == 1 and up.seed == layer_seed(0, "model.layers.0.mlp.up_proj", 1)
    assert opt.state[up.weight_delta]["exp_avg"].shape == (up.out_features, 4)
    compact.restore(model)
    assert not any(isinstance(m, CompActLinear) for m in model.modules())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_plain_loop_equals_the_lightning_callback_run(tmp_path):
    from helpers import PlainLM, make_trainer

    torch.manual_seed(0)
    module = PlainLM()
    plain = copy.deepcopy(module.model)
    make_trainer(tmp_path, [CompActCallback(rank=4, update_proj_gap=2)], max_steps=4, precision="64-true").fit(
        module, token_loader()
    )
    plain.double()
    holder = nn.Module()
    holder.model = plain  # seeds derive from fully qualified names: make them the LightningModule's
    compact = CompAct(rank=4, update_proj_gap=2)
    compact.convert(holder)
    _train_plain(plain, compact, token_loader(), lr=module.lr)
    compact.restore(holder)
    for (name, a), b in zip(plain.state_dict().items(), module.model.state_dict().values()):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, name


def test_decompress_grads_gives_any_optimizer_a_full_gradient():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_LLAMA)
    compact = CompAct(rank=4)
    compact.convert(model)
    with pytest.raises(ValueError, match="SGD has no compressed counterpart"):
        compact.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    compact.step(0)
    (tokens,) = next(iter(token_loader()))
    model(tokens, labels=tokens).backward()
    up = model.model.layers[0].mlp.up_proj
    g_hat = up.weight_delta.grad.clone()
    compact.decompress_grads_()
    assert up.weight_delta.grad is None
    expected = g_hat @ up.projection_matrix().t()
    assert ((up.weight.grad - expected).norm() / expected.norm()).item() < 1e-6


def _plain_reference(init, steps_data, clip):
    model = copy.deepcopy(init)
    compact = CompAct(rank=4, update_proj_gap=2)
    compact.convert(model)
    model.double()
    _train_plain(model, compact, steps_data, clip=clip)
    return model


def test_a_fabric_loop_equals_the_plain_loop():
    from lightning.fabric import Fabric

    torch.manual_seed(0)
    init = LlamaForCausalLM(TINY_LLAMA)
    reference = _plain_reference(init, token_loader(), clip=0.5)
    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    model = copy.deepcopy(init)
    compact = CompAct(rank=4, update_proj_gap=2)
    compact.convert(model)
    optimizer = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    model, optimizer = fabric.setup(model, optimizer)
    for step, (tokens,) in enumerate(fabric.setup_dataloaders(token_loader(), move_to_device=True)):
        compact.step(step)
        fabric.backward(model(tokens, labels=tokens))
        fabric.clip_gradients(model, optimizer, max_norm=0.5)  # counts each Ĝ like any .grad
        optimizer.step()
        optimizer.zero_grad()
    assert len(compact.compressed_layers) == 14
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, name
    compact.restore(model)
    assert not any(isinstance(m, CompActLinear) for m in model.modules())
