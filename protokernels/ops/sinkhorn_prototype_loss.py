"""protokernels::sinkhorn_prototype_loss: the Sinkhorn prototypes' loss (prototypical-vae-sinkhorn,
eq. 10; SwAV's swapped prediction with one view) in one op: normalize z and the prototypes, their
product (cuBLAS), the equipartition codes (the sinkhorn op's iteration) and the codes'
cross-entropy (codes_cross_entropy's row kernel); the backward is the two products' and the
normalizations' gradients, formed here without the autograd engine. The normalizations of both
matrices are one kernel each way (unit_rows, unit_rows_grad: a launch where PyTorch took 6
forward and 14 backward).

Why one op: at the in-model sizes the head's training step is host time, and the same
computation through the public ops (two F.normalize, a matmul, sinkhorn, codes_cross_entropy)
was ~12 autograd nodes: 0.62-0.78x the compiled naive head (RESULTS.md "DPNP in one op").
"""
from __future__ import annotations

from torch import Tensor

from .. import _backend, _validate
from .._numerics import accumulate_dtype
from ._registry import custom_op
from .codes_cross_entropy import codes_cross_entropy_grad
from .sinkhorn import equipartition_codes

_ROWS = _backend.Implementations("codes_cross_entropy", "codes_cross_entropy_rows")
_UNIT_ROWS = _backend.Implementations("sinkhorn_prototype_loss", "unit_rows")
_UNIT_ROWS_GRAD = _backend.Implementations("sinkhorn_prototype_loss", "unit_rows_grad")
NORM_EPS = 1e-12  # F.normalize's: a row of norm below it is divided by it instead


def _unit_outputs(z: Tensor, prototypes: Tensor, normalize: bool):
    """Empty (z_unit, p_unit, z_norm, p_norm): with `normalize`, the unit rows (B, D), (K, D)
    and the rows' norms (at least NORM_EPS) (B,), (K,); else none of them (0 rows)."""
    (b, depth), k = z.shape, prototypes.shape[0]
    if not normalize:
        b = k = 0
    return z.new_empty((b, depth)), z.new_empty((k, depth)), z.new_empty((b,)), z.new_empty((k,))


def _outputs(z: Tensor, prototypes: Tensor, normalize: bool):
    """Empty (loss, codes, scores, stats, scale, z_unit, p_unit, z_norm, p_norm): stats (B, 3)
    are the cross-entropy's row statistics (codes_cross_entropy's)."""
    b, k = z.shape[0], prototypes.shape[0]
    stats = z.new_empty((b, 3), dtype=accumulate_dtype(z.dtype))
    return (stats.new_empty(()), z.new_empty((b, k)), z.new_empty((b, k)), stats,
            stats.new_empty(()), *_unit_outputs(z, prototypes, normalize))


@custom_op("sinkhorn_prototype_loss")
def _sinkhorn_prototype_loss(z: Tensor, prototypes: Tensor, temperature: float, eps: float,
                             n_iters: int, normalize: bool, backend: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                        Tensor, Tensor]:
    """z (B, D), prototypes (K, D) -> (loss, codes, scores, stats, scale, z_unit, p_unit,
    z_norm, p_norm)."""
    if normalize:
        z_unit, p_unit, z_norm, p_norm = _UNIT_ROWS[backend](z, prototypes, NORM_EPS)
        scores = z_unit @ p_unit.mT
    else:
        z_unit, p_unit, z_norm, p_norm = _unit_outputs(z, prototypes, normalize)
        scores = z @ prototypes.mT
    codes = equipartition_codes(scores, eps, n_iters, backend)
    if scores.numel() == 0:  # no rows, or rows of zero prototypes: every value is 0
        loss, _, _, stats, scale, *_ = _outputs(z, prototypes, normalize)
        return loss.zero_(), codes, scores, stats, scale.fill_(1 / max(z.shape[0], 1)), \
            z_unit, p_unit, z_norm, p_norm
    loss, stats, scale = _ROWS[backend](scores, codes, temperature, "mean")
    return loss, codes, scores, stats, scale, z_unit, p_unit, z_norm, p_norm


@_sinkhorn_prototype_loss.register_fake
def _(z, prototypes, temperature, eps, n_iters, normalize, backend):
    return _outputs(z, prototypes, normalize)


def _setup_context(ctx, inputs, output):
    z, prototypes, ctx.temperature, _, _, ctx.normalize, ctx.backend = inputs
    _, codes, scores, stats, scale, z_unit, p_unit, z_norm, p_norm = output
    ctx.mark_non_differentiable(codes, stats, scale, z_unit, p_unit, z_norm, p_norm)
    ctx.set_materialize_grads(False)
    # the products' operands: the unit rows with `normalize` (z and the prototypes are not
    # needed then), else z and the prototypes themselves
    operands = (z_unit, p_unit) if ctx.normalize else (z, prototypes)
    ctx.save_for_backward(*operands, scores, codes, stats, scale, z_norm, p_norm)


@custom_op("sinkhorn_prototype_loss_grad")
def _sinkhorn_prototype_loss_grad(grad_scores: Tensor, z_operand: Tensor, p_operand: Tensor,
                                  z_norm: Tensor, p_norm: Tensor, normalize: bool,
                                  backend: str) -> tuple[Tensor, Tensor]:
    """The gradients w.r.t. z (B, D) and the prototypes (K, D) from the scores' (B, K): the
    product's (the operands are the unit rows with `normalize`, else z and the prototypes), then
    the normalizations'."""
    grad_z, grad_p = grad_scores @ p_operand, grad_scores.mT @ z_operand
    if normalize:
        grad_z, grad_p = _UNIT_ROWS_GRAD[backend](grad_z, z_operand, z_norm, grad_p, p_operand,
                                                  p_norm, NORM_EPS)
    return grad_z, grad_p


@_sinkhorn_prototype_loss_grad.register_fake
def _(grad_scores, z_operand, p_operand, z_norm, p_norm, normalize, backend):
    return z_operand.new_empty(z_operand.shape), p_operand.new_empty(p_operand.shape)


def _backward(ctx, grad_loss, _grad_codes, grad_scores, *_grad_rest):
    z_operand, p_operand, scores, codes, stats, scale, z_norm, p_norm = ctx.saved_tensors
    grad = None if grad_loss is None else codes_cross_entropy_grad(
        scores, codes, stats, grad_loss, scale, "mean", ctx.temperature, ctx.backend)
    if grad_scores is not None:
        grad = grad_scores if grad is None else grad + grad_scores
    if grad is None:
        return None, None, None, None, None, None, None
    grad_z, grad_p = _sinkhorn_prototype_loss_grad(grad, z_operand, p_operand, z_norm, p_norm,
                                                   ctx.normalize, ctx.backend)
    return grad_z, grad_p, None, None, None, None, None


_sinkhorn_prototype_loss.register_autograd(_backward, setup_context=_setup_context)


def sinkhorn_prototype_loss(z: Tensor, prototypes: Tensor, *, temperature: float = 0.1,
                            eps: float = 0.05, n_iters: int = 3,
                            normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The Sinkhorn prototypes' loss (SwAV's, one view) of latent codes z (B, D) and prototypes
    (K, D) -> (loss, codes, scores):

        scores = z V^T (of the unit-normalized rows of z and V with `normalize`, as F.normalize),
        codes  = protokernels.sinkhorn(scores, eps=eps, n_iters=n_iters) (no gradient),
        loss   = -1/B sum_b sum_k codes_bk log softmax(scores_b / temperature)_k.

    The loss is float32 (float64 for float64 input); codes and scores are in z's dtype, and a
    gradient reaching `scores` from elsewhere flows back too. One op: two cuBLAS products, the
    sinkhorn iteration and one row kernel forward; the products' and normalizations' gradients
    backward, with one autograd node in all.
    """
    op = "sinkhorn_prototype_loss"
    _validate.floating(op, z=z, prototypes=prototypes)
    _validate.matrix(op, "z", z, "(B, D)")
    _validate.matrix(op, "prototypes", prototypes, "(K, D)")
    if z.shape[1] != prototypes.shape[1]:
        raise ValueError(f"{op}: 'z' and 'prototypes' must have the same feature size, got "
                         f"{z.shape[1]} and {prototypes.shape[1]}")
    _validate.settings(op, ints=dict(n_iters=n_iters),
                       positive=dict(temperature=temperature, eps=eps))
    if not isinstance(normalize, bool):
        raise TypeError(f"{op}: 'normalize' must be a bool, got {type(normalize).__name__}")
    backend = _backend.resolve(op, z.device, z.dtype, n=z.shape[0], m=prototypes.shape[0])
    loss, codes, scores, *_ = _sinkhorn_prototype_loss(
        z, prototypes, float(temperature), float(eps), n_iters, normalize, backend)
    return loss, codes, scores
