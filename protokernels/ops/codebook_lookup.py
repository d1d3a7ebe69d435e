"""protokernels::codebook_lookup: the quantized vectors of depthwise VQ (VQ-VAE eq. 2).

out[n, g*Dg:(g+1)*Dg] = codebooks[g, idx[n, g]]. Lookup and codebook_stats' sums are each
other's adjoint, so each one's backward is the other op: the gradient w.r.t. the codebooks is the
per-code sum of the incoming gradient (a scatter-add, deterministic on request), and the gradient
of codebook_stats' sums w.r.t. x is a lookup.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from ._registry import custom_op

_LOOKUP = _backend.Implementations("codebook_lookup", "codebook_lookup")


@custom_op("codebook_lookup")
def _codebook_lookup(idx: Tensor, codebooks: Tensor, deterministic: bool, backend: str) -> Tensor:
    """idx (N, G) int64, codebooks (G, K, Dg) -> (N, G*Dg). `deterministic` is the backward's."""
    groups, _, depth = codebooks.shape
    out = codebooks.new_empty((idx.shape[0], groups * depth))
    if out.numel() > 0:
        _LOOKUP[backend](idx, codebooks, out)
    return out


@_codebook_lookup.register_fake
def _(idx, codebooks, deterministic, backend):
    return codebooks.new_empty((idx.shape[0], codebooks.shape[0] * codebooks.shape[2]))


def _setup_context(ctx, inputs, output):
    idx, codebooks, ctx.deterministic, ctx.backend = inputs
    ctx.shape, ctx.dtype = codebooks.shape, codebooks.dtype
    ctx.save_for_backward(idx)


def codes_gradient(grad: Tensor, idx: Tensor, shape, dtype: torch.dtype, deterministic: bool,
                   backend: str) -> Tensor:
    """The lookup's adjoint: the gradient w.r.t. codebooks of `shape` and `dtype` of a lookup by
    idx (N, G) whose output received `grad` (N, G*Dg): each code's sum of its rows' gradients
    (codebook_stats' sums, run on `backend`). Also dw_quantize's, for its quantized vectors."""
    from .codebook_stats import _codebook_stats  # each op's backward is the other op

    sums, _ = _codebook_stats(grad, idx, shape[1], deterministic, backend)
    # reshape: with G = 0 groups the statistics cannot know Dg (their (0, K, 0) is empty too)
    return sums.to(dtype).reshape(shape)


def _backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return (None, codes_gradient(grad, idx, ctx.shape, ctx.dtype, ctx.deterministic, ctx.backend),
            None, None)


_codebook_lookup.register_autograd(_backward, setup_context=_setup_context)


def codebook_lookup(idx: Tensor, codebooks: Tensor, *, deterministic: bool | None = None) -> Tensor:
    """The codes chosen by idx, concatenated over groups: the quantized vectors.

    idx (..., G) integer, each in [0, K); codebooks (G, K, Dg) -> (..., G*Dg) in the codebooks'
    dtype, out[..., g*Dg:(g+1)*Dg] = codebooks[g, idx[..., g]]. Differentiable w.r.t. codebooks:
    the backward scatter-adds the gradient into the chosen codes (codebook_stats' sums of it).
    The scatter uses atomics unless `deterministic` (None: torch.are_deterministic_algorithms_
    enabled()), which makes it bitwise reproducible at some cost in speed.
    """
    op = "codebook_lookup"
    _validate.floating(op, codebooks=codebooks)
    groups, size, depth = _validate.codebooks(op, codebooks)
    flat = _validate.code_indices(op, "idx", idx, "codebooks", codebooks, groups, size)
    out = lookup_checked_indices(flat, codebooks, deterministic)
    return out.view(idx.shape[:-1] + (groups * depth,))


def lookup_checked_indices(idx: Tensor, codebooks: Tensor, deterministic: bool | None) -> Tensor:
    """codebook_lookup of indices known to be valid (int64 (N, G), contiguous, in range: e.g.
    dw_nearest's), without the range check's device sync (0.25 ms per VQ step on the H100)."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    backend = _backend.resolve("codebook_lookup", codebooks.device, codebooks.dtype,
                               n=idx.shape[0], batch=codebooks.shape[0], d=codebooks.shape[2])
    return _codebook_lookup(idx, codebooks, bool(deterministic), backend)
