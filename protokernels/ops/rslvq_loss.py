"""protokernels::rslvq_loss: RSLVQ's loss (prototype-layers-and-kernel-prototype-convolution,
RSLVQ, eq. 19), the negative log-likelihood ratio of a Gaussian mixture with one Gaussian of
variance sigma^2 per prototype, in one op: the sqdist kernel for the (N, M) distances and an
epilogue kernel for the values, their derivatives w.r.t. the distances and the reduction
(reference/rslvq_loss.py has the formulas).

Why one op: at the heads' in-model sizes a training step is host time; the epilogue in torch ops
(two log-sum-exps, masks, the mean) was ~15 autograd nodes around sqdist. Here the backward is one
product and sqdist's two gradient kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from .._numerics import accumulate_dtype
from ..reference._losses import REDUCTIONS
from ._registry import custom_op
from .sqdist import sqdist_grads

_SQDIST = _backend.Implementations("sqdist", "sqdist")
_EPILOGUE = _backend.Implementations("rslvq_loss", "rslvq_epilogue")


def _outputs(x: Tensor, m: int, reduction: str):
    """Empty (loss, weights, scale) for x (N, D) against M prototypes."""
    n = x.shape[0]
    weights = x.new_empty((n, m), dtype=accumulate_dtype(x.dtype))
    return weights.new_empty((n,) if reduction == "none" else ()), weights, weights.new_empty(())


@custom_op("rslvq_loss")
def _rslvq_loss(x: Tensor, y: Tensor, x_labels: Tensor, y_labels: Tensor, sigma: float,
                reduction: str, precision: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, D), y (M, D), labels int64 (N,), (M,) -> loss, weights (N, M) (the per-sample
    values' derivatives w.r.t. the distances), scale (what the backward multiplies them by)."""
    n, m = x.shape[0], y.shape[0]
    if n * m == 0:  # no sample counts: nothing to be near
        loss, weights, scale = _outputs(x, m, reduction)
        return loss.zero_(), weights, scale.fill_(1)
    if x.shape[1] == 0:
        dist = x.new_zeros((n, m))
    else:
        dist = _SQDIST[backend](x[None], y[None], precision)[0]
    return _EPILOGUE[backend](dist, x_labels, y_labels, sigma, reduction)


@_rslvq_loss.register_fake
def _(x, y, x_labels, y_labels, sigma, reduction, precision, backend):
    return _outputs(x, y.shape[0], reduction)


def _setup_context(ctx, inputs, output):
    x, y, _, _, _, ctx.reduction, ctx.precision, ctx.backend = inputs
    _, weights, scale = output
    ctx.mark_non_differentiable(weights, scale)
    ctx.save_for_backward(x, y, weights, scale)


def _backward(ctx, grad_loss, _grad_weights, _grad_scale):
    x, y, weights, scale = ctx.saved_tensors
    factor = grad_loss[:, None] if ctx.reduction == "none" else grad_loss * scale
    grad_x, grad_y = sqdist_grads((weights * factor).to(x.dtype)[None], x[None], y[None],
                                  ctx.precision, ctx.backend, ctx.needs_input_grad[:2])
    return (None if grad_x is None else grad_x[0], None if grad_y is None else grad_y[0],
            None, None, None, None, None, None)


_rslvq_loss.register_autograd(_backward, setup_context=_setup_context)


def rslvq_loss(x: Tensor, labels: Tensor, prototypes: Tensor, prototype_labels: Tensor, *,
               sigma: float = 1.0, reduction: str = "mean",
               precision: str | None = None) -> Tensor:
    """RSLVQ's loss: the negative log-likelihood ratio of a Gaussian mixture with one Gaussian of
    variance sigma^2 per prototype,

        -log( sum_{j: c_j = y} exp(-d_j / 2 sigma^2) / sum_j exp(-d_j / 2 sigma^2) ),

    d_j the squared distance of a sample to prototype j. x (N, D) with integer labels (N,),
    prototypes (M, D) with integer prototype_labels (M,). `reduction`: "mean" over the samples
    that count, "sum", or "none" ((N,) values). The log-sum-exps are max-shifted (no overflow for
    any sigma). A sample whose class has no prototype is left out (value 0, no gradient; "mean"
    gives 0 when none counts). Returns float32 (float64 for float64 input). One sqdist kernel
    (`precision` as there) and one epilogue kernel; the backward is sqdist's gradient kernels.
    """
    op = "rslvq_loss"
    _validate.labelled(op, x, labels, prototypes, prototype_labels)
    _validate.floating(op, x=x, prototypes=prototypes)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    sigma = _validate.positive_number(op, "sigma", sigma)
    n, m, d = x.shape[0], prototypes.shape[0], x.shape[1]
    precision = _backend.resolve_precision(op, precision, x.dtype)
    backend = _backend.resolve(op, x.device, x.dtype, precision, n=n, m=m, d=d,
                               grad=_backend.wants_grad(x, prototypes))
    return _rslvq_loss(x, prototypes, labels.to(torch.int64).contiguous(),
                       prototype_labels.to(torch.int64).contiguous(), sigma, reduction,
                       precision, backend)[0]
