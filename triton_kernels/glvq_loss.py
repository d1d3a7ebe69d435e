"""glvq_loss's epilogue in Triton: one launch turns nearest_by_label's (d+, i+, d-, i-) into
GLVQ's transfer values, their derivatives w.r.t. (d+, d-) and the loss (formulas:
reference/glvq_loss.py).

Why a kernel: written in torch ops, the epilogue and its autograd graph were ~50 launches per
training step, and at the heads' in-model sizes the step is host time (RESULTS.md "In-model
sizes": GLVQ's step 1.2-2.1 ms against 0.6-1.0 compiled).

The sum is deterministic (_common.finish_sum).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import BLOCK_PARTIALS, REDUCTIONS, cdiv, finish_sum, launcher, loss_outputs
from ..reference.glvq_loss import TRANSFERS

BLOCK = 1024


@triton.jit
def _glvq_epilogue_kernel(DIST, IDX, LOSS, COEF, SCALE, PARTIAL, TICKETS, N, beta,
                          TRANSFER: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_PARTIALS: tl.constexpr):
    """DIST, IDX, COEF (N, 2) contiguous; REDUCTION 0 none (LOSS (N,)), 1 sum, 2 mean (finish_sum's
    buffers)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    d_plus = tl.load(DIST + 2 * rows, mask=ok, other=0.0)
    d_minus = tl.load(DIST + 2 * rows + 1, mask=ok, other=1.0)
    counted = tl.load(IDX + 2 * rows, mask=ok, other=-1) >= 0
    rival = tl.load(IDX + 2 * rows + 1, mask=ok, other=-1) >= 0
    total = d_plus + d_minus
    live = rival & (total != 0)
    safe = tl.where(live, total, 1.0)
    mu = tl.where(live, (d_plus - d_minus) / safe, 0.0)
    mu = tl.where(rival, mu, d_plus * 0 - 1)  # NaN d+ stays NaN
    twice = 2 / (safe * safe)
    if TRANSFER == 0:
        value = mu
        slope = tl.full(mu.shape, 1.0, mu.dtype)
    else:
        s = 1 / (1 + tl.exp(-beta * mu))
        slope = beta * s * (1 - s)
        if TRANSFER == 1:
            value = s
        else:
            value = mu * s
            slope = s + mu * slope
    value = tl.where(counted, value, 0.0)
    grad = counted & live
    tl.store(COEF + 2 * rows, tl.where(grad, slope * d_minus * twice, 0.0), mask=ok)
    tl.store(COEF + 2 * rows + 1, tl.where(grad, -slope * d_plus * twice, 0.0), mask=ok)
    if REDUCTION == 0:
        tl.store(LOSS + rows, value, mask=ok)
    else:
        finish_sum(tl.sum(value, 0), tl.sum(counted.to(tl.int32), 0), LOSS, SCALE, PARTIAL,
                   TICKETS, REDUCTION == 2, BLOCK_PARTIALS)


_launch_epilogue = launcher(_glvq_epilogue_kernel)


def glvq_epilogue(dist, idx, transfer, beta, reduction):
    """dist, idx (N >= 1, 2) -> (loss, coef (N, 2), scale); see reference/glvq_loss.py."""
    n = dist.shape[0]
    programs = cdiv(n, BLOCK)
    coef, loss, scale, partial, tickets = loss_outputs(dist, (n, 2), n, programs, reduction)
    _launch_epilogue((programs,), dist, idx, loss, coef, scale, partial, tickets, n, beta,
                     TRANSFER=TRANSFERS.index(transfer), REDUCTION=REDUCTIONS.index(reduction),
                     BLOCK=BLOCK, BLOCK_PARTIALS=BLOCK_PARTIALS, num_warps=4)
    return loss, coef, scale
