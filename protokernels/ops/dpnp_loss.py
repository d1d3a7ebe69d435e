"""protokernels::dpnp_loss: DPNP's loss (dpnp-positive-negative-prototypes, eq. 10) in one op: the
logits h C^T and the Gram matrix C C^T (two cuBLAS products), then one epilogue kernel over the
samples and the prototypes: each row's cross-entropy and positive term, its nearest rival
prototype (eq. 6 for a sample, eq. 8 for a prototype), the L_1/2 repulsion from it, the buffers
the gradient is linear in, and the deterministic sum (reference/dpnp_loss.py has the formulas).

Why one op: at the heads' in-model sizes a training step is host time, and DPNP's loss in torch
ops (a cross-entropy, two nearest searches with exclusions, gathers and norms) was ~95 launches
and two device syncs per step (RESULTS.md "GLVQ and RSLVQ in one op"). Here the forward is three
launches and the backward two products and one index_add.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import _backend, _validate
from .._numerics import accumulate_dtype
from ._registry import custom_op

_EPILOGUE = _backend.Implementations("dpnp_loss", "dpnp_epilogue")


def _outputs(h: Tensor, m: int):
    """Empty (loss, weights (N, M), own (N + M, D), scatter (2N + M, D), targets (2N + M,))."""
    n, d = h.shape
    acc = h.new_empty((), dtype=accumulate_dtype(h.dtype))
    return (acc, acc.new_empty((n, m)), acc.new_empty((n + m, d)), acc.new_empty((2 * n + m, d)),
            h.new_empty((2 * n + m,), dtype=torch.int64))


@custom_op("dpnp_loss")
def _dpnp_loss(h: Tensor, c: Tensor, labels: Tensor, lambda_pos: float, lambda_neg_sample: float,
               lambda_neg_class: float, eps: float,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """h (N, D), c (M, D), labels int64 (N,) in [0, M) -> loss and the backward's buffers
    (reference/dpnp_loss.py)."""
    if c.shape[0] == 0:  # then N = 0 too: nothing to classify or to push apart
        loss, *buffers = _outputs(h, 0)
        return (loss.zero_(), *buffers)
    acc = accumulate_dtype(h.dtype)
    # the epilogue kernels read rows of h and c as contiguous (a copy only for strided input)
    ha, ca = h.to(acc).contiguous(), c.to(acc).contiguous()
    # Autocast reaches inside the op: there the products would come out in bfloat16/float16,
    # while the epilogue reads them in the accumulate dtype.
    with (torch.autocast(h.device.type, enabled=False) if torch.is_autocast_enabled(h.device.type)
          else contextlib.nullcontext()):
        scores, gram = ha @ ca.mT, ca @ ca.mT
    loss, own, scatter, targets = _EPILOGUE[backend](scores, gram, ha, ca, labels, lambda_pos,
                                                     lambda_neg_sample, lambda_neg_class, eps)
    return loss, scores, own, scatter, targets


@_dpnp_loss.register_fake
def _(h, c, labels, lambda_pos, lambda_neg_sample, lambda_neg_class, eps, backend):
    return _outputs(h, c.shape[0])


def _setup_context(ctx, inputs, output):
    h, c = inputs[:2]
    _, weights, own, scatter, targets = output
    ctx.mark_non_differentiable(weights, own, scatter, targets)
    ctx.save_for_backward(h, c, weights, own, scatter, targets)


def _backward(ctx, grad_loss, *_grad_buffers):
    h, c, weights, own, scatter, targets = ctx.saved_tensors
    n = h.shape[0]
    ha, ca = h.to(weights.dtype), c.to(weights.dtype)
    grad_h = grad_c = None
    if ctx.needs_input_grad[0]:
        grad_h = (torch.addmm(own[:n], weights, ca) * grad_loss).to(h.dtype)
    if ctx.needs_input_grad[1]:
        grad_c = torch.addmm(own[n:], weights.mT, ha).index_add_(0, targets, scatter)
        grad_c = (grad_c * grad_loss).to(c.dtype)
    return grad_h, grad_c, None, None, None, None, None, None


_dpnp_loss.register_autograd(_backward, setup_context=_setup_context)


def dpnp_loss(h: Tensor, labels: Tensor, prototypes: Tensor, *, lambda_pos: float = 0.01,
              lambda_neg_sample: float = 0.01, lambda_neg_class: float = 0.01,
              eps: float = 1e-8) -> Tensor:
    """DPNP's loss of features h (N, D) with integer class labels (N,) in [0, M) and one prototype
    per class, prototypes (M, D) (the classifier's weights: logits h C^T):

        CE(h C^T, labels) + lambda_pos / 2N sum_i ||h_i - c_{y_i}||^2
                          - lambda_neg_sample / 2N sum_i ||h_i - c_neg(i)||_{1/2}^{1/2}
                          - lambda_neg_class / 2M sum_j ||c_j - c_neg(j)||_{1/2}^{1/2}

    c_neg(i) is the nearest prototype of another class than y_i and c_neg(j) the nearest other
    prototype of c_j (squared Euclidean distance; the lowest index among equals).
    ||v||_{1/2}^{1/2} = sum_d sqrt(|v_d| + eps) - sqrt(eps): the same value to O(sqrt(eps)), with
    a finite gradient where a coordinate is 0. With one prototype there is no rival and both
    negative terms are 0; with no samples the loss is the prototypes' term alone. Returns float32
    (float64 for float64 input); the logits and distances come from torch's matrix product in
    float32 (its TF32 setting applies). Gradients reach h and the prototypes. Two products and one
    epilogue kernel forward, two products and one index_add backward.
    """
    op = "dpnp_loss"
    _validate.labelled(op, h, labels, prototypes, None, x_name="h")
    _validate.floating(op, h=h, prototypes=prototypes)
    _validate.settings(op, positive=dict(eps=eps),
                       nonnegative=dict(lambda_pos=lambda_pos, lambda_neg_sample=lambda_neg_sample,
                                        lambda_neg_class=lambda_neg_class))
    n, m = h.shape[0], prototypes.shape[0]
    if m == 0 and n > 0:
        raise ValueError(f"{op}: 'prototypes' has no rows (M = 0); got {tuple(prototypes.shape)}")
    _validate.index_range(op, "labels", labels, m, "class indices (rows of 'prototypes')")
    backend = _backend.resolve(op, h.device, h.dtype, rows=m, n=n, m=m, d=h.shape[1],
                               grad=_backend.wants_grad(h, prototypes))
    return _dpnp_loss(h, prototypes, labels.to(torch.int64).contiguous(), float(lambda_pos),
                      float(lambda_neg_sample), float(lambda_neg_class), float(eps), backend)[0]
