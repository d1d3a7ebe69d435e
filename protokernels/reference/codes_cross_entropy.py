"""codes_cross_entropy's epilogue in plain PyTorch: the cross-entropy of soft targets (Sinkhorn
codes) against the softmax of scores / temperature, per row, with its derivatives.

For a row with logits l = s / T, C = sum_k c_k and lse = logsumexp(l):
    value = -sum_k c_k log softmax(l)_k = C lse - sum_k c_k l_k,
    d value / d s_k = (C softmax(l)_k - c_k) / T.
The same formulas as triton_kernels/codes_cross_entropy.py and csrc/codes_cross_entropy.cu.
"""
from __future__ import annotations

import torch

from .._numerics import accumulate_dtype
from ._losses import reduce_values


def codes_cross_entropy_rows(scores: torch.Tensor, codes: torch.Tensor, temperature: float,
                             reduction: str):
    """scores, codes (B >= 1, K >= 1) -> (loss, weights (B, K) (each row's value's derivative
    w.r.t. scores), scale (what the backward multiplies weights by))."""
    acc = accumulate_dtype(scores.dtype)
    logits = scores.to(acc) / temperature
    codes = codes.to(acc)
    total = codes.sum(1, keepdim=True)
    lse = torch.logsumexp(logits, 1, keepdim=True)
    value = (total * lse - (codes * logits).sum(1, keepdim=True))[:, 0]
    weights = (torch.exp(logits - lse) * total - codes) / temperature
    counted = torch.ones_like(value, dtype=torch.bool)
    loss, scale = reduce_values(value, counted, reduction)
    return loss, weights, scale
