"""rslvq_loss's epilogue in plain PyTorch: RSLVQ's likelihood ratio from the distance matrix.

With logits l_j = -d_j / (2 sigma^2), a sample's value is lse_j l_j - lse_{j: c_j = y} l_j (both
log-sum-exps max-shifted: no overflow for any sigma), and its derivative w.r.t. d_j is
-(p_j - [c_j = y] q_j) / (2 sigma^2), p and q the softmax of the logits over all prototypes and
over those of the sample's class. A sample whose class has no prototype is left out (value and
derivatives 0). The same formulas as triton_kernels/rslvq_loss.py and csrc/rslvq_loss.cu.
"""
from __future__ import annotations

import math

import torch

from .._numerics import accumulate_dtype
from ._losses import reduce_values


def rslvq_epilogue(dist: torch.Tensor, x_labels: torch.Tensor, y_labels: torch.Tensor,
                   sigma: float, reduction: str):
    """dist (N, M >= 1), labels int64 (N,), (M,) -> (loss, weights (N, M) (each value's
    derivative w.r.t. dist), scale (what the backward multiplies weights by))."""
    factor = -0.5 / sigma ** 2
    logits = dist.to(accumulate_dtype(dist.dtype)) * factor
    same = x_labels[:, None] == y_labels[None]
    counted = same.any(1)
    whole = torch.logsumexp(logits, 1, keepdim=True)
    correct = torch.logsumexp(logits.masked_fill(~same, -math.inf), 1, keepdim=True)
    value = torch.where(counted, (whole - correct)[:, 0], 0.0)
    within = torch.where(same, torch.exp(logits - correct), 0.0)
    weights = torch.where(counted[:, None], (torch.exp(logits - whole) - within) * factor, 0.0)
    loss, scale = reduce_values(value, counted, reduction)
    return loss, weights, scale
