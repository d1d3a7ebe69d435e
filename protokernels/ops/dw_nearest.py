"""protokernels::dw_nearest and dw_quantize: the search and the quantization step of depthwise
vector quantization (depthwise-vector-quantization..., §3; VQ-VAE eq. 2).

Group g of each feature vector, x[..., g*Dg:(g+1)*Dg], is matched against its own codebook
codebooks[g] (K, Dg). That is the batched nearest search with the group as the batch dimension:
x (N, G*Dg) viewed in place as (G, N, Dg) (batch stride Dg, row stride G*Dg) against codebooks
(G, K, Dg). So every backend runs its `nearest` kernel (nearest.py / nearest.cu): one launch for
all groups, no (N, G, K) distance tensor and no copy of x, and the search, its NaN rules and its
gradient (protokernels::gather_sqdist_grad) exist once.

dw_quantize is dw_nearest followed by codebook_lookup in one call: the kernel that computes the
winner's exact distance reads the winning code anyway and writes it out as the quantized vector.
Its reason is the host time of the in-model sizes (N 8192, K 512), where the two public calls
cost more than their GPU work (RESULTS.md "One call for the VQ step").
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from ._registry import custom_op
from .codebook_lookup import codes_gradient
from .nearest import _NEAREST, new_results, pair_grads


def _grouped(x: Tensor, groups: int, depth: int) -> Tensor:
    """x (N, G*Dg) as (G, N, Dg), a view (one as_strided: half the host time of unflatten and
    transpose, and a call here makes four of them)."""
    row, col = x.stride()
    return x.as_strided((groups, x.shape[0], depth), (depth * col, row, col), x.storage_offset())


def _new_quantized(x: Tensor, codebooks: Tensor, quantize: bool = True) -> Tensor:
    rows = x.shape[0] if quantize else 0
    return codebooks.new_empty((rows, codebooks.shape[0] * codebooks.shape[2]))


# A backend's whole dw_nearest / dw_quantize call where it has one (CUDA: one C++ call that makes
# the group views and allocates the outputs itself); the others run their nearest kernel below.
_WHOLE_CALL = _backend.Implementations("nearest", "dw_nearest", optional=True)


def _search(x: Tensor, codebooks: Tensor, precision: str, backend: str,
            quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, G*Dg), codebooks (G, K >= 1, Dg) -> quantized (N, G*Dg) (the winning codes; (0,
    G*Dg) without `quantize`), dist, idx (N, G)."""
    whole = _WHOLE_CALL[backend]
    if whole is not None:
        return whole(x, codebooks, precision, quantize)
    groups, _, depth = codebooks.shape
    quantized = _new_quantized(x, codebooks, quantize)
    dist, idx = new_results(x, (x.shape[0], groups))
    if dist.numel() > 0:  # nearest's kernels fill the (G, N, .) views of the (N, G, .) outputs
        _NEAREST[backend](_grouped(x, groups, depth), codebooks, None, 1, precision,
                          _grouped(dist, groups, 1), _grouped(idx, groups, 1),
                          _grouped(quantized, groups, depth) if quantize else None)
    return quantized, dist, idx


@custom_op("dw_nearest")
def _dw_nearest(x: Tensor, codebooks: Tensor, precision: str,
                backend: str) -> tuple[Tensor, Tensor]:
    """x (N, G*Dg), codebooks (G, K >= 1, Dg) -> dist, idx (N, G)."""
    _, dist, idx = _search(x, codebooks, precision, backend, quantize=False)
    return dist, idx


@_dw_nearest.register_fake
def _(x, codebooks, precision, backend):
    return new_results(x, (x.shape[0], codebooks.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codebooks, _, ctx.backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, codebooks, output[1])


def _backward(ctx, grad_dist, _grad_idx):
    x, codebooks, idx = ctx.saved_tensors
    return *_distance_grads(grad_dist, x, codebooks, idx, ctx.backend), None, None


_dw_nearest.register_autograd(_backward, setup_context=_setup_context)


def _distance_grads(grad_dist, x, codebooks, idx, backend):
    """(grad_x (N, G*Dg), grad_codebooks) of the winners' distances dist (N, G)."""
    groups, _, depth = codebooks.shape
    grad_x, grad_codebooks = pair_grads(grad_dist.t()[..., None], _grouped(x, groups, depth),
                                        codebooks, idx.t()[..., None], backend)
    return grad_x.transpose(0, 1).reshape(x.shape), grad_codebooks


def dw_nearest(x: Tensor, codebooks: Tensor, *,
               precision: str | None = None) -> tuple[Tensor, Tensor]:
    """Depthwise vector quantization's search: the nearest code of each group's own codebook.

    x (..., G*Dg), codebooks (G, K, Dg) -> (dist, idx), both (..., G): for group g, idx[..., g] is
    the code of codebooks[g] nearest to x[..., g*Dg:(g+1)*Dg] and dist[..., g] its squared
    Euclidean distance (float32; float64 for float64 input), computed exactly for the winner.
    G = 1 is plain VQ. All groups are searched in one launch, without an (N, G, K) distance
    tensor. Ranking as in `nearest`: ties go to the smaller index, a NaN slice gets a NaN distance
    (it ranks first, like torch.argmin), a code with an infinite entry ranks after every finite
    one. `precision` as in sqdist: it sets how codes are ranked. dist is differentiable w.r.t. x
    and codebooks; the gradient reaches only the winning codes.
    """
    op = "dw_nearest"
    _validate.floating(op, x=x, codebooks=codebooks)
    groups, size, depth = _validate.codebooks(op, codebooks)
    _validate.grouped_features(op, x, groups, depth)
    flat = _validate.rows_of(x)
    precision = _backend.resolve_precision(op, precision, x.dtype)
    backend = _backend.resolve(op, x.device, x.dtype, precision, rows=size, n=flat.shape[0],
                               m=size, d=depth, batch=groups)
    dist, idx = _dw_nearest(flat, codebooks, precision, backend)
    shape = x.shape[:-1] + (groups,)
    # codebook_lookup / codebook_stats of these indices need no range check (a device sync).
    return dist.view(shape), _validate.produced_in_range(idx.view(shape), size)


@custom_op("dw_quantize")
def _dw_quantize(x: Tensor, codebooks: Tensor, precision: str, deterministic: bool,
                 backend: str, scatter_backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, G*Dg), codebooks (G, K >= 1, Dg) -> quantized (N, G*Dg), dist, idx (N, G).
    `deterministic` and `scatter_backend` are the backward's (the codebook gradient's
    scatter-add, codebook_stats)."""
    return _search(x, codebooks, precision, backend, quantize=True)


@_dw_quantize.register_fake
def _(x, codebooks, precision, deterministic, backend, scatter_backend):
    return (_new_quantized(x, codebooks), *new_results(x, (x.shape[0], codebooks.shape[0])))


def _setup_quantize(ctx, inputs, output):
    x, codebooks, _, ctx.deterministic, ctx.backend, ctx.scatter_backend = inputs
    ctx.mark_non_differentiable(output[2])
    # An output the loss does not use passes None (no gradient kernel for it): with EMA codebooks
    # only dist's gradient flows, with a codebook loss both.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, codebooks, output[2])


def _backward_quantize(ctx, grad_quantized, grad_dist, _grad_idx):
    x, codebooks, idx = ctx.saved_tensors
    grad_x = grad_codebooks = None
    if grad_dist is not None:
        grad_x, grad_codebooks = _distance_grads(grad_dist, x, codebooks, idx, ctx.backend)
    if grad_quantized is not None and ctx.needs_input_grad[1]:
        sums = codes_gradient(grad_quantized, idx, codebooks.shape, codebooks.dtype,
                              ctx.deterministic, ctx.scatter_backend)
        grad_codebooks = sums if grad_codebooks is None else grad_codebooks + sums
    return grad_x, grad_codebooks, None, None, None, None


_dw_quantize.register_autograd(_backward_quantize, setup_context=_setup_quantize)


def dw_quantize(x: Tensor, codebooks: Tensor, *, precision: str | None = None,
                deterministic: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Depthwise vector quantization's whole step in one call: (quantized, idx, dist).

    The same as `dist, idx = dw_nearest(x, codebooks)` followed by
    `quantized = codebook_lookup(idx, codebooks)`, at the host cost of one call and without the
    lookup's launch: x (..., G*Dg), codebooks (G, K, Dg) -> quantized (..., G*Dg) in the
    codebooks' dtype (group g of each vector replaced by its nearest code of codebooks[g]),
    idx (..., G) int64 and dist (..., G), the exact squared distance to it (float32; float64 for
    float64 input). Ranking, NaN rules and `precision` as in dw_nearest. Differentiable:
    dist w.r.t. x and the codebooks (as dw_nearest's), quantized w.r.t. the codebooks (as
    codebook_lookup's: a scatter-add into the chosen codes, with atomics unless `deterministic`;
    None: torch.are_deterministic_algorithms_enabled()). For straight-through training, pass
    the quantized vectors' gradient to x yourself (VectorQuantizer does).
    """
    op = "dw_quantize"
    _validate.floating(op, x=x, codebooks=codebooks)
    groups, size, depth = _validate.codebooks(op, codebooks)
    _validate.grouped_features(op, x, groups, depth)
    flat = _validate.rows_of(x)
    n = flat.shape[0]
    precision = _backend.resolve_precision(op, precision, x.dtype)
    backend = _backend.resolve(op, x.device, x.dtype, precision, rows=size, n=n, m=size, d=depth,
                               batch=groups)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # The scatter of the codes' gradient (codebook_stats), when one will run.
    scatter_backend = (_backend.resolve("codebook_stats", x.device, x.dtype, n=n, m=size,
                                        batch=groups, d=depth)
                       if _backend.wants_grad(codebooks) else backend)
    quantized, dist, idx = _dw_quantize(flat, codebooks, precision, bool(deterministic), backend,
                                        scatter_backend)
    if x.dim() != 2:  # (views cost host time: none for the usual (N, G*Dg) input)
        shape = x.shape[:-1] + (groups,)
        quantized, idx, dist = quantized.view(x.shape), idx.view(shape), dist.view(shape)
    # codebook_lookup / codebook_stats of these indices need no range check (a device sync).
    return quantized, _validate.produced_in_range(idx, size), dist
