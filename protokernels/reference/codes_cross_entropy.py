"""codes_cross_entropy in plain PyTorch: the cross-entropy of soft targets (Sinkhorn codes)
against the softmax of scores / temperature, per row, and its gradient.

For a row with scores s, codes c, C = sum_k c_k, m = max_k s_k and L = log sum_k e^((s_k - m)/T)
(the row's statistics, kept by the forward for the backward):
    value = -sum_k c_k log softmax(s / T)_k = (C m - sum_k c_k s_k) / T + C L,
    d value / d s_k = (C e^((s_k - m)/T - L) - c_k) / T.
The exponent is formed from s_k - m, exact at the maximum, so a row's largest score gets weight
C - c exactly (0 for a one-column row, in every backend whether or not products are contracted).
The same formulas as triton_kernels/codes_cross_entropy.py and csrc/codes_cross_entropy.cu.
"""
from __future__ import annotations

import torch

from .._numerics import accumulate_dtype
from ._losses import reduce_values


def codes_cross_entropy_rows(scores: torch.Tensor, codes: torch.Tensor, temperature: float,
                             reduction: str):
    """scores, codes (B >= 1, K >= 1) -> (loss, stats (B, 3): each row's (m, L, C), scale (what
    the backward multiplies a row's gradient by: 1, or 1 / B for "mean"))."""
    acc = accumulate_dtype(scores.dtype)
    s, codes = scores.to(acc), codes.to(acc)
    top = s.max(1, keepdim=True).values
    log_sum = torch.logsumexp((s - top) / temperature, 1, keepdim=True)
    total = codes.sum(1, keepdim=True)
    value = ((total * top - (codes * s).sum(1, keepdim=True)) / temperature + total * log_sum)
    loss, scale = reduce_values(value[:, 0], torch.ones_like(value[:, 0], dtype=torch.bool),
                                reduction)
    return loss, torch.cat([top, log_sum, total], 1), scale


def codes_cross_entropy_grad(scores: torch.Tensor, codes: torch.Tensor, stats: torch.Tensor,
                             factor: torch.Tensor, temperature: float) -> torch.Tensor:
    """The gradient w.r.t. scores (B, K), in scores' dtype, of the rows' values weighted by
    factor (B,)."""
    acc = accumulate_dtype(scores.dtype)
    top, log_sum, total = stats[:, 0:1], stats[:, 1:2], stats[:, 2:3]
    softmax = torch.exp((scores.to(acc) - top) / temperature - log_sum)
    grad = (softmax * total - codes.to(acc)) * (factor.to(acc)[:, None] / temperature)
    return grad.to(scores.dtype)
