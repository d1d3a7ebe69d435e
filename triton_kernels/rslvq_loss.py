"""rslvq_loss's epilogue in Triton: one program per sample reads its row of distances three times
(maxima, sums, derivatives; the row stays in L1/L2) and writes the row's derivatives and its
value or its share of the deterministic sum (formulas: reference/rslvq_loss.py).

Why a kernel: RSLVQ's epilogue in torch ops (two log-sum-exps, masks, the mean) was ~50 launches
per training step with its autograd graph, at sizes where the step is host time.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (BLOCK_PARTIALS, REDUCTIONS, accumulator, block, finish_sum, float32_pair,
                      launcher, loss_outputs)


@triton.jit
def _rslvq_epilogue_kernel(DIST, XL, YL, WEIGHTS, LOSS, SCALE, PARTIAL, TICKETS, M, sd_n, factor_hi,
                           factor_lo,
                           ACC: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_PARTIALS: tl.constexpr):
    """DIST (N, M) with row stride sd_n, WEIGHTS (N, M) contiguous; -1 / (2 sigma^2) = factor_hi
    + factor_lo (_common.float32_pair)."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.cast(factor_hi, ACC) + tl.cast(factor_lo, ACC)
    label = tl.load(XL + row)
    max_all = tl.full((BLOCK_M,), float("-inf"), ACC)
    max_same = tl.full((BLOCK_M,), float("-inf"), ACC)
    same_count = tl.zeros((BLOCK_M,), tl.int32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = cols < M
        logit = tl.load(DIST + row * sd_n + cols, mask=ok, other=float("inf")).to(ACC) * factor
        same = (tl.load(YL + cols, mask=ok, other=0) == label) & ok
        max_all = tl.maximum(max_all, logit)
        max_same = tl.maximum(max_same, tl.where(same, logit, float("-inf")))
        same_count += same.to(tl.int32)
    top_all = tl.max(max_all, 0)
    top_same = tl.max(max_same, 0)
    counted = tl.sum(same_count, 0) > 0
    sum_all = tl.zeros((BLOCK_M,), ACC)
    sum_same = tl.zeros((BLOCK_M,), ACC)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = cols < M
        logit = tl.load(DIST + row * sd_n + cols, mask=ok, other=float("inf")).to(ACC) * factor
        same = (tl.load(YL + cols, mask=ok, other=0) == label) & ok
        sum_all += tl.where(ok, tl.exp(logit - top_all), 0.0)
        sum_same += tl.where(same, tl.exp(logit - top_same), 0.0)
    whole = top_all + tl.log(tl.sum(sum_all, 0))
    correct = top_same + tl.log(tl.sum(sum_same, 0))
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = cols < M
        logit = tl.load(DIST + row * sd_n + cols, mask=ok, other=float("inf")).to(ACC) * factor
        same = (tl.load(YL + cols, mask=ok, other=0) == label) & ok
        within = tl.where(same, tl.exp(logit - correct), 0.0)
        weight = tl.where(counted, (tl.exp(logit - whole) - within) * factor, 0.0)
        tl.store(WEIGHTS + row * M + cols, weight, mask=ok)
    value = tl.where(counted, whole - correct, 0.0)
    if REDUCTION == 0:
        tl.store(LOSS + row, value)
    else:
        finish_sum(value, counted.to(tl.int32), LOSS, SCALE, PARTIAL, TICKETS, REDUCTION == 2,
                   BLOCK_PARTIALS)


_launch_epilogue = launcher(_rslvq_epilogue_kernel)


def rslvq_epilogue(dist, x_labels, y_labels, sigma, reduction):
    """dist (N >= 1, M >= 1) -> (loss, weights (N, M), scale); see reference/rslvq_loss.py."""
    n, m = dist.shape
    weights, loss, scale, partial, tickets = loss_outputs(dist, (n, m), n, n, reduction)
    block_m = block(m, 1024)
    _launch_epilogue((n,), dist, x_labels, y_labels, weights, loss, scale, partial, tickets, m,
                     dist.stride(0), *float32_pair(-0.5 / sigma ** 2),
                     ACC=accumulator(dist.dtype),
                     REDUCTION=REDUCTIONS.index(reduction), BLOCK_M=block_m,
                     BLOCK_PARTIALS=BLOCK_PARTIALS, num_warps=4 if block_m >= 512 else 1)
    return loss, weights, scale
