"""Lean norms, activations and chunked cross-entropy: equal to the plain ops, and they save less.

Tolerances. In float64 the lean ops and the plain ones differ only by the order of a
few float64 roundings: relative errors stay below 1e-12. In low precision both are
compared with a float64 computation on the same (already rounded) inputs, and the lean
op must be as accurate as the op it replaces: its error may exceed the plain op's by
a quarter (different but equally long rounding chains), no more. Where the lean forward
runs the reference's own ops, outputs are required to be bitwise equal.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_compact.lean import (
    causal_lm_loss,
    chunked_linear_cross_entropy,
    default_chunk_size,
    gelu,
    layer_norm,
    rms_norm,
    swiglu,
)
from lightning_compact.lean.norms import _LayerNorm
from lean_helpers import LargestTensor, rel_err, saved_bytes

F64_TOL = 1e-12


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # transformers' LlamaRMSNorm.forward, verbatim in substance.
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def _rms_norm_f64(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # The definition, in the input's precision (the float64 reference; no fp32 rounding).
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _new_gelu(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation (GPT-2's gelu_new).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _grads(fn, *inputs: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of ``fn(*inputs)`` and the gradients of ``<out, R>`` for a fixed random R."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    (out * r).sum().backward()
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _check_vs_f64(lean, plain, inputs: list[torch.Tensor], slack: float = 1.25, ref=None) -> None:
    """Lean and plain on low-precision ``inputs``, both against ``ref`` (default: plain) in float64 on the same values."""
    ref_out, ref_grads = _grads(ref or plain, *[t.double() if t.is_floating_point() else t for t in inputs])
    p_out, p_grads = _grads(plain, *inputs)
    l_out, l_grads = _grads(lean, *inputs)
    assert l_out.dtype == p_out.dtype
    assert rel_err(l_out, ref_out) <= slack * rel_err(p_out, ref_out) + 1e-7
    for lg, pg, rg in zip(l_grads, p_grads, ref_grads, strict=True):
        assert lg.dtype == pg.dtype
        assert rel_err(lg, rg) <= slack * rel_err(pg, rg) + 1e-7, (rel_err(lg, rg), rel_err(pg, rg))


def _randn(*shape: int, dtype=torch.float64, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------- RMSNorm


def test_rms_norm_equals_the_definition_in_float64():
    x, w = _randn(3, 10, 48), _randn(48, seed=1) + 1
    ref_out, ref_grads = _grads(_rms_norm_f64, x, w)
    out, grads = _grads(rms_norm, x, w)
    assert rel_err(out, ref_out) < F64_TOL
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_err(g, rg) < F64_TOL


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
def test_rms_norm_in_low_precision_is_bitwise_in_forward_and_as_accurate_in_backward(x_dtype, w_dtype):
    x, w = _randn(4, 16, 64, dtype=x_dtype, scale=3.0), (_randn(64, seed=1) + 1).to(w_dtype)
    assert torch.equal(rms_norm(x, w), _hf_rms_norm(x, w))
    _check_vs_f64(rms_norm, _hf_rms_norm, [x, w], ref=_rms_norm_f64)


def test_rms_norm_under_bf16_autocast_matches_the_plain_norm():
    # bf16-mixed: fp32 residual stream into the norm, autocast on.
    x, w = _randn(4, 16, 64, dtype=torch.float32), _randn(64, dtype=torch.float32, seed=1) + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_out, p_grads = _grads(_hf_rms_norm, x, w)
        l_out, l_grads = _grads(rms_norm, x, w)
    assert torch.equal(l_out, p_out)
    for lg, pg in zip(l_grads, p_grads, strict=True):
        assert rel_err(lg, pg) < 1e-6  # fp32 throughout: only summation order differs


def test_rms_norm_saves_only_its_input_and_one_float_per_row():
    x = _randn(8, 32, 256, dtype=torch.bfloat16).requires_grad_()
    w = torch.nn.Parameter(torch.ones(256))
    plain, _ = saved_bytes(lambda: _hf_rms_norm(x, w), exclude=[w])
    lean, _ = saved_bytes(lambda: rms_norm(x, w), exclude=[w])
    rows = x.numel() // 256
    assert lean == x.numel() * 2 + rows * 4
    # The plain norm keeps the fp32 input copy and the bf16 normalised tensor besides: 3x.
    assert plain >= 3 * x.numel() * 2


# ---------------------------------------------------------------- LayerNorm


def test_layer_norm_equals_f_layer_norm_in_float64():
    x, w, b = _randn(3, 10, 48), _randn(48, seed=1), _randn(48, seed=2)
    fn = lambda x, w, b: F.layer_norm(x, (48,), w, b, 1e-5)  # noqa: E731
    lean = lambda x, w, b: layer_norm(x, (48,), w, b, 1e-5)  # noqa: E731
    ref_out, ref_grads = _grads(fn, x, w, b)
    out, grads = _grads(lean, x, w, b)
    assert rel_err(out, ref_out) < F64_TOL
    assert len(grads) == 3
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_err(g, rg) < F64_TOL


@pytest.mark.parametrize("autocast", [False, True])
def test_layer_norm_in_bf16_equals_f_layer_norm_bitwise(autocast):
    x, w, b = _randn(4, 16, 64, dtype=torch.bfloat16), _randn(64, dtype=torch.float32, seed=1), _randn(64, dtype=torch.float32, seed=2)
    fn = lambda x, w, b: F.layer_norm(x, (64,), w, b)  # noqa: E731
    lean = lambda x, w, b: layer_norm(x, (64,), w, b)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        p_out, p_grads = _grads(fn, x, w, b)
        l_out, l_grads = _grads(lean, x, w, b)
    assert l_out.dtype == p_out.dtype and torch.equal(l_out, p_out)
    for lg, pg in zip(l_grads, p_grads, strict=True):
        assert lg.dtype == pg.dtype and torch.equal(lg, pg)


def test_layer_norm_upcast_path_matches_an_fp32_layer_norm_and_saves_the_bf16_input():
    # CUDA autocast runs layer_norm in fp32 on an fp32 copy of a bf16 input; that branch, on CPU.
    x, w, b = _randn(8, 32, 128, dtype=torch.bfloat16), _randn(128, dtype=torch.float32, seed=1), _randn(128, dtype=torch.float32, seed=2)
    fn = lambda x, w, b: F.layer_norm(x.float(), (128,), w, b)  # noqa: E731
    lean = lambda x, w, b: _LayerNorm.apply(x, (128,), w, b, 1e-5, True)  # noqa: E731
    p_out, p_grads = _grads(fn, x, w, b)
    l_out, l_grads = _grads(lean, x, w, b)
    assert l_out.dtype == torch.float32 and torch.equal(l_out, p_out)
    for lg, pg in zip(l_grads, p_grads, strict=True):
        assert lg.dtype == pg.dtype and torch.equal(lg, pg)
    xg = x.clone().requires_grad_()
    plain_bytes, _ = saved_bytes(lambda: fn(xg, w, b), exclude=[w, b])
    lean_bytes, _ = saved_bytes(lambda: lean(xg, w, b), exclude=[w, b])
    rows = x.numel() // 128
    assert lean_bytes == x.numel() * 2 + 2 * rows * 4  # bf16 input + mean + rstd
    assert plain_bytes == x.numel() * 4 + 2 * rows * 4  # fp32 copy + mean + rstd


# ---------------------------------------------------------------- SwiGLU and GELU


def _plain_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def test_swiglu_equals_silu_times_up_in_float64():
    g, u = _randn(4, 8, 40), _randn(4, 8, 40, seed=1)
    ref_out, ref_grads = _grads(_plain_swiglu, g, u)
    out, grads = _grads(swiglu, g, u)
    assert rel_err(out, ref_out) < F64_TOL
    for a, r in zip(grads, ref_grads, strict=True):
        assert rel_err(a, r) < F64_TOL


def test_swiglu_in_bf16_is_bitwise_equal_to_the_plain_op():
    g, u = _randn(4, 8, 40, dtype=torch.bfloat16, scale=3), _randn(4, 8, 40, dtype=torch.bfloat16, seed=1)
    p_out, p_grads = _grads(_plain_swiglu, g, u)
    l_out, l_grads = _grads(swiglu, g, u)
    assert torch.equal(l_out, p_out)
    for a, b in zip(l_grads, p_grads, strict=True):
        assert torch.equal(a, b)


def test_swiglu_saves_its_two_inputs_only():
    g = _randn(8, 32, 128, dtype=torch.bfloat16).requires_grad_()
    u = _randn(8, 32, 128, dtype=torch.bfloat16, seed=1).requires_grad_()
    plain, _ = saved_bytes(lambda: _plain_swiglu(g, u))
    lean, _ = saved_bytes(lambda: swiglu(g, u))
    assert lean == 2 * g.numel() * 2
    assert plain == 3 * g.numel() * 2  # gate, silu(gate), up


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_equals_f_gelu_in_float64_and_bitwise_in_bf16(approximate):
    x = _randn(4, 8, 40, scale=2)
    plain = lambda x: F.gelu(x, approximate=approximate)  # noqa: E731
    lean = lambda x: gelu(x, approximate)  # noqa: E731
    (ref_out, (ref_g,)), (out, (g,)) = _grads(plain, x), _grads(lean, x)
    assert rel_err(out, ref_out) < F64_TOL and rel_err(g, ref_g) < F64_TOL
    xb = x.to(torch.bfloat16)
    (p_out, (p_g,)), (l_out, (l_g,)) = _grads(plain, xb), _grads(lean, xb)
    assert torch.equal(l_out, p_out) and torch.equal(l_g, p_g)


def test_tanh_gelu_is_gpt2s_gelu_new_and_saves_a_sixth_of_it():
    x = _randn(4, 8, 40, scale=2)
    (ref_out, (ref_g,)), (out, (g,)) = _grads(_new_gelu, x), _grads(lambda x: gelu(x, "tanh"), x)
    assert rel_err(out, ref_out) < F64_TOL and rel_err(g, ref_g) < F64_TOL
    xb = _randn(8, 32, 128, dtype=torch.bfloat16).requires_grad_()
    plain, _ = saved_bytes(lambda: _new_gelu(xb))
    lean, _ = saved_bytes(lambda: gelu(xb, "tanh"))
    assert lean == xb.numel() * 2
    assert plain >= 4 * lean


# ---------------------------------------------------------------- chunked lm_head + cross-entropy


def _plain_lce(h, w, b, t, reduction="mean"):
    # The plain path: logits upcast to (at least) float32, as lm_head + .float() gives.
    logits = F.linear(h, w, b)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t, ignore_index=-100, reduction=reduction)


def _targets(n: int, vocab: int, ignored: int = 7) -> torch.Tensor:
    t = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3))
    t[torch.randperm(n, generator=torch.Generator().manual_seed(4))[:ignored]] = -100
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 8, None, 1000])
def test_chunked_cross_entropy_equals_the_plain_loss_in_float64(reduction, chunk_size):
    n, hid, vocab = 50, 16, 40
    h, w, b, t = _randn(n, hid), _randn(vocab, hid, seed=1), _randn(vocab, seed=2), _targets(n, vocab)
    plain = lambda h, w, b: _plain_lce(h, w, b, t, reduction)  # noqa: E731
    lean = lambda h, w, b: chunked_linear_cross_entropy(h, w, t, bias=b, chunk_size=chunk_size, reduction=reduction)  # noqa: E731
    ref_out, ref_grads = _grads(plain, h, w, b)
    out, grads = _grads(lean, h, w, b)
    assert out.dtype == torch.float64
    assert rel_err(out, ref_out) < F64_TOL
    assert len(grads) == 3
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_err(g, rg) < F64_TOL


def test_chunked_cross_entropy_under_bf16_autocast_is_as_accurate_as_the_plain_path():
    n, hid, vocab = 64, 32, 96
    h, w, t = _randn(n, hid, dtype=torch.float32), _randn(vocab, hid, dtype=torch.float32, seed=1, scale=0.3), _targets(n, vocab)
    ref_out, ref_grads = _grads(lambda h, w: _plain_lce(h, w, None, t), h.double(), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_out, p_grads = _grads(lambda h, w: _plain_lce(h, w, None, t), h, w)
        l_out, l_grads = _grads(lambda h, w: chunked_linear_cross_entropy(h, w, t, chunk_size=16), h, w)
    assert rel_err(l_out, ref_out) <= 1.25 * rel_err(p_out, ref_out) + 1e-6
    for lg, pg, rg in zip(l_grads, p_grads, ref_grads, strict=True):
        assert lg.dtype == pg.dtype == torch.float32
        assert rel_err(lg, rg) <= 1.25 * rel_err(pg, rg) + 1e-6, (rel_err(lg, rg), rel_err(pg, rg))


def test_chunked_cross_entropy_never_builds_the_full_logits_and_saves_only_the_gradients():
    n, hid, vocab, chunk = 256, 16, 512, 32
    h = _randn(n, hid, dtype=torch.float32).requires_grad_()
    w = torch.nn.Parameter(_randn(vocab, hid, dtype=torch.float32, seed=1))
    t = _targets(n, vocab)
    plain, _ = saved_bytes(lambda: _plain_lce(h, w, None, t), exclude=[w])
    with LargestTensor() as largest:
        lean, loss = saved_bytes(lambda: chunked_linear_cross_entropy(h, w, t, chunk_size=chunk), exclude=[w])
        loss.backward()
    assert largest.numel == max(chunk * vocab, vocab * hid)  # one chunk of logits at most
    assert lean <= (n * hid + vocab * hid) * 4 + 64  # grad_h and grad_W (+ scalars)
    assert plain >= n * vocab * 4  # the float32 log-probabilities


def test_chunked_cross_entropy_under_no_grad_computes_no_gradient():
    n, hid, vocab = 40, 8, 64
    h, w, t = _randn(n, hid, dtype=torch.float32), torch.nn.Parameter(_randn(vocab, hid, dtype=torch.float32, seed=1)), _targets(n, vocab)
    with torch.no_grad(), LargestTensor() as largest:
        loss = chunked_linear_cross_entropy(h, w, t, chunk_size=4)
    assert largest.numel == 4 * vocab < vocab * hid  # chunk logits only: no [vocab, hidden] gradient
    assert rel_err(loss, _plain_lce(h.double(), w.double(), None, t)) < 1e-6


def test_chunked_cross_entropy_of_all_ignored_targets_is_nan_like_f_cross_entropy():
    h, w = _randn(6, 8, dtype=torch.float32), _randn(10, 8, dtype=torch.float32)
    t = torch.full((6,), -100)
    assert torch.isnan(chunked_linear_cross_entropy(h, w, t)) and torch.isnan(_plain_lce(h, w, None, t))


def test_causal_lm_loss_shifts_labels_like_the_next_token_loss():
    b, s, hid, vocab = 2, 9, 8, 20
    h, w = _randn(b, s, hid), _randn(vocab, hid, seed=1)
    labels = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(5))
    labels[0, 3] = -100
    plain = lambda h, w: F.cross_entropy(F.linear(h, w)[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))  # noqa: E731
    (ref_out, ref_grads), (out, grads) = _grads(plain, h, w), _grads(lambda h, w: causal_lm_loss(h, w, labels, chunk_size=4), h, w)
    assert rel_err(out, ref_out) < F64_TOL
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_err(g, rg) < F64_TOL
    # transformers' gradient-accumulation form: the sum over a given item count.
    summed = causal_lm_loss(h, w, labels, num_items_in_batch=7)
    assert rel_err(summed, plain(h, w) * (labels[:, 1:] != -100).sum() / 7) < F64_TOL


def test_default_chunk_keeps_chunk_logits_near_the_size_of_the_hidden_states():
    c = default_chunk_size(tokens=8192, hidden=1024, vocab=32000)
    assert c & (c - 1) == 0 and 8192 * 1024 <= 2 * c * 32000 and c * 32000 <= 2 * 8192 * 1024
    assert default_chunk_size(tokens=8192, hidden=1024, vocab=32000, min_chunk=1024) == 1024  # the CPU floor


def test_lean_ops_trace_into_one_graph_with_torch_compile():
    def block(x, w, g, u):
        return rms_norm(x, w).sum() + swiglu(g, u).sum() + gelu(g, "tanh").sum()

    x, g, u = (_randn(2, 4, 16, dtype=torch.float32, seed=i).requires_grad_() for i in range(3))
    w = _randn(16, dtype=torch.float32, seed=3).requires_grad_()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, w, g, u)
    out.backward()
    grads = [t.grad.clone() for t in (x, w, g, u)]
    for t in (x, w, g, u):
        t.grad = None
    eager = block(x, w, g, u)
    eager.backward()
    assert rel_err(out, eager) < 1e-6
    for a, t in zip(grads, (x, w, g, u), strict=True):
        assert rel_err(a, t.grad) < 1e-6
