"""protokernels::codebook_stats: per-code counts and sums of the vectors assigned to each code, in
one pass (the statistics of VQ-VAE's EMA update, eq. 6-8 of its appendix, and of k-means).

counts[g, k] = #{n : idx[n, g] = k}, sums[g, k] = sum of x[n, g*Dg:(g+1)*Dg] over those n. The
kernels scatter with atomics (float32 adds: the order, hence the last bits, vary between runs)
unless `deterministic`, where each code's sum is taken in a fixed order. The sums' gradient
w.r.t. x is a codebook_lookup of it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from .._numerics import accumulate_dtype
from ._registry import custom_op
from .codebook_lookup import _codebook_lookup

_STATS = _backend.Implementations("codebook_stats", "codebook_stats")


def _new_stats(x: Tensor, groups: int, size: int, depth: int) -> tuple[Tensor, Tensor]:
    return (x.new_empty((groups, size, depth), dtype=accumulate_dtype(x.dtype)),
            x.new_empty((groups, size), dtype=torch.int64))


@custom_op("codebook_stats")
def _codebook_stats(x: Tensor, idx: Tensor, size: int, deterministic: bool,
                    backend: str) -> tuple[Tensor, Tensor]:
    """x (N, G*Dg), idx (N, G) int64 -> sums (G, K, Dg) float32/float64, counts (G, K) int64.
    (Sums first: opcheck's autograd check adds the outputs up in the first one's dtype.)"""
    groups = idx.shape[1]
    depth = x.shape[1] // groups if groups else 0
    if x.shape[0] == 0 or groups * size == 0:
        sums, counts = _new_stats(x, groups, size, depth)
        return sums.zero_(), counts.zero_()
    return _STATS[backend](x, idx, size, deterministic)


@_codebook_stats.register_fake
def _(x, idx, size, deterministic, backend):
    groups = idx.shape[1]
    return _new_stats(x, groups, size, x.shape[1] // groups if groups else 0)


def _setup_context(ctx, inputs, output):
    x, idx, _, ctx.deterministic, ctx.backend = inputs
    ctx.dtype = x.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(idx)


def _backward(ctx, grad_sums, _grad_counts):
    (idx,) = ctx.saved_tensors
    grad_x = _codebook_lookup(idx, grad_sums, ctx.deterministic, ctx.backend)
    return grad_x.to(ctx.dtype), None, None, None, None


_codebook_stats.register_autograd(_backward, setup_context=_setup_context)


def codebook_stats(x: Tensor, idx: Tensor, size: int, *,
                   deterministic: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-code counts and sums of the vectors assigned to each code, in one pass: the
    statistics of an EMA codebook update or a k-means step.

    x (..., G*Dg) floating, idx (..., G) integer in [0, size), size = K > 0 ->
    (counts (G, K) int64, sums (G, K, Dg)): counts[g, k] is how many rows chose code k in group g,
    sums[g, k] the sum of their group-g slices, in float32 (float64 for float64 x) whatever x's
    dtype, so that half-precision inputs do not overflow. Atomics unless `deterministic` (None:
    torch.are_deterministic_algorithms_enabled()). sums is differentiable w.r.t. x.
    """
    op = "codebook_stats"
    _validate.floating(op, x=x)
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"{op}: argument 'size' (K, the number of codes) must be an int, got "
                        f"{type(size).__name__}")
    if size <= 0:
        raise ValueError(f"{op}: argument 'size' (K, the number of codes) must be positive, "
                         f"got {size}")
    _validate.min_rank(op, "x", x, 1, "(..., G*Dg)")
    # G comes from idx; code_indices checks idx's type, dtype, device and values first.
    groups = idx.shape[-1] if isinstance(idx, torch.Tensor) and idx.dim() > 0 else 1
    flat_idx = _validate.code_indices(op, "idx", idx, "x", x, groups, size)
    if (x.shape[-1] % groups) if groups else x.shape[-1]:  # G = 0 groups: no features either
        raise ValueError(f"{op}: the last dimension of 'x' must split into G = {groups} equal "
                         f"groups (idx's last dimension), got x {tuple(x.shape)} and idx "
                         f"{tuple(idx.shape)}")
    if idx.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: 'x' (..., G*Dg) and 'idx' (..., G) must have the same leading "
                         f"dimensions, got x {tuple(x.shape)} and idx {tuple(idx.shape)}")
    return stats_of_checked_indices(_validate.rows_of(x), flat_idx, size, deterministic)


def stats_of_checked_indices(x: Tensor, idx: Tensor, size: int,
                             deterministic: bool | None) -> tuple[Tensor, Tensor]:
    """codebook_stats of x (N, G*Dg) with indices known to be valid (int64 (N, G), contiguous,
    in range: e.g. dw_nearest's), without the range check's device sync."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    groups = idx.shape[1]
    backend = _backend.resolve("codebook_stats", x.device, x.dtype, n=x.shape[0], m=size,
                               batch=groups, d=x.shape[1] // groups if groups else 0)
    sums, counts = _codebook_stats(x, idx, size, bool(deterministic), backend)
    return counts, sums
