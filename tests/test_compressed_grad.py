"""Compressed-gradient mode of compact_linear and CompActLinear: Ĝ kept, weight.grad never built."""

import math

import pytest
import torch
from torch import nn

from lightning_compact import CompActConfig, CompActLinear, CompressedGrad, compact_linear, convert_to_compact
from lightning_compact.projection import make_projection


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(n=16, m=8, batch=(6, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, generator=g, dtype=dtype)
    w = (torch.randn(m, n, generator=g, dtype=dtype) / math.sqrt(n)).requires_grad_()
    b = torch.randn(m, generator=g, dtype=dtype).requires_grad_()
    grad_out = torch.randn(*batch, m, generator=g, dtype=dtype)
    return x, w, b, grad_out


def test_sink_receives_the_compressed_gradient_and_weight_grad_stays_none():
    n, m, r, seed = 16, 8, 4, 7
    x, w, b, grad_out = _inputs(n, m)
    sink = CompressedGrad(n, r)
    compact_linear(x, w, b, rank=r, seed=seed, grad_sink=sink).backward(grad_out)
    assert w.grad is None
    assert sink.value.shape == (m, r) and sink.value.numel() == m * r and sink.seed == seed
    p = make_projection(n, r, seed, dtype=torch.float64)
    expected = grad_out.reshape(-1, m).T @ (x.reshape(-1, n) @ p)  # Ĝ = (∂L/∂o)ᵀ x P
    assert rel_err(sink.value, expected) < 1e-12


def test_decompressing_the_sink_gives_the_decompression_mode_gradient():
    x, w, b, grad_out = _inputs()
    sink = CompressedGrad(16, 4)
    compact_linear(x, w, b, rank=4, seed=3, grad_sink=sink).backward(grad_out)
    w2 = w.detach().clone().requires_grad_()
    compact_linear(x, w2, b.detach(), rank=4, seed=3).backward(grad_out)
    assert rel_err(sink.decompress(), w2.grad) < 1e-12


def test_input_and_bias_gradients_are_the_same_in_both_modes():
    x, w, b, grad_out = _inputs(dtype=torch.float32)
    x.requires_grad_()
    compact_linear(x, w, b, rank=4, seed=3, grad_sink=CompressedGrad(16, 4)).backward(grad_out)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    compact_linear(x2, w.detach().clone().requires_grad_(), b2, rank=4, seed=3).backward(grad_out)
    assert torch.equal(x.grad, x2.grad) and torch.equal(b.grad, b2.grad)


def test_backward_passes_with_one_projection_sum_into_one_buffer():
    x, w, b, grad_out = _inputs()
    sink = CompressedGrad(16, 4)
    for k in range(3):
        compact_linear(x * (k + 1), w, b, rank=4, seed=5, grad_sink=sink).backward(grad_out)
    single = CompressedGrad(16, 4)
    compact_linear(x * 6, w, b, rank=4, seed=5, grad_sink=single).backward(grad_out)  # 1 + 2 + 3 = 6
    assert rel_err(sink.value, single.value) < 1e-12


def test_accumulating_under_another_projection_is_an_error_until_zeroed():
    x, w, b, grad_out = _inputs()
    sink = CompressedGrad(16, 4)
    compact_linear(x, w, b, rank=4, seed=1, grad_sink=sink).backward(grad_out)
    with pytest.raises(RuntimeError, match="different projection"):
        compact_linear(x, w, b, rank=4, seed=2, grad_sink=sink).backward(grad_out)
    buffer = sink.value
    sink.zero_(set_to_none=False)  # keeps the buffer, forgets its projection
    compact_linear(x, w, b, rank=4, seed=2, grad_sink=sink).backward(grad_out)
    assert sink.value is buffer and sink.seed == 2
    sink.zero_()
    assert sink.value is None and sink.seed is None


def test_mismatched_sink_is_rejected():
    x, w, b, _ = _inputs()
    with pytest.raises(ValueError, match="does not match"):
        compact_linear(x, w, b, rank=4, seed=0, grad_sink=CompressedGrad(16, 8))


def test_bf16_autocast_keeps_the_compressed_gradient_in_the_weight_dtype():
    x, w, b, grad_out = _inputs(dtype=torch.float32)
    sink = CompressedGrad(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compact_linear(x, w, b, rank=4, seed=0, grad_sink=sink)
    out.float().backward(grad_out)
    assert w.grad is None and sink.value.dtype == torch.float32 and torch.isfinite(sink.value).all()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))


def test_converted_layers_in_compressed_mode_hold_r_times_m_gradient_elements():
    model = _model()
    report = convert_to_compact(model, config=CompActConfig(rank=0.25, compress_grad=True))
    model(torch.randn(10, 32)).sum().backward()
    assert len(report.converted) == 3
    for layer in report.converted.values():
        assert isinstance(layer, CompActLinear) and layer.compress_grad
        assert layer.weight.grad is None
        assert layer.compressed_grad.numel() == layer.rank * layer.out_features
        assert layer.bias.grad is not None and layer.bias.grad.shape == layer.bias.shape


def test_frozen_weight_in_compressed_mode_gets_nothing():
    model = _model()
    convert_to_compact(model, config=CompActConfig(rank=4, compress_grad=True))
    model[0].weight.requires_grad_(False)
    model(torch.randn(10, 32)).sum().backward()
    assert model[0].compressed_grad is None and model[0].weight.grad is None
    assert model[2].compressed_grad is not None


def test_compressed_mode_can_be_switched_off_when_no_gradient_is_pending():
    model = _model()
    convert_to_compact(model, config=CompActConfig(rank=4, compress_grad=True))
    model(torch.randn(10, 32)).sum().backward()
    with pytest.raises(RuntimeError, match="pending"):
        model[0].set_compress_grad(False)
    model[0].weight.compressed_grad.zero_()
    model[0].set_compress_grad(False)
    model(torch.randn(10, 32)).sum().backward()
    assert model[0].weight.grad.shape == model[0].weight.shape and model[0].compressed_grad is None
