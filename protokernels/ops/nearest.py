"""protokernels::nearest, nearest_by_label, nearest_both: fused nearest-prototype search.

Winner-takes-all (prototype-layers... eq. 3), GLVQ's d+ and d- (eq. 20), DPNP's nearest rival
(eq. 6 and 8) and the R1/R2 regularizers' two-way nearest (case-based-reasoning... eq. 5-6),
without the (N, M) distance matrix. The returned distances are differentiable: the gradient of
dist = ||x_i - y_j||^2 reaches only the winning pairs (protokernels::gather_sqdist_grad).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _validate
from .._numerics import accumulate_dtype
from ._registry import custom_op

MAX_K = 64
_NEAREST = _backend.Implementations("nearest", "nearest")
_BY_LABEL = _backend.Implementations("nearest", "nearest_by_label")
_BOTH = _backend.Implementations("nearest", "nearest_both")
_GATHER_GRAD = _backend.Implementations("nearest", "gather_sqdist_grad")


def new_results(x: Tensor, shape) -> tuple[Tensor, Tensor]:
    """The (dist, idx) outputs every backend fills: distances in the accumulate dtype."""
    return (x.new_empty(shape, dtype=accumulate_dtype(x.dtype)),
            x.new_empty(shape, dtype=torch.int64))


@custom_op("gather_sqdist_grad")
def _gather_sqdist_grad(grad: Tensor, a: Tensor, b: Tensor, idx: Tensor,
                        backend: str) -> tuple[Tensor, Tensor]:
    """Gradient of dist (B, R, S) = ||a_r - b_idx[r,s]||^2 w.r.t. a (B, R, D) and b (B, T, D)."""
    if a.numel() == 0 or b.numel() == 0:
        return a.new_zeros(a.shape), b.new_zeros(b.shape)
    return _GATHER_GRAD[backend](grad, a, b, idx)


@_gather_sqdist_grad.register_fake
def _(grad, a, b, idx, backend):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def pair_grads(grad, a, b, idx, backend):
    """(ga, gb) for dist = ||a_r - b_idx||^2 with grad and idx (B, R, S)."""
    return _gather_sqdist_grad(grad.contiguous(), a, b, idx.contiguous(), backend)


@custom_op("nearest")
def _nearest(x: Tensor, y: Tensor, exclude: Optional[Tensor], k: int, precision: str,
             backend: str) -> tuple[Tensor, Tensor]:
    """x (B, N, D), y (B, M >= 1, D), exclude (B, N) or None -> dist, idx (B, N, k) ascending."""
    dist, idx = new_results(x, (x.shape[0], x.shape[1], k))
    if dist.numel() > 0:
        _NEAREST[backend](x, y, exclude, k, precision, dist, idx)
    return dist, idx


@_nearest.register_fake
def _(x, y, exclude, k, precision, backend):
    return new_results(x, (x.shape[0], x.shape[1], k))


def _setup_rows(ctx, inputs, output):
    x, y = inputs[:2]
    ctx.backend = inputs[-1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, y, output[1])


def _backward_rows(ctx, grad_dist, _grad_idx):
    x, y, idx = ctx.saved_tensors
    grad_x, grad_y = pair_grads(grad_dist, x, y, idx, ctx.backend)
    return grad_x, grad_y, *([None] * (len(ctx.needs_input_grad) - 2))


_nearest.register_autograd(_backward_rows, setup_context=_setup_rows)


@custom_op("nearest_by_label")
def _nearest_by_label(x: Tensor, y: Tensor, x_labels: Tensor, y_labels: Tensor, precision: str,
                      backend: str) -> tuple[Tensor, Tensor]:
    """-> dist, idx (B, N, 2): slot 0 the nearest y of x's label, slot 1 of any other label."""
    dist, idx = new_results(x, (x.shape[0], x.shape[1], 2))
    if dist.numel() > 0:
        _BY_LABEL[backend](x, x_labels, y, y_labels, precision, dist, idx)
    return dist, idx


@_nearest_by_label.register_fake
def _(x, y, x_labels, y_labels, precision, backend):
    return new_results(x, (x.shape[0], x.shape[1], 2))


_nearest_by_label.register_autograd(_backward_rows, setup_context=_setup_rows)


def _both_results(x: Tensor, y: Tensor):
    return (*new_results(x, (x.shape[0], x.shape[1])), *new_results(x, (x.shape[0], y.shape[1])))


@custom_op("nearest_both")
def _nearest_both(x: Tensor, y: Tensor, precision: str,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> row_dist, row_idx (B, N): nearest y per x; col_dist, col_idx (B, M): nearest x per y."""
    results = _both_results(x, y)
    if x.shape[0] * x.shape[1] * y.shape[1] > 0:
        _BOTH[backend](x, y, precision, *results)
    return results


@_nearest_both.register_fake
def _(x, y, precision, backend):
    return _both_results(x, y)


def _setup_both(ctx, inputs, output):
    x, y, _, ctx.backend = inputs
    ctx.mark_non_differentiable(output[1], output[3])
    ctx.save_for_backward(x, y, output[1], output[3])


def _backward_both(ctx, grad_row, _grad_row_idx, grad_col, _grad_col_idx):
    x, y, row_idx, col_idx = ctx.saved_tensors
    grad_x, grad_y = pair_grads(grad_row[..., None], x, y, row_idx[..., None], ctx.backend)
    grad_y_col, grad_x_col = pair_grads(grad_col[..., None], y, x, col_idx[..., None],
                                        ctx.backend)
    return grad_x + grad_x_col, grad_y + grad_y_col, None, None


_nearest_both.register_autograd(_backward_both, setup_context=_setup_both)


def _rows(op: str, x: Tensor, y: Tensor):
    """Validate x and y and broadcast the batch: (batch, x3, y3)."""
    _validate.floating(op, x=x, y=y)
    batch, x3, y3 = _validate.batched_rows(op, x, y)
    if y3.shape[1] == 0 and x3.shape[0] * x3.shape[1] > 0:
        raise ValueError(f"{op}: 'y' has no rows (M = 0), so there is no nearest row; got y "
                         f"{tuple(y.shape)}")
    return batch, x3, y3


def _choose(op: str, x3: Tensor, y3: Tensor, precision: str | None, k: int = 1, both=False):
    """(precision, backend) for a search of x3 (B, N, D) against y3 (B, M, D)."""
    n, m = x3.shape[1], y3.shape[1]
    precision = _backend.resolve_precision(op, precision, x3.dtype)
    backend = _backend.resolve(op, x3.device, x3.dtype, precision, rows=max(n, m) if both else m,
                               k=k, n=n, m=m, d=x3.shape[2], batch=x3.shape[0],
                               grad=_backend.wants_grad(x3, y3))
    return precision, backend


def _search(op, x, y, exclude, k, precision, squeeze=False):
    """The search; `squeeze`: one slot (k = 1), returned as (..., N)."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{op}: argument 'k' must be an int, got {type(k).__name__}")
    batch, x3, y3 = _rows(op, x, y)
    n, m = x3.shape[1], y3.shape[1]
    if (k < 1 or k > m) and x3.shape[0] * n > 0:
        raise ValueError(f"{op}: argument 'k' must be in [1, M] = [1, {m}], got {k}")
    if k > MAX_K:
        raise ValueError(f"{op}: k = {k} is above the fused kernel's limit of {MAX_K}; for large "
                         "k use protokernels.sqdist(x, y).topk(k, largest=False)")
    if exclude is not None:
        exclude = _validate.integer_rows(op, "exclude", exclude, x, batch, n, "(..., N)")
        _validate.index_range(op, "exclude", exclude, m, "row indices of 'y'")
    precision, backend = _choose(op, x3, y3, precision, max(k, 1))
    dist, idx = _nearest(x3, y3, exclude, max(k, 1), precision, backend)
    shape = batch + ((n,) if squeeze else (n, max(k, 1)))
    return dist.view(shape), idx.view(shape)


def nearest(x: Tensor, y: Tensor, *, exclude: Tensor | None = None,
            precision: str | None = None) -> tuple[Tensor, Tensor]:
    """The nearest row of y for each row of x, without the (N, M) distance matrix.

    x (..., N, D), y (..., M, D) (batch dimensions broadcast like torch.matmul) -> (dist, idx),
    both (..., N): dist the squared Euclidean distance ||x_i - y_idx||^2, float32 (float64 for
    float64 input), computed exactly for the winner; idx int64. Ties go to the smaller index. A
    pair involving a row with NaN ranks first, like torch.argmin (a row of x holding NaN gets a
    NaN distance, a NaN prototype wins every row); a pair involving a row with an infinite (or
    overflowing) squared norm ranks after every finite distance. idx is always in [-1, M).
    `exclude` (..., N), integer: one index per row that may not win (DPNP's nearest rival); a
    row left without candidates (M = 1 and excluded) gets idx -1 and dist inf. `precision` as
    in sqdist (None follows torch.get_float32_matmul_precision()); it sets how candidates are
    ranked, the returned distance is exact either way. dist is differentiable w.r.t. x and y; the
    gradient reaches only the winners.
    """
    return _search("nearest", x, y, exclude, 1, precision, squeeze=True)


def nearest_k(x: Tensor, y: Tensor, k: int, *, exclude: Tensor | None = None,
              precision: str | None = None) -> tuple[Tensor, Tensor]:
    """The k nearest rows of y for each row of x, ascending: (dist, idx) of shape (..., N, k).

    As `nearest`, for 1 <= k <= min(M, 64). Slots without a candidate (k = M with `exclude`) hold
    idx -1 and dist inf. For k > 64 use protokernels.sqdist(x, y).topk(k, largest=False).
    """
    return _search("nearest_k", x, y, exclude, k, precision)


def nearest_by_label(x: Tensor, x_labels: Tensor, y: Tensor, y_labels: Tensor, *,
                     precision: str | None = None):
    """GLVQ's d+ and d-: the nearest prototype of each sample's own class and of any other class,
    in one pass.

    x (..., N, D) with x_labels (..., N), y (..., M, D) with y_labels (..., M), integer labels ->
    (d_same, i_same, d_other, i_other), each (..., N). A sample whose class has no prototype gets
    d_same = inf and i_same = -1; likewise d_other = inf, i_other = -1 when every prototype has
    its class. Distances as in `nearest` (exact, differentiable, ties to the smaller index).
    """
    op = "nearest_by_label"
    batch, x3, y3 = _rows(op, x, y)
    x_labels = _validate.integer_rows(op, "x_labels", x_labels, x, batch, x3.shape[1], "(..., N)")
    y_labels = _validate.integer_rows(op, "y_labels", y_labels, x, batch, y3.shape[1], "(..., M)")
    precision, backend = _choose(op, x3, y3, precision)
    dist, idx = _nearest_by_label(x3, y3, x_labels, y_labels, precision, backend)
    dist, idx = dist.view(batch + dist.shape[1:]), idx.view(batch + idx.shape[1:])
    return dist[..., 0], idx[..., 0], dist[..., 1], idx[..., 1]


def nearest_both(x: Tensor, y: Tensor, *, precision: str | None = None):
    """Nearest y for each x and nearest x for each y in one pass (R2 and R1 of
    case-based-reasoning..., eq. 5-6).

    x (..., N, D), y (..., M, D) -> (row_dist, row_idx) of shape (..., N) and (col_dist, col_idx)
    of shape (..., M). Distances as in `nearest` (exact, differentiable, ties to the smaller
    index). N and M must both be positive unless the result is empty.
    """
    op = "nearest_both"
    batch, x3, y3 = _rows(op, x, y)
    if x3.shape[1] == 0 and y3.shape[0] * y3.shape[1] > 0:
        raise ValueError(f"{op}: 'x' has no rows (N = 0), so there is no nearest row for 'y'; "
                         f"got x {tuple(x.shape)}")
    precision, backend = _choose(op, x3, y3, precision, both=True)
    outs = _nearest_both(x3, y3, precision, backend)
    return tuple(t.view(batch + t.shape[1:]) for t in outs)
