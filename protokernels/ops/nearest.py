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

MAX_K = 64


def _dist_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("protokernels::gather_sqdist_grad", mutates_args=())
def _gather_sqdist_grad(grad: Tensor, a: Tensor, b: Tensor, idx: Tensor,
                        backend: str) -> tuple[Tensor, Tensor]:
    """Gradient of dist (B, R, S) = ||a_r - b_idx[r,s]||^2 w.r.t. a (B, R, D) and b (B, T, D)."""
    if a.numel() == 0 or b.numel() == 0:
        return a.new_zeros(a.shape), b.new_zeros(b.shape)
    return _backend.kernel(backend, "nearest", "gather_sqdist_grad")(grad, a, b, idx)


@_gather_sqdist_grad.register_fake
def _(grad, a, b, idx, backend):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _pair_grads(grad, a, b, idx, backend):
    """(ga, gb) for dist = ||a_r - b_idx||^2 with grad and idx (B, R, S)."""
    return torch.ops.protokernels.gather_sqdist_grad(grad.contiguous(), a, b, idx, backend)


@torch.library.custom_op("protokernels::nearest", mutates_args=())
def _nearest(x: Tensor, y: Tensor, exclude: Optional[Tensor], k: int, precision: str,
             backend: str) -> tuple[Tensor, Tensor]:
    """x (B, N, D), y (B, M >= 1, D), exclude (B, N) or None -> dist, idx (B, N, k) ascending."""
    batch, n, _ = x.shape
    if batch * n == 0:
        return (x.new_empty((batch, n, k), dtype=_dist_dtype(x)),
                x.new_empty((batch, n, k), dtype=torch.int64))
    return _backend.kernel(backend, "nearest", "nearest")(x, y, exclude, k, precision)


@_nearest.register_fake
def _(x, y, exclude, k, precision, backend):
    shape = (x.shape[0], x.shape[1], k)
    return x.new_empty(shape, dtype=_dist_dtype(x)), x.new_empty(shape, dtype=torch.int64)


def _setup_rows(ctx, inputs, output):
    x, y = inputs[:2]
    ctx.backend = inputs[-1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, y, output[1])


def _backward_rows(ctx, grad_dist, _grad_idx):
    x, y, idx = ctx.saved_tensors
    grad_x, grad_y = _pair_grads(grad_dist, x, y, idx, ctx.backend)
    return grad_x, grad_y, *([None] * (len(ctx.needs_input_grad) - 2))


_nearest.register_autograd(_backward_rows, setup_context=_setup_rows)


@torch.library.custom_op("protokernels::nearest_by_label", mutates_args=())
def _nearest_by_label(x: Tensor, y: Tensor, x_labels: Tensor, y_labels: Tensor, precision: str,
                      backend: str) -> tuple[Tensor, Tensor]:
    """-> dist, idx (B, N, 2): slot 0 the nearest y of x's label, slot 1 of any other label."""
    batch, n, _ = x.shape
    if batch * n == 0:
        return (x.new_empty((batch, n, 2), dtype=_dist_dtype(x)),
                x.new_empty((batch, n, 2), dtype=torch.int64))
    return _backend.kernel(backend, "nearest", "nearest_by_label")(x, x_labels, y, y_labels,
                                                                    precision)


@_nearest_by_label.register_fake
def _(x, y, x_labels, y_labels, precision, backend):
    shape = (x.shape[0], x.shape[1], 2)
    return x.new_empty(shape, dtype=_dist_dtype(x)), x.new_empty(shape, dtype=torch.int64)


_nearest_by_label.register_autograd(_backward_rows, setup_context=_setup_rows)


@torch.library.custom_op("protokernels::nearest_both", mutates_args=())
def _nearest_both(x: Tensor, y: Tensor, precision: str,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> row_dist, row_idx (B, N): nearest y per x; col_dist, col_idx (B, M): nearest x per y."""
    batch, n, _ = x.shape
    m = y.shape[1]
    if batch * n * m == 0:
        dist = _dist_dtype(x)
        return (x.new_empty((batch, n), dtype=dist), x.new_empty((batch, n), dtype=torch.int64),
                x.new_empty((batch, m), dtype=dist), x.new_empty((batch, m), dtype=torch.int64))
    return _backend.kernel(backend, "nearest", "nearest_both")(x, y, precision)


@_nearest_both.register_fake
def _(x, y, precision, backend):
    rows, cols = (x.shape[0], x.shape[1]), (x.shape[0], y.shape[1])
    dist = _dist_dtype(x)
    return (x.new_empty(rows, dtype=dist), x.new_empty(rows, dtype=torch.int64),
            x.new_empty(cols, dtype=dist), x.new_empty(cols, dtype=torch.int64))


def _setup_both(ctx, inputs, output):
    x, y, _, ctx.backend = inputs
    ctx.mark_non_differentiable(output[1], output[3])
    ctx.save_for_backward(x, y, output[1], output[3])


def _backward_both(ctx, grad_row, _grad_row_idx, grad_col, _grad_col_idx):
    x, y, row_idx, col_idx = ctx.saved_tensors
    grad_x, grad_y = _pair_grads(grad_row[..., None], x, y, row_idx[..., None], ctx.backend)
    grad_y_col, grad_x_col = _pair_grads(grad_col[..., None], y, x, col_idx[..., None],
                                         ctx.backend)
    return grad_x + grad_x_col, grad_y + grad_y_col, None, None


_nearest_both.register_autograd(_backward_both, setup_context=_setup_both)


def _prepare(op: str, x: Tensor, y: Tensor, precision: str | None):
    """Validate x and y, broadcast the batch; (batch, x3, y3, precision, backend)."""
    _validate.floating(op, x=x, y=y)
    batch, x3, y3 = _validate.batched_rows(op, x, y)
    if y3.shape[1] == 0 and x3.shape[0] * x3.shape[1] > 0:
        raise ValueError(f"{op}: 'y' has no rows (M = 0), so there is no nearest row; got y "
                         f"{tuple(y.shape)}")
    backend = _backend.resolve(op, x.device)
    return batch, x3, y3, _backend.resolve_precision(op, precision, x.dtype), backend


def _search(op, x, y, exclude, k, precision):
    batch, x3, y3, precision, backend = _prepare(op, x, y, precision)
    n, m = x3.shape[1], y3.shape[1]
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{op}: argument 'k' must be an int, got {type(k).__name__}")
    if k < 1 or k > m:
        raise ValueError(f"{op}: argument 'k' must be in [1, M] = [1, {m}], got {k}")
    if k > MAX_K:
        raise ValueError(f"{op}: k = {k} is above the fused kernel's limit of {MAX_K}; for large "
                         "k use protokernels.sqdist(x, y).topk(k, largest=False)")
    if exclude is not None:
        exclude = _validate.integer_rows(op, "exclude", exclude, x, batch, n, "(..., N)")
        _validate.index_range(op, "exclude", exclude, m, "row indices of 'y'")
    dist, idx = torch.ops.protokernels.nearest(x3, y3, exclude, k, precision, backend)
    return dist.reshape(batch + dist.shape[1:]), idx.reshape(batch + idx.shape[1:])


def nearest(x: Tensor, y: Tensor, *, exclude: Tensor | None = None,
            precision: str | None = None) -> tuple[Tensor, Tensor]:
    """The nearest row of y for each row of x, without the (N, M) distance matrix.

    x (..., N, D), y (..., M, D) (batch dimensions broadcast like torch.matmul) -> (dist, idx),
    both (..., N): dist the squared Euclidean distance ||x_i - y_idx||^2, float32 (float64 for
    float64 input), computed exactly for the winner; idx int64. Ties go to the smaller index. A
    NaN distance ranks first, like torch.argmin: a row of x holding NaN gets a NaN distance.
    `exclude` (..., N), integer: one index per row that may not win (DPNP's nearest rival); a
    row left without candidates (M = 1 and excluded) gets idx -1 and dist inf. `precision` as
    in sqdist (None follows torch.get_float32_matmul_precision()); it sets how candidates are
    ranked, the returned distance is exact either way. dist is differentiable w.r.t. x and y; the
    gradient reaches only the winners.
    """
    dist, idx = _search("nearest", x, y, exclude, 1, precision)
    return dist[..., 0], idx[..., 0]


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
    batch, x3, y3, precision, backend = _prepare(op, x, y, precision)
    x_labels = _validate.integer_rows(op, "x_labels", x_labels, x, batch, x3.shape[1], "(..., N)")
    y_labels = _validate.integer_rows(op, "y_labels", y_labels, x, batch, y3.shape[1], "(..., M)")
    dist, idx = torch.ops.protokernels.nearest_by_label(x3, y3, x_labels, y_labels, precision,
                                                        backend)
    dist, idx = dist.reshape(batch + dist.shape[1:]), idx.reshape(batch + idx.shape[1:])
    return dist[..., 0], idx[..., 0], dist[..., 1], idx[..., 1]


def nearest_both(x: Tensor, y: Tensor, *, precision: str | None = None):
    """Nearest y for each x and nearest x for each y in one pass (R2 and R1 of
    case-based-reasoning..., eq. 5-6).

    x (..., N, D), y (..., M, D) -> (row_dist, row_idx) of shape (..., N) and (col_dist, col_idx)
    of shape (..., M). Distances as in `nearest` (exact, differentiable, ties to the smaller
    index). N and M must both be positive unless the result is empty.
    """
    op = "nearest_both"
    batch, x3, y3, precision, backend = _prepare(op, x, y, precision)
    if x3.shape[1] == 0 and y3.shape[0] * y3.shape[1] > 0:
        raise ValueError(f"{op}: 'x' has no rows (N = 0), so there is no nearest row for 'y'; "
                         f"got x {tuple(x.shape)}")
    outs = torch.ops.protokernels.nearest_both(x3, y3, precision, backend)
    return tuple(t.reshape(batch + t.shape[1:]) for t in outs)
