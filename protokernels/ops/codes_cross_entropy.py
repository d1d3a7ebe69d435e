"""protokernels::codes_cross_entropy: the cross-entropy of soft targets against the softmax of
scores / temperature, -mean_b sum_k codes_bk log softmax(scores_b / T)_k: the Sinkhorn
prototypes' loss (prototypical-vae-sinkhorn, eq. 10; SwAV's swapped prediction) in one op.

Why one op: at the in-model sizes the Sinkhorn head's training step is host time, and the loss in
torch ops (log_softmax, division, product, row sum, mean) was five autograd nodes and their
launches. Here the forward is one row kernel (one read of the row: its value, its statistics and
a deterministic sum) and the backward one elementwise kernel from the statistics. The codes get
no gradient (they are targets).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from .._numerics import accumulate_dtype
from ..reference._losses import REDUCTIONS
from ._registry import custom_op

_ROWS = _backend.Implementations("codes_cross_entropy", "codes_cross_entropy_rows")
_GRAD = _backend.Implementations("codes_cross_entropy", "codes_cross_entropy_grad")


def _outputs(scores: Tensor, reduction: str):
    stats = scores.new_empty((scores.shape[0], 3), dtype=accumulate_dtype(scores.dtype))
    loss = stats.new_empty((scores.shape[0],) if reduction == "none" else ())
    return loss, stats, stats.new_empty(())


@custom_op("codes_cross_entropy")
def _codes_cross_entropy(scores: Tensor, codes: Tensor, temperature: float, reduction: str,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """scores, codes (B, K) -> loss, stats (B, 3) (each row's max score, log-sum of the shifted
    exponentials and codes' sum: what the backward needs), scale (what the backward multiplies
    a row's gradient by)."""
    if scores.numel() == 0:  # no rows, or rows of zero codes: every value is 0
        loss, stats, scale = _outputs(scores, reduction)
        return loss.zero_(), stats, scale.fill_(1 / max(scores.shape[0], 1)
                                                if reduction == "mean" else 1)
    return _ROWS[backend](scores, codes, temperature, reduction)


@_codes_cross_entropy.register_fake
def _(scores, codes, temperature, reduction, backend):
    return _outputs(scores, reduction)


@custom_op("codes_cross_entropy_grad")
def _codes_cross_entropy_grad(scores: Tensor, codes: Tensor, stats: Tensor, factor: Tensor,
                              temperature: float, backend: str) -> Tensor:
    """The gradient w.r.t. scores (B, K) of the rows' values weighted by factor (B,)."""
    if scores.numel() == 0:
        return torch.zeros_like(scores, memory_format=torch.contiguous_format)
    return _GRAD[backend](scores, codes, stats, factor, temperature)


@_codes_cross_entropy_grad.register_fake
def _(scores, codes, stats, factor, temperature, backend):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def codes_cross_entropy_grad(scores: Tensor, codes: Tensor, stats: Tensor, grad_loss: Tensor,
                             scale: Tensor, reduction: str, temperature: float,
                             backend: str) -> Tensor:
    """The gradient w.r.t. scores of protokernels::codes_cross_entropy's loss receiving
    grad_loss (for the ops whose backward runs it: this op's and sinkhorn_prototype_loss's)."""
    factor = grad_loss if reduction == "none" else (grad_loss * scale).expand(scores.shape[0])
    return _codes_cross_entropy_grad(scores, codes, stats, factor, temperature, backend)


def _setup_context(ctx, inputs, output):
    scores, codes, ctx.temperature, ctx.reduction, ctx.backend = inputs
    _, stats, scale = output
    ctx.mark_non_differentiable(stats, scale)
    ctx.save_for_backward(scores, codes, stats, scale)


def _backward(ctx, grad_loss, _grad_stats, _grad_scale):
    scores, codes, stats, scale = ctx.saved_tensors
    return codes_cross_entropy_grad(scores, codes, stats, grad_loss, scale, ctx.reduction,
                                    ctx.temperature, ctx.backend), None, None, None, None


_codes_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def codes_cross_entropy(scores: Tensor, codes: Tensor, *, temperature: float = 1.0,
                        reduction: str = "mean") -> Tensor:
    """-sum_k codes_bk log softmax(scores_b / temperature)_k per row b of scores (B, K), with soft
    targets `codes` (B, K) (e.g. protokernels.sinkhorn's), reduced by `reduction`: "mean" over
    the rows (0 for B = 0), "sum", or "none" ((B,) values). SwAV's swapped-prediction loss and the
    Sinkhorn prototypes' loss. The softmax is max-shifted (no overflow for any temperature); NaN in
    scores gives NaN. Returns float32 (float64 for float64 input). Differentiable w.r.t. scores:
    (sum_k codes_bk softmax_bk - codes_bk) / temperature, one elementwise kernel in the backward;
    the codes are targets and get no gradient. One row kernel reading each row once, no (B, K)
    intermediate.
    """
    op = "codes_cross_entropy"
    _validate.floating(op, scores=scores, codes=codes)
    if scores.dim() != 2 or codes.shape != scores.shape:
        raise ValueError(f"{op}: 'scores' must be 2-D (B, K) and 'codes' of the same shape, got "
                         f"{tuple(scores.shape)} and {tuple(codes.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    temperature = _validate.positive_number(op, "temperature", temperature)
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    backend = _backend.resolve(op, scores.device, scores.dtype, n=scores.shape[0],
                               m=scores.shape[1])
    return _codes_cross_entropy(scores, codes, temperature, reduction, backend)[0]
