"""Scaled dot-product attention that stays fast under bf16 autocast on CPU.

PyTorch's CPU flash-attention kernel has a slow bf16 *backward* for the small heads the toy and
benchmark configs use (16-32 channels): on the 2-core AVX-512-BF16 development CPU it was 292 ms of the
3DiM toy X-UNet's 827 ms bf16 step (batch 16), and at 64 tokens x 32 channels it ran 5x slower than plain
matmuls. So when autograd records a bf16 attention on CPU and the score matrix is small, `attention`
computes ``softmax(q k^T / sqrt(d)) v`` with two bf16 matmuls (softmax in fp32). Its *forward* is fast:
without gradients (sampling) the explicit path was 1.3-10x slower than SDPA on a 2-core AMX CPU (e.g.
32.0 against 4.8 ms at 128 heads x 256 tokens x 32 channels; fwd + bwd at 64 tokens 3.0 against 12.1 ms).
Everywhere else (no gradients, fp32, GPUs, long sequences) it is ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention"]

MAX_CPU_SCORES = 1 << 20  # query x key tokens above which the explicit path's score matrix costs too much memory


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``[..., Lq, d], [..., Lk, d], [..., Lk, dv] -> [..., Lq, dv]``, unmasked, scale ``1 / sqrt(d)``."""
    explicit = (
        q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] * k.shape[-2] <= MAX_CPU_SCORES
        and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    )  # fmt: skip
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v)
    scores = q @ (k.transpose(-1, -2) * q.shape[-1] ** -0.5)
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
