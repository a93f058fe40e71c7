"""FSDP2's DTensor code paths in one process (a world of one): the plain loop with ``CompAct``.

The 2-process test (``test_fsdp.py``) covers the distribution itself; this one covers,
cheaply, the layouts it does not: transformers' ``Conv1D`` (GPT-2), whose weight is stored
``[in, out]`` and therefore sharded by its input dimension, unlike its ``δ``.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_compact import CompAct
from lightning_compact.distributed import add_decompressed_, decompress

transformers = pytest.importorskip("transformers")


@pytest.fixture
def world_of_one():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(35500 + os.getpid() % 1000)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double()


def _train(model, compact, grad_mode, steps=4):
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = compact.optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    for step in range(steps):
        compact.step(step)
        model(tokens, labels=tokens).loss.backward()
        if grad_mode == "decompressed before the step":
            compact.decompress_grads_()
        opt.step()
        opt.zero_grad()


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@pytest.mark.parametrize("grad_mode", ["compressed", "decompressed before the step"])
def test_sharded_gpt2_trains_like_the_unsharded_one(world_of_one, grad_mode):
    # "decompressed before the step": compressed layers whose Ĝ is decompressed for an
    # optimizer without a compressed form (the callback's grad_mode="auto" with SGD & co.).
    results = []
    for shard in (False, True):
        model = _gpt2()
        compact = CompAct(rank=4, update_proj_gap=2, grad_mode="compressed")
        compact.convert(model, fsdp=shard)
        if shard:
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
        if grad_mode == "decompressed before the step":
            compact.optimizer = lambda opt: opt  # keep torch's AdamW: Ĝ is decompressed before it steps
        _train(model, compact, grad_mode)
        results.append({k: _full(v).detach().clone() for k, v in model.state_dict().items() if "weight_delta" not in k})
        if shard:
            assert any(n.endswith("mlp.c_fc") for n in compact.compressed_layers)  # a Conv1D took the DTensor path
    plain, sharded = results
    initial = _gpt2().state_dict()
    for name, ref in plain.items():
        assert ((sharded[name] - ref).norm() / ref.norm()).item() < 1e-12, name
    assert not torch.equal(plain["transformer.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"])


def test_decompress_lays_the_product_out_like_its_weight(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    g = torch.Generator().manual_seed(0)
    weight, update, proj = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((6, 10), (6, 3), (10, 3)))
    reference = weight + 0.5 * update @ proj.t()
    for w_dim, u_dim in ((0, 0), (1, 0), (0, 1)):
        w = distribute_tensor(weight.clone(), mesh, [Shard(w_dim)])
        u = distribute_tensor(update, mesh, [Shard(u_dim)])
        product = decompress(u, proj, like=w)
        assert product.placements == w.placements
        assert torch.allclose(product.full_tensor(), update @ proj.t(), rtol=1e-14, atol=0)
        add_decompressed_(w, u, proj, alpha=0.5)
        assert ((w.full_tensor() - reference).norm() / reference.norm()).item() < 1e-14
    with pytest.raises(TypeError, match="fully_shard"):
        decompress(distribute_tensor(update, mesh, [Shard(0)]), proj, like=weight)


def test_causal_lm_module_shards_its_blocks_under_a_device_mesh(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_compact.models import CausalLMModule

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    module = CausalLMModule(model="llama_60m", config_overrides=tiny)
    module.configure_model()  # no device mesh (not ModelParallelStrategy): left alone
    assert not any(hasattr(p, "placements") for p in module.parameters())
    compact = CompAct(rank=4, grad_mode="compressed")
    compact.convert(module, fsdp=True)  # what CompActCallback.setup does before configure_model
    module._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    module.configure_model()
    module.configure_model()  # a second trainer call: already sharded, no error
    assert all(hasattr(p, "placements") for p in module.parameters())
    assert all(hasattr(layer.weight_delta, "placements") for layer in compact.compressed_layers.values())
    assert type(module.model.model.layers[0]).__name__.startswith("FSDP")
