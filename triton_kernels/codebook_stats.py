"""codebook_stats in Triton: per-code counts and sums of the rows assigned to each code.

Default: a program takes a block of rows of one group and adds them into their codes' sums with
relaxed atomics (fast; the order of the float additions, hence the last bits, varies between
runs). Deterministic: the rows of each group are sorted by code (stable, torch.sort), and a
program sums one code's segment in row order, so each sum is the same every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import accumulator, block, cdiv, launcher


@triton.jit
def _scatter_kernel(X, IDX, COUNTS, SUMS, N, G, K, D, sx_n, sx_f,
                    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """COUNTS (G, K) and SUMS (G, K, D) zeroed, contiguous; out-of-range codes are ignored."""
    pid = tl.program_id(0)
    g = (pid % G).to(tl.int64)
    rows = (pid // G).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    code = tl.load(IDX + rows * G + g, mask=row_ok, other=-1)
    valid = row_ok & (code >= 0) & (code < K)
    slot = g * K + code
    tl.atomic_add(COUNTS + slot, tl.full((BLOCK_N,), 1, tl.int64), mask=valid, sem="relaxed")
    src = X + rows * sx_n + g * D * sx_f
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = valid[:, None] & (ds[None, :] < D)
        v = tl.load(src[:, None] + ds[None, :] * sx_f, mask=mask, other=0.0).to(ACC)
        tl.atomic_add(SUMS + slot[:, None] * D + ds[None, :], v, mask=mask, sem="relaxed")


@triton.jit
def _segment_kernel(X, ORDER, OFFSETS, SUMS, N, K, D, sx_n, sx_f,
                    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """SUMS[g, k, d-block] = the sum, in row order, of the rows ORDER[g, OFFSETS[g, k]:
    OFFSETS[g, k + 1]] (rows sorted by code, stably)."""
    slot = tl.program_id(0).to(tl.int64)  # g * K + k
    g = slot // K
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ds64 = ds.to(tl.int64)
    start = tl.load(OFFSETS + slot + g)  # OFFSETS is (G, K + 1)
    end = tl.load(OFFSETS + slot + g + 1)
    total = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for r0 in range(start, end, BLOCK_N):
        at = r0 + tl.arange(0, BLOCK_N)
        ok = at < end
        rows = tl.load(ORDER + g * N + at, mask=ok, other=0)
        total += tl.load(X + rows[:, None] * sx_n + (g * D + ds64)[None, :] * sx_f,
                         mask=ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
    tl.store(SUMS + slot * D + ds64, tl.sum(total, 0), mask=d_ok)


_launch_scatter = launcher(_scatter_kernel)
_launch_segment = launcher(_segment_kernel)


def codebook_stats(x, idx, size, deterministic):
    """x (N, G*Dg), idx (N, G) -> sums (G, K, Dg) float32 (float64), counts (G, K) int64."""
    n, groups = idx.shape
    depth = x.shape[1] // groups
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = accumulator(x.dtype)
    block_d = block(depth, 128)
    if not deterministic:
        counts = torch.zeros((groups, size), dtype=torch.int64, device=x.device)
        sums = torch.zeros((groups, size, depth), dtype=acc_dtype, device=x.device)
        block_n = max(1, 4096 // block_d)
        _launch_scatter((cdiv(n, block_n) * groups,), x, idx, counts, sums, n, groups, size,
                        depth, *x.stride(), ACC=acc, BLOCK_N=block_n, BLOCK_D=block_d,
                        num_warps=4)
        return sums, counts
    codes, order = idx.t().contiguous().sort(dim=1, stable=True)
    bounds = torch.arange(size + 1, device=x.device).expand(groups, size + 1).contiguous()
    offsets = torch.searchsorted(codes, bounds)  # out-of-range codes fall outside [0, K)
    sums = torch.empty((groups, size, depth), dtype=acc_dtype, device=x.device)
    if depth > 0:
        _launch_segment((groups * size, cdiv(depth, block_d)), x, order, offsets, sums, n, size,
                        depth, *x.stride(), ACC=acc, BLOCK_N=32, BLOCK_D=block_d, num_warps=4)
    return sums, offsets.diff(dim=1)
