"""protokernels::dw_nearest: the search of depthwise vector quantization
(depthwise-vector-quantization..., §3; VQ-VAE eq. 2).

Group g of each feature vector, x[..., g*Dg:(g+1)*Dg], is matched against its own codebook
codebooks[g] (K, Dg). That is the batched nearest search with the group as the batch dimension:
x (N, G*Dg) viewed in place as (G, N, Dg) (batch stride Dg, row stride G*Dg) against codebooks
(G, K, Dg). So every backend runs its `nearest` kernel (nearest.py / nearest.cu): one launch for
all groups, no (N, G, K) distance tensor and no copy of x, and the search, its NaN rules and its
gradient (protokernels::gather_sqdist_grad) exist once.
"""
from __future__ import annotations

from torch import Tensor

from .. import _backend, _validate
from ._registry import custom_op
from .nearest import _NEAREST, new_results, pair_grads


def _grouped(x: Tensor, groups: int, depth: int) -> Tensor:
    """x (N, G*Dg) as (G, N, Dg), a view."""
    return x.unflatten(1, (groups, depth)).transpose(0, 1)


@custom_op("dw_nearest")
def _dw_nearest(x: Tensor, codebooks: Tensor, precision: str,
                backend: str) -> tuple[Tensor, Tensor]:
    """x (N, G*Dg), codebooks (G, K >= 1, Dg) -> dist, idx (N, G)."""
    groups, _, depth = codebooks.shape
    dist, idx = new_results(x, (x.shape[0], groups))
    if dist.numel() > 0:  # nearest's kernels fill the (G, N, 1) views of the (N, G) results
        _NEAREST[backend](_grouped(x, groups, depth), codebooks, None, 1, precision,
                          dist.t()[..., None], idx.t()[..., None])
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
    groups, _, depth = codebooks.shape
    grad_x, grad_codebooks = pair_grads(grad_dist.t()[..., None], _grouped(x, groups, depth),
                                        codebooks, idx.t()[..., None], ctx.backend)
    return grad_x.transpose(0, 1).reshape(x.shape), grad_codebooks, None, None


_dw_nearest.register_autograd(_backward, setup_context=_setup_context)


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
