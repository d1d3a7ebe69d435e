"""sqdist in Triton: one tile kernel for ||x||^2 - 2 x.y + ||y||^2, one for its gradient.

The forward computes the x.y tile on tensor cores and the two norms from the same loaded tiles,
so x and y are read once per tile and the (N, M) output is written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._numerics import DIRECT_DEPTH
from ._common import (SUMS_OF_SQUARES, UPCAST_BF16, accumulator, block, cdiv, dot, fitted_config,
                      launcher, per_distinct_element, split_operands, tile_coordinates)

@triton.jit
def _sqdist_kernel(X, Y, X_LO, Y_LO, OUT, N, M, D, tiles_n, tiles_m,
                   sx_b, sx_n, sx_d, sy_b, sy_m, sy_d, so_b, so_n, so_m,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                   SPLIT: tl.constexpr, STREAM_STORES: tl.constexpr, DIRECT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   GROUP: tl.constexpr):
    """SPLIT: X, Y hold the TF32 high parts and X_LO, Y_LO the rest (3xTF32 from shared memory).
    DIRECT: sum((x - y)^2) on the CUDA cores, for shallow rows (protokernels/_numerics.py)."""
    b, tile_n, tile_m = tile_coordinates(tl.program_id(0), tiles_n, tiles_m, GROUP)
    rows_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if DIRECT:
        dist = _direct_tile(X, Y, b, rows_n, rows_m, N, M, D, sx_b, sx_n, sx_d, sy_b, sy_m, sy_d,
                            ACC, BLOCK_N, BLOCK_M)
    else:
        dist = _expanded_tile(X, Y, X_LO, Y_LO, b, rows_n, rows_m, N, M, D, sx_b, sx_n, sx_d,
                              sy_b, sy_m, sy_d, ACC, PRECISION, UPCAST_BF16, SPLIT, BLOCK_N,
                              BLOCK_M, BLOCK_D)
    out_ptrs = (OUT + b * so_b + rows_n.to(tl.int64)[:, None] * so_n
                + rows_m.to(tl.int64)[None, :] * so_m)
    mask = (rows_n[:, None] < N) & (rows_m[None, :] < M)
    if STREAM_STORES:  # the (N, M) output is not read again: keep x and y tiles in L2 instead
        tl.store(out_ptrs, dist.to(OUT.dtype.element_ty), mask=mask, cache_modifier=".cs")
    else:
        tl.store(out_ptrs, dist.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _direct_tile(X, Y, b, rows_n, rows_m, N, M, D, sx_b, sx_n, sx_d, sy_b, sy_m, sy_d,
                 ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """sum_d (x_nd - y_md)^2 for a tile, in the accumulate type: no cancellation."""
    x_rows = X + b * sx_b + rows_n.to(tl.int64) * sx_n
    y_rows = Y + b * sy_b + rows_m.to(tl.int64) * sy_m
    dist = tl.zeros((BLOCK_N, BLOCK_M), ACC)
    for d in range(0, D):
        xv = tl.load(x_rows + d * sx_d, mask=rows_n < N, other=0.0).to(ACC)
        yv = tl.load(y_rows + d * sy_d, mask=rows_m < M, other=0.0).to(ACC)
        diff = xv[:, None] - yv[None, :]
        dist += diff * diff
    return dist


@triton.jit
def _expanded_tile(X, Y, X_LO, Y_LO, b, rows_n, rows_m, N, M, D, sx_b, sx_n, sx_d, sy_b, sy_m,
                   sy_d, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """||x||^2 + ||y||^2 - 2 x.y for a tile (x.y on tensor cores, the norms from the same loaded
    tiles), clamped at 0."""
    cols = tl.arange(0, BLOCK_D)
    # 64-bit offsets: B*N*D, B*M*D and B*N*M may each pass 2**31, and so may column * stride of
    # a transposed input.
    x_offsets = b * sx_b + rows_n.to(tl.int64)[:, None] * sx_n + cols.to(tl.int64)[None, :] * sx_d
    y_offsets = b * sy_b + rows_m.to(tl.int64)[:, None] * sy_m + cols.to(tl.int64)[None, :] * sy_d
    acc = tl.zeros((BLOCK_N, BLOCK_M), ACC)
    x_norm = tl.zeros((BLOCK_N,), ACC)
    y_norm = tl.zeros((BLOCK_M,), ACC)
    for d0 in range(0, D, BLOCK_D):
        in_d = (d0 + cols)[None, :] < D
        x_mask = (rows_n[:, None] < N) & in_d
        y_mask = (rows_m[:, None] < M) & in_d
        x = tl.load(X + x_offsets, mask=x_mask, other=0.0)
        y = tl.load(Y + y_offsets, mask=y_mask, other=0.0)
        acc = dot(x, tl.trans(y), acc, PRECISION, UPCAST_BF16)
        xa = x.to(ACC)
        ya = y.to(ACC)
        if SPLIT:  # hi.lo^T + lo.hi^T; lo.lo^T is below float32 rounding
            x_lo = tl.load(X_LO + x_offsets, mask=x_mask, other=0.0)
            y_lo = tl.load(Y_LO + y_offsets, mask=y_mask, other=0.0)
            acc = dot(x, tl.trans(y_lo), acc, PRECISION, UPCAST_BF16)
            acc = dot(x_lo, tl.trans(y), acc, PRECISION, UPCAST_BF16)
            xa += x_lo
            ya += y_lo
        x_norm += tl.sum(xa * xa, 1)
        y_norm += tl.sum(ya * ya, 1)
        x_offsets += BLOCK_D * sx_d
        y_offsets += BLOCK_D * sy_d
    dist = x_norm[:, None] + y_norm[None, :] - 2.0 * acc
    return tl.where(dist < 0.0, 0.0, dist)  # keeps NaN, unlike tl.maximum


@triton.jit
def _sqdist_grad_kernel(G, A, B, OUT, R, S, D, tiles_r, tiles_d,
                        sg_b, sg_r, sg_s, sa_b, sa_r, sa_d, sb_b, sb_s, sb_d, so_b, so_r, so_d,
                        ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                        GROUP: tl.constexpr):
    """3xTF32 here is Triton's own: pre-splitting B and splitting G in registers measured no
    faster (2.74 vs 2.65 ms fwd+bwd "highest"), gy's transposed G dominates either way."""
    b, tile_r, tile_d = tile_coordinates(tl.program_id(0), tiles_r, tiles_d, GROUP)
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    inner = tl.arange(0, BLOCK_S)
    rows64, cols64, inner64 = rows.to(tl.int64), cols.to(tl.int64), inner.to(tl.int64)
    g_ptrs = G + b * sg_b + rows64[:, None] * sg_r + inner64[None, :] * sg_s
    b_ptrs = B + b * sb_b + inner64[:, None] * sb_s + cols64[None, :] * sb_d
    acc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    row_sum = tl.zeros((BLOCK_R,), ACC)
    for s0 in range(0, S, BLOCK_S):
        in_s = (s0 + inner) < S
        g = tl.load(g_ptrs, mask=(rows[:, None] < R) & in_s[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=in_s[:, None] & (cols[None, :] < D), other=0.0)
        acc = dot(g.to(B.dtype.element_ty), bt, acc, PRECISION, UPCAST_BF16)
        row_sum += tl.sum(g.to(ACC), 1)
        g_ptrs += BLOCK_S * sg_s
        b_ptrs += BLOCK_S * sb_s
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    a = tl.load(A + b * sa_b + rows64[:, None] * sa_r + cols64[None, :] * sa_d, mask=mask,
                other=0.0)
    grad = 2.0 * (row_sum[:, None] * a.to(ACC) - acc)
    tl.store(OUT + b * so_b + rows64[:, None] * so_r + cols64[None, :] * so_d,
             grad.to(OUT.dtype.element_ty), mask=mask)


# Launch configs by operand type, the fastest of scripts/tune_triton.py on the H100 at the spec's
# size (benchmarks/RESULTS.md, "Triton config sweep"). float64 keeps small tiles: its accumulators
# take twice the registers and DMMA is slow anyway.
_FORWARD = {
    # 0.317 ms tf32 (0.420 with 128x128 tiles); streaming stores: -2% on the 537 MB output.
    torch.float32: dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=32, num_warps=8, num_stages=3,
                        STREAM_STORES=True),
    # 3xTF32 loads four tiles per step: BLOCK_D 16 keeps 3 stages in shared memory (0.588 ms;
    # 0.676 with BLOCK_D 32).
    "tf32x3": dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=16, num_warps=8, num_stages=3,
                   STREAM_STORES=True),
    # 0.207 ms bf16 (0.260 with BLOCK_D 64).
    torch.float16: dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=32, num_warps=8, num_stages=3,
                        STREAM_STORES=False),
    torch.float64: dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=16, num_warps=4, num_stages=2,
                        STREAM_STORES=False),
}
_FORWARD[torch.bfloat16] = _FORWARD[torch.float16]
# (dtype, transpose) -> config. gx (transpose False) 0.252 ms tf32 with the K-major B copy
# (~1 ms without); gy 0.559 ms: float32 G must be transposed in registers there.
_GRAD = {
    (torch.float32, False): dict(BLOCK_R=128, BLOCK_S=64, BLOCK_D=128, num_warps=4, num_stages=2,
                                 TRANSPOSE_B=True),
    (torch.float32, True): dict(BLOCK_R=64, BLOCK_S=64, BLOCK_D=128, num_warps=4, num_stages=2,
                                TRANSPOSE_B=True),
    (torch.float16, False): dict(BLOCK_R=128, BLOCK_S=64, BLOCK_D=128, num_warps=8, num_stages=3,
                                 TRANSPOSE_B=False),
    (torch.float16, True): dict(BLOCK_R=128, BLOCK_S=128, BLOCK_D=128, num_warps=4, num_stages=2,
                                TRANSPOSE_B=False),
}
for _transpose in (False, True):
    _GRAD[torch.bfloat16, _transpose] = _GRAD[torch.float16, _transpose]
    _GRAD[torch.float64, _transpose] = dict(BLOCK_R=64, BLOCK_S=32, BLOCK_D=64, num_warps=4,
                                            num_stages=2, TRANSPOSE_B=False)


_launch_sqdist = launcher(_sqdist_kernel, **SUMS_OF_SQUARES)
_launch_sqdist_grad = launcher(_sqdist_grad_kernel)


def forward_config(n: int, m: int, d: int, dtype: torch.dtype, precision: str) -> dict:
    """The forward kernel's launch config."""
    return fitted_config(_FORWARD, dtype, precision, BLOCK_N=n, BLOCK_M=m, BLOCK_D=d)


def grad_config(r: int, s: int, d: int, dtype: torch.dtype, transpose: bool) -> dict:
    """The gradient kernel's launch config, its tiles shrunk to fit small problems."""
    config = dict(_GRAD[dtype, transpose])
    config["BLOCK_R"] = block(r, config["BLOCK_R"])
    config["BLOCK_S"] = block(s, config["BLOCK_S"])
    config["BLOCK_D"] = block(d, config["BLOCK_D"])
    return config


def sqdist(x: torch.Tensor, y: torch.Tensor, precision: str, config: dict | None = None
           ) -> torch.Tensor:
    """x (B, N, D), y (B, M, D) -> (B, N, M). `config` overrides forward_config()."""
    batch, n, d = x.shape
    m = y.shape[1]
    out = x.new_empty((batch, n, m))
    config = config or forward_config(n, m, d, x.dtype, precision)
    tiles_n = cdiv(n, config["BLOCK_N"])
    tiles_m = cdiv(m, config["BLOCK_M"])
    direct = d <= DIRECT_DEPTH
    split, precision, (x, x_lo), (y, y_lo) = split_operands(x, y, "ieee" if direct else precision)
    _launch_sqdist((batch * tiles_n * tiles_m,),
                   x, y, x_lo, y_lo, out, n, m, d, tiles_n, tiles_m, *x.stride(), *y.stride(),
                   *out.stride(), ACC=accumulator(x.dtype), PRECISION=precision,
                   UPCAST_BF16=UPCAST_BF16, SPLIT=split, DIRECT=direct, GROUP=8, **config)
    return out


def sqdist_grad(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transpose: bool,
                precision: str, config: dict | None = None) -> torch.Tensor:
    """2 (rowsum(G) a - G b) with G = grad (B, R, S), or grad^T if transpose.
    `config` overrides grad_config()."""
    g = grad.mT if transpose else grad
    batch, r, s = g.shape
    d = a.shape[-1]
    out = a.new_empty(a.shape)
    config = dict(config or grad_config(r, s, d, a.dtype, transpose))
    if config.pop("TRANSPOSE_B"):
        # A (S, D)-sized copy with S contiguous: the product's B operand is then K-major, which
        # float32 wgmma requires (half types can transpose in shared memory).
        (b,) = per_distinct_element(lambda u: (u.mT.contiguous().mT,), b)
    tiles_r, tiles_d = cdiv(r, config["BLOCK_R"]), cdiv(d, config["BLOCK_D"])
    _launch_sqdist_grad(
        (batch * tiles_r * tiles_d,), g, a, b, out, r, s, d, tiles_r, tiles_d, *g.stride(),
        *a.stride(), *b.stride(), *out.stride(), ACC=accumulator(a.dtype), PRECISION=precision,
        UPCAST_BF16=UPCAST_BF16, GROUP=8, **config)
    return out
