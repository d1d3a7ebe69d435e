"""codes_cross_entropy in Triton: the forward is one program per row reading its scores and codes
once (a running maximum and a running sum of the shifted exponentials, rescaled when the maximum
grows), writing the row's statistics and its value or its share of the deterministic sum; the
backward is one elementwise kernel from the statistics (formulas: reference/codes_cross_entropy.py).

Why this shape: the forward wrote the (B, K) derivatives after three passes over each row, and
lost to the compiled naive forward at SwAV's B1024-4096 K3000 (Triton 0.033/0.083 ms, CUDA
0.059/0.123, compiled 0.018/0.050; RESULTS.md "DPNP in one op"). Now it reads each row once and
writes B x 3 statistics; the backward, which reads the row again either way, forms the gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_PARTIALS, REDUCTIONS, accumulator, block, cdiv, finish_sum,
                      float32_pair, launcher, loss_outputs)


@triton.jit
def _codes_cross_entropy_kernel(S, C, STATS, LOSS, SCALE, PARTIAL, TICKETS, K, ss_b, sc_b,
                                inv_t_hi, inv_t_lo,
                                ACC: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_PARTIALS: tl.constexpr):
    """S, C (B, K) with unit column stride; STATS (B, 3) contiguous; 1 / T = inv_t_hi + inv_t_lo
    (float32 arguments)."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
    top = tl.full((), float("-inf"), ACC)
    sum_exp = tl.zeros((), ACC)
    total = tl.zeros((BLOCK_K,), ACC)
    products = tl.zeros((BLOCK_K,), ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = cols < K
        s = tl.load(S + row * ss_b + cols, mask=ok, other=float("-inf")).to(ACC)
        code = tl.load(C + row * sc_b + cols, mask=ok, other=0.0).to(ACC)
        new_top = tl.maximum(top, tl.max(s, 0))
        # the running sum moves to the new maximum (nothing to move while it is still -inf)
        kept = tl.where(top == float("-inf"), 0.0, sum_exp * tl.exp((top - new_top) * inv_t))
        sum_exp = kept + tl.sum(tl.where(ok, tl.exp((s - new_top) * inv_t), 0.0), 0)
        top = new_top
        total += code
        products += tl.where(ok, code * s, 0.0)
    log_sum = tl.log(sum_exp)
    row_total = tl.sum(total, 0)
    value = (row_total * top - tl.sum(products, 0)) * inv_t + row_total * log_sum
    tl.store(STATS + row * 3, top)
    tl.store(STATS + row * 3 + 1, log_sum)
    tl.store(STATS + row * 3 + 2, row_total)
    if REDUCTION == 0:
        tl.store(LOSS + row, value)
    else:
        finish_sum(value, tl.full((), 1, tl.int32), LOSS, SCALE, PARTIAL, TICKETS, REDUCTION == 2,
                   BLOCK_PARTIALS)


@triton.jit
def _codes_cross_entropy_grad_kernel(S, C, STATS, FACTOR, GRAD, K, ss_b, sc_b, sf_b, inv_t_hi,
                                     inv_t_lo,
                                     ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """GRAD (B, K) contiguous = FACTOR[b] (C e^((s - m) / T - L) - c) / T."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = cols < K
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
    top = tl.load(STATS + row * 3)
    log_sum = tl.load(STATS + row * 3 + 1)
    total = tl.load(STATS + row * 3 + 2)
    factor = tl.load(FACTOR + row * sf_b).to(ACC) * inv_t
    s = tl.load(S + row * ss_b + cols, mask=ok, other=0.0).to(ACC)
    code = tl.load(C + row * sc_b + cols, mask=ok, other=0.0).to(ACC)
    grad = (tl.exp((s - top) * inv_t - log_sum) * total - code) * factor
    tl.store(GRAD + row * K + cols, grad.to(GRAD.dtype.element_ty), mask=ok)


_launch_rows = launcher(_codes_cross_entropy_kernel)
_launch_grad = launcher(_codes_cross_entropy_grad_kernel)


def codes_cross_entropy_rows(scores, codes, temperature, reduction):
    """scores, codes (B >= 1, K >= 1) -> (loss, stats (B, 3), scale); see
    reference/codes_cross_entropy.py."""
    rows, k = scores.shape
    stats, loss, scale, partial, tickets = loss_outputs(scores, (rows, 3), rows, rows, reduction)
    block_k = block(k, 1024)
    _launch_rows((rows,), scores, codes, stats, loss, scale, partial, tickets, k,
                 scores.stride(0), codes.stride(0), *float32_pair(1 / temperature),
                 ACC=accumulator(scores.dtype),
                 REDUCTION=REDUCTIONS.index(reduction), BLOCK_K=block_k,
                 BLOCK_PARTIALS=BLOCK_PARTIALS, num_warps=4 if block_k >= 512 else 1)
    return loss, stats, scale


def codes_cross_entropy_grad(scores, codes, stats, factor, temperature):
    """The gradient w.r.t. scores (B >= 1, K >= 1) in scores' dtype; factor (B,) (any stride)."""
    rows, k = scores.shape
    grad = torch.empty((rows, k), dtype=scores.dtype, device=scores.device)
    block_k = block(k, 1024)
    _launch_grad((rows, cdiv(k, block_k)), scores, codes, stats, factor, grad, k,
                 scores.stride(0), codes.stride(0), factor.stride(0),
                 *float32_pair(1 / temperature), ACC=accumulator(scores.dtype), BLOCK_K=block_k,
                 num_warps=4 if block_k >= 512 else 1)
    return grad
