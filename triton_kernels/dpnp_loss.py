"""dpnp_loss's epilogue in Triton: one program per row, the N samples then the M prototypes. A row
reads its logits (a sample's row of h C^T, a prototype's row of C C^T) for its rival and, for a
sample, its log-sum-exp; a sample then writes its softmax weights over its logits; every row then
walks its features once for the positive and L_1/2 terms and writes its gradient buffers; the
values end in the deterministic sum (formulas: reference/dpnp_loss.py).

Why a kernel: DPNP's loss in torch ops was ~95 launches and two device syncs per training step at
sizes where the step is host time.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (BLOCK_PARTIALS, accumulator, block, finish_sum, float32_pair, launcher,
                      loss_outputs)


@triton.jit
def _dpnp_epilogue_kernel(S, GRAM, H, C, LABELS, OWN, SCATTER, TARGETS, LOSS, SCALE, PARTIAL,
                          TICKETS, N, M, D, lp_hi, lp_lo, ln_hi, ln_lo, lc_hi, lc_lo, eps_hi,
                          eps_lo,
                          ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_PARTIALS: tl.constexpr):
    """S (N, M), GRAM (M, M), H (N, D), C (M, D), OWN (N + M, D), SCATTER (2N + M, D) contiguous;
    each lambda and eps a float32 pair (_common.float32_pair)."""
    row = tl.program_id(0).to(tl.int64)
    lambda_pos = tl.cast(lp_hi, ACC) + tl.cast(lp_lo, ACC)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    per_sample = 1 / tl.cast(tl.maximum(N, 1), ACC)  # N, M may come as constexpr 1
    has_rival = M > 1
    is_sample = row < N
    if is_sample:
        own_col = tl.load(LABELS + row)
        logits = S + row * M
        features = H + row * D
        negative = (tl.cast(ln_hi, ACC) + tl.cast(ln_lo, ACC)) * per_sample / 2
    else:
        own_col = row - N
        logits = GRAM + own_col * M
        features = C + own_col * D
        negative = (tl.cast(lc_hi, ACC) + tl.cast(lc_lo, ACC)) / tl.cast(2 * M, ACC)
    # Read before any warp passes the reductions below: a sample's weights overwrite its logits.
    own_logit = tl.load(logits + own_col).to(ACC)
    # The rival: the lowest-index minimum of ||c_k||^2 - 2 s_k over k != own_col (NaN never wins;
    # without a finite candidate, the first allowed column).
    best = tl.full((), float("inf"), ACC)
    rival = tl.where(own_col == 0, 1, 0).to(tl.int64) % M
    top = tl.full((BLOCK_M,), float("-inf"), ACC)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = cols < M
        s = tl.load(logits + cols, mask=ok, other=float("-inf")).to(ACC)
        key = tl.load(GRAM + cols.to(tl.int64) * (M + 1), mask=ok, other=0.0).to(ACC) - 2 * s
        key = tl.where(ok & (cols != own_col) & (key == key), key, float("inf"))
        block_best = tl.min(key, 0)
        block_rival = tl.min(tl.where(key == block_best, cols, M), 0).to(tl.int64)
        better = block_best < best
        rival = tl.where(better, block_rival, rival)
        best = tl.where(better, block_best, best)
        top = tl.maximum(top, s)
    value = tl.zeros((), ACC)
    if is_sample:  # the cross-entropy and its weights (softmax - (1 + lambda_pos) onehot) / N
        top_all = tl.max(top, 0)
        total = tl.zeros((BLOCK_M,), ACC)
        for m0 in range(0, M, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            s = tl.load(logits + cols, mask=cols < M, other=float("-inf")).to(ACC)
            total += tl.where(cols < M, tl.exp(s - top_all), 0.0)
        lse = top_all + tl.log(tl.sum(total, 0))
        value = (lse - own_logit) * per_sample
        for m0 in range(0, M, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            ok = cols < M
            s = tl.load(logits + cols, mask=ok, other=0.0).to(ACC)
            weight = tl.exp(s - lse) - tl.where(cols == own_col, 1 + lambda_pos, 0.0)
            tl.store(logits + cols, weight * per_sample, mask=ok)
    # Features: the positive term (samples) and the L_1/2 repulsion from the rival.
    positive = C + own_col * D
    opposite = C + rival * D
    pull = tl.zeros((BLOCK_D,), ACC)
    push = tl.zeros((BLOCK_D,), ACC)
    root_eps = tl.sqrt(eps)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        v = tl.load(features + cols, mask=ok, other=0.0).to(ACC)
        u = v - tl.load(opposite + cols, mask=ok, other=0.0).to(ACC)
        root = tl.sqrt(tl.abs(u) + eps)
        push += tl.where(ok & has_rival, root - root_eps, 0.0)
        g = tl.where(has_rival, tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0)) / (2 * root),
                     0.0)
        own = -negative * g
        if is_sample:
            c_pos = tl.load(positive + cols, mask=ok, other=0.0).to(ACC)
            pull += (v - c_pos) * (v - c_pos)
            own += lambda_pos * per_sample * v
            tl.store(SCATTER + (N + M + row) * D + cols, lambda_pos * per_sample * c_pos, mask=ok)
        tl.store(OWN + row * D + cols, own, mask=ok)
        tl.store(SCATTER + row * D + cols, negative * g, mask=ok)
    tl.store(TARGETS + row, rival)
    if is_sample:
        tl.store(TARGETS + N + M + row, own_col)
        value += lambda_pos * per_sample / 2 * tl.sum(pull, 0)
    value -= negative * tl.sum(push, 0)
    finish_sum(value, tl.full((), 1, tl.int32), LOSS, SCALE, PARTIAL, TICKETS, False,
               BLOCK_PARTIALS)


_launch_epilogue = launcher(_dpnp_epilogue_kernel)


def dpnp_epilogue(scores, gram, h, c, labels, lambda_pos, lambda_neg_sample, lambda_neg_class,
                  eps):
    """See reference/dpnp_loss.py (scores is overwritten with the weights)."""
    n, m = scores.shape
    d = h.shape[1]
    rows = n + m
    own, loss, scale, partial, tickets = loss_outputs(h, (rows, d), rows, rows, "sum")
    scatter = own.new_empty((rows + n, d))
    targets = labels.new_empty((rows + n,))
    _launch_epilogue((rows,), scores, gram, h, c, labels, own, scatter, targets, loss, scale,
                     partial, tickets, n, m, d, *float32_pair(lambda_pos),
                     *float32_pair(lambda_neg_sample), *float32_pair(lambda_neg_class),
                     *float32_pair(eps), ACC=accumulator(h.dtype), BLOCK_M=block(m, 1024),
                     BLOCK_D=block(d, 256), BLOCK_PARTIALS=BLOCK_PARTIALS,
                     num_warps=4 if max(m, d) >= 512 else 1)
    return loss, own, scatter, targets
