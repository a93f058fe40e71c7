"""Compressed gradient mode: Ĝ is the ordinary autograd gradient of each layer's weight_delta."""

import copy
import math

import pytest
import torch
from torch import nn

from lightning_compact import CompActConfig, CompActLinear, compact_linear, conversion_report, convert_to_compact
from lightning_compact.layers import delta_owner
from lightning_compact.projection import make_projection


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(n=16, m=8, r=4, batch=(6, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, generator=g, dtype=dtype)
    w = (torch.randn(m, n, generator=g, dtype=dtype) / math.sqrt(n)).requires_grad_()
    b = torch.randn(m, generator=g, dtype=dtype).requires_grad_()
    delta = torch.zeros((), dtype=dtype).expand(m, r).requires_grad_()
    grad_out = torch.randn(*batch, m, generator=g, dtype=dtype)
    return x, w, b, delta, grad_out


def test_weight_delta_receives_the_compressed_gradient_and_weight_grad_stays_none():
    n, m, r, seed = 16, 8, 4, 7
    x, w, b, delta, grad_out = _inputs(n, m, r)
    compact_linear(x, w, b, rank=r, seed=seed, weight_delta=delta).backward(grad_out)
    assert w.grad is None
    p = make_projection(n, r, seed, dtype=torch.float64)
    expected = grad_out.reshape(-1, m).T @ (x.reshape(-1, n) @ p)  # Ĝ = (∂L/∂o)ᵀ x P
    assert delta.grad.shape == (m, r) and rel_err(delta.grad, expected) < 1e-12


def test_compressed_gradient_is_the_exact_gradient_of_w_plus_delta_p_transposed():
    # The reparametrisation behind the mode: W_eff = W + δ Pᵀ at δ = 0, so ∂L/∂δ = G P.
    n, m, r, seed = 16, 8, 4, 3
    x, w, b, delta, grad_out = _inputs(n, m, r)
    p = make_projection(n, r, seed, dtype=torch.float64)
    d = torch.zeros(m, r, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.linear(x, w.detach() + d @ p.T, b.detach()).backward(grad_out)
    compact_linear(x, w, b, rank=r, seed=seed, weight_delta=delta).backward(grad_out)
    assert rel_err(delta.grad, d.grad) < 1e-12


def test_decompressing_the_compressed_gradient_gives_the_decompressed_mode_gradient():
    x, w, b, delta, grad_out = _inputs()
    compact_linear(x, w, b, rank=4, seed=3, weight_delta=delta).backward(grad_out)
    w2 = w.detach().clone().requires_grad_()
    compact_linear(x, w2, b.detach(), rank=4, seed=3).backward(grad_out)
    p = make_projection(16, 4, 3, dtype=torch.float64)
    assert rel_err(delta.grad @ p.T, w2.grad) < 1e-12


def test_input_and_bias_gradients_are_the_same_in_both_modes():
    x, w, b, delta, grad_out = _inputs(dtype=torch.float32)
    x.requires_grad_()
    compact_linear(x, w, b, rank=4, seed=3, weight_delta=delta).backward(grad_out)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    compact_linear(x2, w.detach().clone().requires_grad_(), b2, rank=4, seed=3).backward(grad_out)
    assert torch.equal(x.grad, x2.grad) and torch.equal(b.grad, b2.grad)


def test_backward_passes_accumulate_into_the_delta_grad_like_any_gradient():
    x, w, b, delta, grad_out = _inputs()
    for k in range(3):
        compact_linear(x * (k + 1), w, b, rank=4, seed=5, weight_delta=delta).backward(grad_out)
    _, _, _, single, _ = _inputs()
    compact_linear(x * 6, w, b, rank=4, seed=5, weight_delta=single).backward(grad_out)  # 1 + 2 + 3 = 6
    assert rel_err(delta.grad, single.grad) < 1e-12


def test_a_weight_delta_of_the_wrong_shape_is_rejected():
    x, w, b, _, _ = _inputs()
    with pytest.raises(ValueError, match="weight_delta has shape"):
        compact_linear(x, w, b, rank=4, seed=0, weight_delta=torch.zeros(8, 5, requires_grad=True))


def test_bf16_autocast_keeps_the_compressed_gradient_in_the_weight_dtype():
    x, w, b, _, grad_out = _inputs(dtype=torch.float32)
    delta = torch.zeros(()).expand(8, 4).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compact_linear(x, w, b, rank=4, seed=0, weight_delta=delta)
    out.float().backward(grad_out)
    assert w.grad is None and delta.grad.dtype == torch.float32 and torch.isfinite(delta.grad).all()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))


def _compressed(model, rank=0.25):
    return convert_to_compact(model, config=CompActConfig(rank=rank, grad_mode="compressed"))


def test_converted_layers_in_compressed_mode_hold_r_times_m_gradient_elements():
    model = _compressed(_model())
    model(torch.randn(10, 32)).sum().backward()
    for layer in conversion_report(model).converted.values():
        assert isinstance(layer, CompActLinear) and layer.grad_mode == "compressed"
        assert layer.weight.grad is None
        assert layer.weight_delta.grad.numel() == layer.rank * layer.out_features
        # δ itself is a broadcast zero: one element of storage, whatever its shape.
        assert layer.weight_delta.untyped_storage().nbytes() == layer.weight_delta.element_size()


def test_weight_delta_is_not_in_state_dict_and_plain_checkpoints_load_strictly():
    model = _compressed(_model())
    plain = _model()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)


def test_conversions_and_deepcopy_keep_delta_a_linked_broadcast_zero():
    model = _compressed(_model())
    delta = model[0].weight_delta
    model.to(torch.float64)
    assert model[0].weight_delta is delta and delta.dtype == torch.float64 and delta.stride() == (0, 0)
    clone = copy.deepcopy(model)
    assert clone[0].weight_delta.stride() == (0, 0) and delta_owner(clone[0].weight_delta) is clone[0]
    assert delta_owner(delta) is model[0]


def test_torch_clip_grad_norm_counts_the_compressed_gradients():
    model = _compressed(_model(), rank=4)
    model(torch.randn(10, 32)).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert sum(g.shape[-1] == 4 and g.dim() == 2 for g in grads) == 3  # three Ĝ among them
    norm = torch.stack([g.norm() for g in grads]).norm()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), norm.item() / 10)
    assert abs(total.item() - norm.item()) / norm.item() < 1e-6
    after = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    assert abs(after.item() - norm.item() / 10) / (norm.item() / 10) < 1e-5


def test_a_layer_switches_mode_only_without_a_pending_compressed_gradient():
    model = _compressed(_model(), rank=4)
    model(torch.randn(10, 32)).sum().backward()
    with pytest.raises(RuntimeError, match="pending"):
        model[0].set_grad_mode("decompressed")
    model[0].weight_delta.grad = None
    model[0].set_grad_mode("decompressed")
    model(torch.randn(10, 32)).sum().backward()
    assert model[0].weight_delta is None and model[0].weight.grad.shape == model[0].weight.shape
