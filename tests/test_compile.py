"""torch.compile(fullgraph=True) of converted models: equal to eager, no recompilation per window."""

import copy

import pytest
import torch
from torch import nn

from helpers import TINY_LLAMA, PlainLM, make_trainer, token_loader
from lightning_compact import CompAct, CompActCallback, compact_linear
from lightning_compact.models.llama import LlamaForCausalLM
from lightning_compact.projection import seed_keys


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class CountingBackend:
    """A torch.compile backend that counts the graphs Dynamo hands it (one per (re)compilation)."""

    def __init__(self, inner=None):
        self.graphs = 0
        self.inner = inner

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inner is None:
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 8))


@pytest.mark.slow
@pytest.mark.parametrize("grad_mode, projection", [("compressed", "gaussian"), ("decompressed", "gaussian"), ("compressed", "orthogonal")])
def test_inductor_fullgraph_trains_like_eager(grad_mode, projection):
    # float32 on CPU: inductor fuses and reorders, so agreement is to rounding (~1e-6).
    # The orthogonal projection's QR is traced into the same graph (no graph break).
    torch.manual_seed(0)
    kwargs = dict(rank=8, grad_mode=grad_mode, update_proj_gap=1, default_exclusions=False, projection=projection)
    eager, compact_e = _mlp(), CompAct(**kwargs)
    compiled_model = copy.deepcopy(eager)
    compact_c = CompAct(**kwargs)
    compact_e.convert(eager)
    compact_c.convert(compiled_model)
    opt_e = compact_e.optimizer(torch.optim.AdamW(eager.parameters(), lr=1e-2))
    opt_c = compact_c.optimizer(torch.optim.AdamW(compiled_model.parameters(), lr=1e-2))
    compiled = torch.compile(compiled_model, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # a new projection every step
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        losses = []
        for compact, model, opt in ((compact_e, eager, opt_e), (compact_c, compiled, opt_c)):
            compact.step(step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(loss.detach())
        assert rel_err(losses[1], losses[0]) < 1e-5
        grads_e = [p.grad for p in eager.parameters() if p.grad is not None]
        grads_c = [p.grad for p in compiled_model.parameters() if p.grad is not None]
        assert len(grads_e) == len(grads_c) > 0
        for ge, gc in zip(grads_e, grads_c):
            assert rel_err(gc, ge) < 1e-4
        opt_e.step(), opt_c.step()
        opt_e.zero_grad(), opt_c.zero_grad()
    for (name, pe), pc in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        assert rel_err(pc, pe) < 1e-4, name


@pytest.mark.parametrize("grad_mode, cache", [("compressed", True), ("decompressed", False)])
def test_a_new_window_or_seed_does_not_recompile_the_model(grad_mode, cache):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_LLAMA)
    compact = CompAct(rank=4, grad_mode=grad_mode, update_proj_gap=1, cache_projections=cache)
    compact.convert(model)
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    tokens = torch.randint(0, TINY_LLAMA.vocab_size, (2, 16))  # fixed shape: no dynamic-shape recompile
    grads = []
    for step in range(3):
        if step == 2:
            compact.set_seed(123)
        compact.step(step)
        compiled(tokens, labels=tokens).backward()
        up = model.model.layers[0].mlp.up_proj
        grad = up.weight_delta.grad if grad_mode == "compressed" else up.weight.grad
        grads.append(grad.clone())
        model.zero_grad()
    assert backend.graphs == 1
    assert not torch.equal(grads[0], grads[1]) and not torch.equal(grads[1], grads[2])  # P did change


def test_another_layer_of_the_same_shape_does_not_recompile_the_function():
    backend = CountingBackend()
    fn = torch.compile(
        lambda x, w, keys, delta: compact_linear(x, w, rank=4, seed=keys, weight_delta=delta), fullgraph=True, backend=backend
    )
    x = torch.randn(8, 16)
    for layer_seed in range(3):  # three layers: own weights, own seeds
        w = torch.randn(12, 16, requires_grad=True)
        delta = torch.zeros(()).expand(12, 4).requires_grad_()
        keys = torch.tensor(seed_keys(layer_seed), dtype=torch.int32)
        fn(x, w, keys, delta).sum().backward()
        assert delta.grad is not None and w.grad is None
    assert backend.graphs == 1


class CompiledLM(PlainLM):
    """Compiles its network in configure_model, after CompActCallback converted it at setup."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.net = self.model

    def configure_model(self):
        self.net = torch.compile(self.model, fullgraph=True, backend=self.backend)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        loss = self.net(tokens, labels=tokens)
        self.log("train/loss", loss)
        return loss


@pytest.mark.parametrize("grad_mode", ["auto", "decompressed"])
def test_lightning_module_compiled_in_configure_model_trains_like_eager(tmp_path, grad_mode):
    torch.manual_seed(0)
    backend = CountingBackend()
    compiled = CompiledLM(backend)
    eager = copy.deepcopy(PlainLM())
    eager.load_state_dict(compiled.state_dict(), strict=False)
    eager.model.load_state_dict(compiled.model.state_dict())
    for i, module in enumerate((compiled, eager)):
        cb = CompActCallback(rank=4, update_proj_gap=1, grad_mode=grad_mode)
        make_trainer(tmp_path / str(i), [cb], max_steps=3, precision="64-true").fit(module, token_loader())
    assert backend.graphs == 1  # three steps, three projections, one graph
    for (name, pc), pe in zip(compiled.model.named_parameters(), eager.model.parameters()):
        assert rel_err(pc, pe) < 1e-10, name
