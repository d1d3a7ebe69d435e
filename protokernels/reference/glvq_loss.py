"""glvq_loss's epilogue in plain PyTorch: GLVQ's transfer values from the nearest_by_label search.

The same formulas as the kernels (triton_kernels/glvq_loss.py, csrc/glvq_loss.cu), elementwise
with no data-dependent branch or host sync, so that CUDA graphs capture it:

    mu = (d+ - d-) / (d+ + d-), dmu/dd+ = 2 d- / (d+ + d-)^2, dmu/dd- = -2 d+ / (d+ + d-)^2
    value = f(mu), coef = f'(mu) * (dmu/dd+, dmu/dd-)

with f the transfer function. A sample without a prototype of its class (i+ = -1) is left out
(value and coef 0); one without a rival (i- = -1) has mu = -1 and no gradient; d+ = d- = 0 gives
mu = 0. NaN distances give NaN (never masked into a finite loss).
"""
from __future__ import annotations

import torch

from ._losses import reduce_values

TRANSFERS = ("identity", "sigmoid", "swish")


def transfer_values(mu: torch.Tensor, transfer: str, beta: float):
    """(f(mu), f'(mu)) of the transfer function."""
    if transfer == "identity":
        return mu, torch.ones_like(mu)
    s = torch.sigmoid(beta * mu)
    slope = beta * s * (1 - s)
    if transfer == "sigmoid":
        return s, slope
    return mu * s, s + mu * slope  # swish


def glvq_epilogue(dist: torch.Tensor, idx: torch.Tensor, transfer: str, beta: float,
                  reduction: str):
    """dist, idx (N, 2) from nearest_by_label -> (loss, coef (N, 2), scale): loss the per-sample
    values (reduction "none") or their sum / mean over the samples that count, coef the values'
    derivatives w.r.t. (d+, d-), scale what the backward multiplies coef by (1 / count for
    "mean", else 1)."""
    d_plus, d_minus = dist.unbind(-1)
    counted, rival = idx[:, 0] >= 0, idx[:, 1] >= 0
    total = d_plus + d_minus
    live = rival & (total != 0)
    safe = torch.where(live, total, 1.0)
    mu = torch.where(live, (d_plus - d_minus) / safe, 0.0)
    mu = torch.where(rival, mu, d_plus * 0 - 1)  # NaN d+ stays NaN
    twice = 2 / (safe * safe)
    value, slope = transfer_values(mu, transfer, beta)
    value = torch.where(counted, value, 0.0)
    coef = torch.stack((slope * d_minus * twice, -slope * d_plus * twice), -1)
    coef = torch.where((counted & live)[:, None], coef, 0.0)
    loss, scale = reduce_values(value, counted, reduction)
    return loss, coef, scale
