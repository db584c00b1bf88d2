"""The bf16-on-CPU attention path computes the same attention as PyTorch's SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from genvs.core import attention as attention_module
from genvs.core.attention import MAX_CPU_SCORES, attention


def _reference(q, k, v):
    """Attention written out in float64, independent of both code paths."""
    q, k, v = (t.double() for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


@pytest.mark.parametrize("lq,lk,d", [(64, 64, 16), (256, 256, 16), (64, 256, 32)])
def test_bf16_cpu_path_matches_exact_attention_and_its_gradients(lq, lk, d):
    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(2, 4, n, d, generator=g) for n in (lq, lk, lk))
    q, k, v = (t.bfloat16().requires_grad_() for t in (q32, k32, v32))
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, lq, d)
    ref = _reference(q.detach(), k.detach(), v.detach())
    assert (out.double() - ref).abs().max() < 0.03  # bf16 rounding of inputs/products

    dout = torch.randn(out.shape, generator=g)
    out.backward(dout.bfloat16())
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    _reference(qr, kr, vr).backward(dout.double())
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert torch.allclose(got.double(), want, atol=0.05, rtol=0.05)


def test_other_inputs_go_to_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    x = torch.randn(1, 2, 16, 8)
    attention(x, x, x)  # fp32: SDPA
    xb = x.bfloat16().requires_grad_()
    attention(xb, xb, xb)  # bf16, small, recorded for the backward pass: explicit
    assert calls == [torch.float32]
    with torch.no_grad():  # bf16 without gradients (sampling): SDPA, whose forward is the faster one
        attention(xb, xb, xb)
    attention(x.bfloat16(), x.bfloat16(), x.bfloat16())  # nothing requires a gradient: SDPA too
    assert calls == [torch.float32, torch.bfloat16, torch.bfloat16]
    n = math.isqrt(MAX_CPU_SCORES) * 2  # score matrix over the cap: SDPA (memory-efficient) again
    big = torch.randn(1, 1, n, 4).bfloat16().requires_grad_()
    attention(big, big, big)
    assert calls == [torch.float32] + [torch.bfloat16] * 3
