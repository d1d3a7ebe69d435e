"""protokernels::glvq_loss: GLVQ's loss (prototype-layers-and-kernel-prototype-convolution, GLVQ,
eq. 20) in one op: the nearest_by_label search for (d+, d-) and an epilogue kernel for the
transfer values, their derivatives and the reduction (reference/glvq_loss.py has the formulas).

Why one op: at the heads' in-model sizes a training step is host time, and the epilogue written
in torch ops was ~15 autograd nodes and ~50 launches around the one search (RESULTS.md "In-model
sizes ..."; "GLVQ in one op"). Here the forward is the search and one epilogue launch, and the
backward is one product and the winners' gradient (protokernels::gather_sqdist_grad).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from ..reference._losses import REDUCTIONS
from ..reference.glvq_loss import TRANSFERS
from ._registry import custom_op
from .nearest import new_results, pair_grads

_SEARCH = _backend.Implementations("nearest", "nearest_by_label")
_EPILOGUE = _backend.Implementations("glvq_loss", "glvq_epilogue")


def _outputs(x: Tensor, reduction: str):
    """Empty (loss, coef, idx, scale) for x (N, D)."""
    n = x.shape[0]
    coef, idx = new_results(x, (n, 2))
    loss = coef.new_empty((n,) if reduction == "none" else ())
    return loss, coef, idx, coef.new_empty(())


@custom_op("glvq_loss")
def _glvq_loss(x: Tensor, y: Tensor, x_labels: Tensor, y_labels: Tensor, transfer: str,
               beta: float, reduction: str, precision: str,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (N, D), y (M >= 1, D), labels int64 (N,), (M,) -> loss, coef (N, 2) (the per-sample
    values' derivatives w.r.t. d+ and d-), idx (N, 2) (i+, i-), scale (what the backward
    multiplies coef by)."""
    if x.shape[0] == 0:
        loss, coef, idx, scale = _outputs(x, reduction)
        return loss.zero_(), coef, idx, scale.fill_(1)
    dist, idx = new_results(x, (x.shape[0], 2))
    _SEARCH[backend](x[None], x_labels[None], y[None], y_labels[None], precision, dist[None],
                     idx[None])
    loss, coef, scale = _EPILOGUE[backend](dist, idx, transfer, beta, reduction)
    return loss, coef, idx, scale


@_glvq_loss.register_fake
def _(x, y, x_labels, y_labels, transfer, beta, reduction, precision, backend):
    return _outputs(x, reduction)


def _setup_context(ctx, inputs, output):
    x, y, _, _, _, _, ctx.reduction, _, ctx.backend = inputs
    _, coef, idx, scale = output
    ctx.mark_non_differentiable(coef, idx, scale)
    ctx.save_for_backward(x, y, coef, idx, scale)


def _backward(ctx, grad_loss, _grad_coef, _grad_idx, _grad_scale):
    x, y, coef, idx, scale = ctx.saved_tensors
    weight = grad_loss[:, None] if ctx.reduction == "none" else grad_loss * scale
    grad_x, grad_y = pair_grads((coef * weight)[None], x[None], y[None], idx[None], ctx.backend)
    return grad_x[0], grad_y[0], None, None, None, None, None, None, None


_glvq_loss.register_autograd(_backward, setup_context=_setup_context)


def glvq_loss(x: Tensor, labels: Tensor, prototypes: Tensor, prototype_labels: Tensor, *,
              transfer: str = "identity", beta: float = 10.0, reduction: str = "mean",
              precision: str | None = None) -> Tensor:
    """GLVQ's loss: f(mu) with mu = (d+ - d-) / (d+ + d-), d+ the squared distance of a sample to
    the nearest prototype of its class and d- to the nearest prototype of any other class.

    x (N, D) with integer labels (N,), prototypes (M >= 1, D) with integer prototype_labels (M,).
    `transfer` f: "identity", "sigmoid" (1 / (1 + exp(-beta mu))) or "swish" (mu sigmoid(beta
    mu)). `reduction`: "mean" over the samples that count, "sum", or "none" ((N,) values).
    A sample whose class has no prototype is left out (value 0, no gradient; "mean" divides by
    the samples that count, and gives 0 when none does); one without a prototype of another
    class has mu = -1 and no gradient. NaN in x gives a NaN loss. Returns float32 (float64 for
    float64 input); gradients reach x and each sample's two winning prototypes. One search
    (nearest_by_label's kernels, `precision` as there) and one epilogue kernel, no (N, M) matrix.
    """
    op = "glvq_loss"
    _validate.labelled(op, x, labels, prototypes, prototype_labels)
    _validate.floating(op, x=x, prototypes=prototypes)
    if transfer not in TRANSFERS:
        raise ValueError(f"{op}: 'transfer' must be one of {TRANSFERS}, got {transfer!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    beta = _validate.positive_number(op, "beta", beta)
    n, m = x.shape[0], prototypes.shape[0]
    if m == 0 and n > 0:
        raise ValueError(f"{op}: 'prototypes' has no rows (M = 0); got {tuple(prototypes.shape)}")
    precision = _backend.resolve_precision(op, precision, x.dtype)
    backend = _backend.resolve(op, x.device, x.dtype, precision, rows=m, n=n, m=m,
                               d=x.shape[1], grad=_backend.wants_grad(x, prototypes))
    return _glvq_loss(x, prototypes, labels.to(torch.int64).contiguous(),
                      prototype_labels.to(torch.int64).contiguous(), transfer, beta, reduction,
                      precision, backend)[0]
