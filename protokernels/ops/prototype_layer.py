"""protokernels::prototype_layer: the case-based prototype layer's forward in one op
(case-based-reasoning-prototype-layer, eq. 3-6): the (N, M) squared distances of the encoded
inputs to the prototypes (sqdist's kernel; the classifier's input) and, from the same matrix, the
regularizers R1 = mean_j min_i d_ij and R2 = mean_i min_j d_ij. The backward adds the
regularizers' gradients to the distances' at the minima and runs sqdist's gradient kernels once.

Why one op: the layer's step through the public ops (sqdist, nearest_both, two means) computed
the distances twice and was two searches' worth of autograd nodes: 0.70-0.96x the compiled
naive head at two of three in-model sizes (RESULTS.md "DPNP in one op").
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from ._registry import custom_op
from .sqdist import sqdist_grads

_SQDIST = _backend.Implementations("sqdist", "sqdist")


@custom_op("prototype_layer")
def _prototype_layer(z: Tensor, prototypes: Tensor, precision: str,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """z (N >= 1, D), prototypes (M >= 1, D) -> (dist, r1, r2, row_argmin, col_argmin)."""
    if z.shape[1] == 0:
        dist = z.new_zeros((z.shape[0], prototypes.shape[0]))
    else:
        dist = _SQDIST[backend](z[None], prototypes[None], precision)[0]
    row_min, row_arg = dist.min(1)
    col_min, col_arg = dist.min(0)
    return dist, col_min.mean(), row_min.mean(), row_arg, col_arg


@_prototype_layer.register_fake
def _(z, prototypes, precision, backend):
    n, m = z.shape[0], prototypes.shape[0]
    return (z.new_empty((n, m)), z.new_empty(()), z.new_empty(()),
            z.new_empty((n,), dtype=torch.int64), z.new_empty((m,), dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    z, prototypes, ctx.precision, ctx.backend = inputs
    _, _, _, row_arg, col_arg = output
    ctx.mark_non_differentiable(row_arg, col_arg)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, prototypes, row_arg, col_arg)


def _backward(ctx, grad_dist, grad_r1, grad_r2, _grad_row_arg, _grad_col_arg):
    z, prototypes, row_arg, col_arg = ctx.saved_tensors
    n, m = z.shape[0], prototypes.shape[0]
    grad = (torch.zeros((n, m), dtype=z.dtype, device=z.device) if grad_dist is None
            else grad_dist.to(z.dtype, memory_format=torch.contiguous_format, copy=True))
    flat = grad.view(-1)
    # Each row's and each column's minimum gets its regularizer's 1/N or 1/M: one index_add_
    # into the flat matrix each (atomics, no sort: index_put_'s accumulate sorts).
    if grad_r2 is not None:
        at = torch.arange(0, n * m, m, device=z.device) + row_arg
        flat.index_add_(0, at, (grad_r2 / n).to(z.dtype).expand(n))
    if grad_r1 is not None:
        at = col_arg * m + torch.arange(m, device=z.device)
        flat.index_add_(0, at, (grad_r1 / m).to(z.dtype).expand(m))
    grad_z, grad_p = sqdist_grads(grad[None], z[None], prototypes[None], ctx.precision,
                                  ctx.backend, ctx.needs_input_grad[:2])
    return (None if grad_z is None else grad_z[0], None if grad_p is None else grad_p[0], None,
            None)


_prototype_layer.register_autograd(_backward, setup_context=_setup_context)


def prototype_layer(z: Tensor, prototypes: Tensor, *,
                    precision: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The case-based prototype layer of encoded inputs z (N, D) and prototypes (M >= 1, D) ->
    (distances, R1, R2):

        distances d_ij = ||z_i - p_j||^2 (N, M), as protokernels.sqdist (the classifier's input),
        R1 = mean_j min_i d_ij (every prototype near some input, eq. 5),
        R2 = mean_i min_j d_ij (every input near some prototype, eq. 6),

    all in z's dtype, from one distance kernel (`precision` as in sqdist); R1 = R2 = 0 for an
    empty batch. Gradients reach z and the prototypes from all three; a regularizer's gradient
    goes to its minimum (one of them where several are equal). NaN in gives NaN.
    """
    op = "prototype_layer"
    _validate.floating(op, z=z, prototypes=prototypes)
    n, d = _validate.matrix(op, "z", z, "(N, D)")
    m, dp = _validate.matrix(op, "prototypes", prototypes, "(M, D)")
    if d != dp:
        raise ValueError(f"{op}: 'z' and 'prototypes' must have the same feature size, got {d} "
                         f"and {dp}")
    if m == 0:
        raise ValueError(f"{op}: 'prototypes' has no rows (M = 0); got {tuple(prototypes.shape)}")
    if n == 0:  # nothing to be near: no distances, regularizers 0 (with a gradient of 0)
        zero = prototypes.sum() * 0 + z.sum() * 0
        return z.new_empty((0, m)) + zero, zero, zero
    precision = _backend.resolve_precision(op, precision, z.dtype)
    backend = _backend.resolve(op, z.device, z.dtype, precision, n=n, m=m, d=d,
                               grad=_backend.wants_grad(z, prototypes))
    dist, r1, r2, _, _ = _prototype_layer(z, prototypes, precision, backend)
    return dist, r1, r2
