"""sqdist in plain PyTorch: ||x||^2 - 2 x.y + ||y||^2, clamped at 0 (sum((x - y)^2) for at most
DIRECT_DEPTH features), tile by tile.

Products run at the requested float32 precision ("tf32" lets matmul use TF32; "ieee" and "tf32x3"
run it in full float32); float16/bfloat16 are computed in float32 and rounded once at the end.
"""
from __future__ import annotations

import torch

from .._backend import matmul_precision
from .._numerics import DIRECT_DEPTH, accumulate_dtype
from ._scratch import ranges, tile_sizes


def sqdist(x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """x (B, N, D), y (B, M, D) -> (B, N, M)."""
    batch, n, d = x.shape
    m = y.shape[1]
    out = x.new_empty((batch, n, m))
    acc = accumulate_dtype(x.dtype)
    size = acc.itemsize
    if d <= DIRECT_DEPTH:  # sum((x - y)^2): no cancellation (protokernels/_numerics.py)
        tile = tile_sizes({"b": batch, "n": n, "m": m},
                          lambda b, n, m: size * b * ((n + m) * d + 2 * n * m * d))
        for b0, b1 in ranges(batch, tile["b"]):
            for n0, n1 in ranges(n, tile["n"]):
                for m0, m1 in ranges(m, tile["m"]):
                    diff = (x[b0:b1, n0:n1, None, :].to(acc)
                            - y[b0:b1, None, m0:m1, :].to(acc))
                    out[b0:b1, n0:n1, m0:m1] = diff.square_().sum(-1)
        return out
    # Per tile: x and y rows upcast, their norms, the product and the distance tile.
    tile = tile_sizes({"b": batch, "n": n, "m": m},
                      lambda b, n, m: size * b * ((n + m) * (d + 1) + 2 * n * m))
    with matmul_precision(precision):
        for b0, b1 in ranges(batch, tile["b"]):
            for n0, n1 in ranges(n, tile["n"]):
                xs = x[b0:b1, n0:n1].to(acc)
                x_norm = xs.square().sum(-1, keepdim=True)
                for m0, m1 in ranges(m, tile["m"]):
                    ys = y[b0:b1, m0:m1].to(acc)
                    y_norm = ys.square().sum(-1).unsqueeze(-2)
                    dist = torch.baddbmm(y_norm, xs, ys.mT, alpha=-2).add_(x_norm).clamp_min_(0)
                    out[b0:b1, n0:n1, m0:m1] = dist
    return out


def sqdist_grad(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transpose: bool,
                precision: str) -> torch.Tensor:
    """2 (rowsum(G) a - G b) with G = grad (B, R, S), or grad^T if transpose; a (B, R, D), b (B, S, D).

    This is d/dx of sqdist (G = grad, a = x, b = y) and d/dy (G = grad^T, a = y, b = x).
    """
    g = grad.mT if transpose else grad
    batch, r, s = g.shape
    d = a.shape[-1]
    out = a.new_empty(a.shape)
    acc = accumulate_dtype(a.dtype)
    size = acc.itemsize
    tile = tile_sizes({"b": batch, "r": r, "s": s},
                      lambda b, r, s: size * b * (2 * r * (d + 1) + s * (d + r)))
    with matmul_precision(precision):
        for b0, b1 in ranges(batch, tile["b"]):
            for r0, r1 in ranges(r, tile["r"]):
                total = torch.zeros((b1 - b0, r1 - r0, d), dtype=acc, device=a.device)
                row_sum = torch.zeros((b1 - b0, r1 - r0, 1), dtype=acc, device=a.device)
                for s0, s1 in ranges(s, tile["s"]):
                    gs = g[b0:b1, r0:r1, s0:s1].to(acc)
                    total.baddbmm_(gs, b[b0:b1, s0:s1].to(acc))
                    row_sum += gs.sum(-1, keepdim=True)
                out[b0:b1, r0:r1] = (row_sum * a[b0:b1, r0:r1].to(acc) - total).mul_(2)
    return out
