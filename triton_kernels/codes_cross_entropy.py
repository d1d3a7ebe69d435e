"""codes_cross_entropy's epilogue in Triton: one program per row reads its scores and codes
(maxima, then sums, then derivatives; the row stays in L1/L2), writes the row's derivatives and
its value or its share of the deterministic sum (formulas: reference/codes_cross_entropy.py).

Why a kernel: SwAV's loss in torch ops (log_softmax, product, row sum, mean) and its autograd
graph were most of the Sinkhorn head's host time at the in-model sizes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (BLOCK_PARTIALS, REDUCTIONS, accumulator, block, finish_sum, float32_pair,
                      launcher, loss_outputs)


@triton.jit
def _codes_cross_entropy_kernel(S, C, WEIGHTS, LOSS, SCALE, PARTIAL, TICKETS, K, ss_b, sc_b,
                                inv_t_hi, inv_t_lo,
                                ACC: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_PARTIALS: tl.constexpr):
    """S, C (B, K) with unit column stride; WEIGHTS (B, K) contiguous; 1 / T = inv_t_hi +
    inv_t_lo (float32 arguments)."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
    top = tl.full((BLOCK_K,), float("-inf"), ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        logit = tl.load(S + row * ss_b + cols, mask=cols < K, other=float("-inf")).to(ACC) * inv_t
        top = tl.maximum(top, logit)
    top_all = tl.max(top, 0)
    sum_exp = tl.zeros((BLOCK_K,), ACC)
    sum_codes = tl.zeros((BLOCK_K,), ACC)
    sum_products = tl.zeros((BLOCK_K,), ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = cols < K
        logit = tl.load(S + row * ss_b + cols, mask=ok, other=0.0).to(ACC) * inv_t
        code = tl.load(C + row * sc_b + cols, mask=ok, other=0.0).to(ACC)
        sum_exp += tl.where(ok, tl.exp(logit - top_all), 0.0)
        sum_codes += code
        sum_products += code * logit
    lse = top_all + tl.log(tl.sum(sum_exp, 0))
    total = tl.sum(sum_codes, 0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = cols < K
        logit = tl.load(S + row * ss_b + cols, mask=ok, other=0.0).to(ACC) * inv_t
        code = tl.load(C + row * sc_b + cols, mask=ok, other=0.0).to(ACC)
        tl.store(WEIGHTS + row * K + cols, (tl.exp(logit - lse) * total - code) * inv_t, mask=ok)
    value = total * lse - tl.sum(sum_products, 0)
    if REDUCTION == 0:
        tl.store(LOSS + row, value)
    else:
        finish_sum(value, 1, LOSS, SCALE, PARTIAL, TICKETS, REDUCTION == 2, BLOCK_PARTIALS)


_launch_rows = launcher(_codes_cross_entropy_kernel)


def codes_cross_entropy_rows(scores, codes, temperature, reduction):
    """scores, codes (B >= 1, K >= 1) -> (loss, weights (B, K), scale); see
    reference/codes_cross_entropy.py."""
    rows, k = scores.shape
    weights, loss, scale, partial, tickets = loss_outputs(scores, (rows, k), rows, rows,
                                                          reduction)
    block_k = block(k, 1024)
    _launch_rows((rows,), scores, codes, weights, loss, scale, partial, tickets, k,
                 scores.stride(0), codes.stride(0), *float32_pair(1 / temperature),
                 ACC=accumulator(scores.dtype),
                 REDUCTION=REDUCTIONS.index(reduction), BLOCK_K=block_k,
                 BLOCK_PARTIALS=BLOCK_PARTIALS, num_warps=4 if block_k >= 512 else 1)
    return loss, weights, scale
