"""protokernels::sinkhorn and protokernels::sinkhorn_plan: entropic optimal transport by Sinkhorn
iterations in the log domain (prototypical-vae-sinkhorn..., §2.3, eq. 9-12; SwAV; Cuturi 2013).

The iteration runs on potentials, never on a scaled copy of the matrix. With scores s (B, K),
a = 1/eps (for a cost matrix, s = cost and a = -1/eps) and marginals r (B,), c (K,):
    v_1 = log c - logsumexp_i(a s_ij)                       (the first column step)
    u_t = log r - logsumexp_j(a s_ij + v_t)                 (row step t)
    v_{t+1} = v_t + log c - log sum_i exp(a s_ij + u_t + v_t)   (column step t + 1)
and the plan after T iterations is exp(a s + u_T + v_T): rows exact, columns within the reported
marginal error. Every sweep subtracts the row's maximum (row steps) or works from the previous
potentials, whose column sums are bounded below by 1/K of the mass, so nothing overflows or
underflows for any a s (tested down to eps = 1e-3 with |s|/eps = 1e4).

This file is the driver shared by the backends: each provides the two sweeps (reference/,
triton_kernels/ and csrc/ sinkhorn.*), one read of the scores each. Row step t and the column sums
of column step t + 1 are one sweep, so T iterations read the scores T + 1 times. A backend may
also provide the whole loop (`sinkhorn_iterate`: CUDA's one cooperative launch), which runs
whenever nothing has to happen between the sweeps.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, _validate
from .._numerics import accumulate_dtype
from ..reference.sinkhorn import next_potential
from ._registry import custom_op

_COLUMN_LOGSUM = _backend.Implementations("sinkhorn", "sinkhorn_column_logsum")
_ROW_SWEEP = _backend.Implementations("sinkhorn", "sinkhorn_row_sweep")
# The whole iteration in one call, where a backend has it (CUDA: one cooperative launch, against
# two launches per sweep from here): used when nothing runs between the sweeps (no tolerance
# check, no cross-rank combine).
_ITERATE = _backend.Implementations("sinkhorn", "sinkhorn_iterate", optional=True)

# tol is checked after iterations 1, 1 + CHECK_EVERY, 1 + 2 CHECK_EVERY, ..., as POT's ot.sinkhorn
# does (its `ii % 10 == 0`, counting from 0): a check is a device sync.
CHECK_EVERY = 10


class _Marginals(NamedTuple):
    """log r and log c: a tensor, or (tensor None) a constant for uniform marginals."""
    log_r: Tensor | None
    log_r_const: float
    log_c: Tensor | None
    log_c_const: float


def _iterate(backend: str, scores: Tensor, scale: float, n_iters: int, marginals: _Marginals,
             plan: Tensor, *, tol: float | None = None, combine=None,
             history: tuple[Tensor, Tensor] | None = None,
             logsum: Tensor | None = None) -> tuple[int, Tensor]:
    """Run n_iters iterations (fewer when the marginal error reaches tol) and write the plan.

    combine: all-reduces log column sums across ranks (then the column update runs here, after
    it). history: (u (n_iters, B), v (n_iters, K)) receive every iteration's potentials. logsum:
    the (K,) buffer of the log column sums (allocated if None).
    Returns (iterations run, log column sums of the plan).
    """
    log_r, log_r_const, log_c, log_c_const = marginals
    acc = accumulate_dtype(scores.dtype)
    k = scores.shape[1]
    if logsum is None:
        logsum = torch.empty(k, dtype=acc, device=scores.device)
    iterate = _ITERATE[backend]
    if iterate is not None and tol is None and combine is None:
        u_history, v_history = history if history is not None else (None, None)
        iterate(scores, scale, n_iters, log_r, log_r_const, log_c, log_c_const, plan, logsum,
                u_history, v_history)
        return n_iters, logsum
    column_logsum = _COLUMN_LOGSUM[backend]
    row_sweep = _ROW_SWEEP[backend]
    potentials = history[1] if history is not None else torch.empty((2, k), dtype=acc,
                                                                       device=scores.device)

    def v_of(t: int) -> Tensor:  # v_{t+1}: the history, or two buffers in turn
        return potentials[t] if history is not None else potentials[t % 2]

    def u_of(t: int) -> Tensor | None:
        return history[0][t] if history is not None else None

    column_logsum(scores, scale, log_c, log_c_const, logsum, None if combine else v_of(0))
    if combine:
        logsum = combine(logsum)
        next_potential(torch.zeros_like(logsum), log_c, log_c_const, logsum, v_of(0))
    iterations = n_iters
    for t in range(1, n_iters):
        row_sweep(scores, scale, v_of(t - 1), log_r, log_r_const, log_c, log_c_const, logsum,
                  None if combine else v_of(t), u_of(t - 1), None)
        if combine:
            logsum = combine(logsum)
            next_potential(v_of(t - 1), log_c, log_c_const, logsum, v_of(t))
        if (tol is not None and (t - 1) % CHECK_EVERY == 0
                and _marginal_error(logsum, log_c, log_c_const).item() < tol):
            iterations = t
            break
    row_sweep(scores, scale, v_of(iterations - 1), log_r, log_r_const, log_c, log_c_const,
              logsum, None, u_of(iterations - 1), plan)
    if combine:
        logsum = combine(logsum)
    return iterations, logsum


def _marginal_error(logsum: Tensor, log_c: Tensor | None, log_c_const: float) -> Tensor:
    """|| column sums - c ||_2, POT's stopping criterion (the rows are exact after a row step)."""
    target = math.exp(log_c_const) if log_c is None else log_c.exp()
    return torch.linalg.vector_norm(logsum.exp() - target)


def _all_reduce_logsum(logsum: Tensor, group) -> Tensor:
    """log sum over ranks of exp(logsum), without overflow: all-reduce the max, then the sum."""
    import torch.distributed as dist

    top = logsum.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isneginf(top), 0.0, top)
    total = torch.exp(logsum - top)
    dist.all_reduce(total, group=group)
    return top + total.log()


def _equipartition(rows: int, columns: int) -> _Marginals:
    """SwAV's marginals: every row carries mass 1, every column rows/K. (The column constant
    only keeps the potentials near 0; any constant gives the same codes.)"""
    return _Marginals(None, 0.0, None, math.log(max(rows, 1)) - math.log(columns))


def equipartition_codes(scores: Tensor, eps: float, n_iters: int, backend: str) -> Tensor:
    """scores (B, K) -> codes (B, K): SwAV's equipartition, rows summing to 1 (the body of
    protokernels::sinkhorn, for the ops that run it inside theirs)."""
    codes = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    if codes.numel() > 0:
        _iterate(backend, scores, 1.0 / eps, n_iters, _equipartition(*scores.shape), codes)
    return codes


@custom_op("sinkhorn")
def _sinkhorn(scores: Tensor, eps: float, n_iters: int, backend: str) -> Tensor:
    """scores (B, K) -> codes (B, K): SwAV's equipartition, rows summing to 1."""
    return equipartition_codes(scores, eps, n_iters, backend)


@_sinkhorn.register_fake
def _(scores, eps, n_iters, backend):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _log_marginals(cost: Tensor, r: Tensor | None, c: Tensor | None) -> _Marginals:
    acc = accumulate_dtype(cost.dtype)
    b, k = cost.shape
    return _Marginals(None if r is None else r.to(acc).log(), -math.log(max(b, 1)),
                      None if c is None else c.to(acc).log(), -math.log(max(k, 1)))


@custom_op("sinkhorn_plan")
def _sinkhorn_plan(cost: Tensor, r: Optional[Tensor], c: Optional[Tensor], eps: float,
                   n_iters: int, tol: Optional[float], keep_history: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """cost (B, K) -> (plan, u (H, B), v (H, K), iterations, log column sums of the plan (K,)),
    H = n_iters if keep_history (the backward's potentials) else 0. The marginal error is formed
    from the column sums only when asked (return_info): 4 small kernels less per call."""
    plan, u, v, iterations, logsum = _plan_outputs(cost, n_iters, keep_history)
    if plan.numel() > 0:
        used, _ = _iterate(backend, cost, -1.0 / eps, n_iters, _log_marginals(cost, r, c), plan,
                           tol=tol, history=(u, v) if keep_history else None, logsum=logsum)
        iterations.fill_(used)
    return plan, u, v, iterations, logsum


def _plan_outputs(cost, n_iters, keep_history):
    acc = accumulate_dtype(cost.dtype)
    b, k = cost.shape
    kept = n_iters if keep_history else 0
    # the potentials are zeroed: an early stop (tol) leaves rows unwritten
    zeros = functools.partial(torch.zeros, device=cost.device)
    return (torch.empty((b, k), dtype=cost.dtype, device=cost.device),
            zeros((kept, b), dtype=acc), zeros((kept, k), dtype=acc),
            zeros((), dtype=torch.int64),
            torch.full((k,), -math.inf, dtype=acc, device=cost.device))


@_sinkhorn_plan.register_fake
def _(cost, r, c, eps, n_iters, tol, keep_history, backend):
    return _plan_outputs(cost, n_iters, keep_history)


def _setup_plan_context(ctx, inputs, output):
    cost, r, c, ctx.eps, _, _, _, _ = inputs
    plan, u, v, iterations, logsum = output
    ctx.mark_non_differentiable(u, v, iterations, logsum)
    ctx.save_for_backward(cost, r, c, plan, u, v, iterations)


def _plan_backward(ctx, grad_plan, *_):
    cost, r, c, plan, u, v, iterations = ctx.saved_tensors
    grad_cost = _sinkhorn_plan_backward(grad_plan, plan, cost, r, c, u, v,
                                                              iterations, ctx.eps)
    return grad_cost, None, None, None, None, None, None, None


_sinkhorn_plan.register_autograd(_plan_backward, setup_context=_setup_plan_context)


@custom_op("sinkhorn_plan_backward")
def _sinkhorn_plan_backward(grad: Tensor, plan: Tensor, cost: Tensor, r: Optional[Tensor],
                            c: Optional[Tensor], u: Tensor, v: Tensor, iterations: Tensor,
                            eps: float) -> Tensor:
    """The unrolled gradient w.r.t. cost (reference/sinkhorn.py), on every backend: it recomputes
    the iterates from the kept potentials, a tile of rows at a time."""
    if cost.numel() == 0:
        return torch.zeros_like(cost)
    if u.shape[0] < iterations.item():
        raise RuntimeError("sinkhorn_plan_backward: the forward kept no potentials (it ran with "
                           "keep_history=False: cost did not require grad, or grad was disabled)")
    from ..reference.sinkhorn import sinkhorn_plan_backward

    return sinkhorn_plan_backward(grad, plan, cost, u, v, iterations.item(),
                                  *_log_marginals(cost, r, c), -1.0 / eps)


@_sinkhorn_plan_backward.register_fake
def _(grad, plan, cost, r, c, u, v, iterations, eps):
    return torch.empty_like(cost, memory_format=torch.contiguous_format)


def sinkhorn(scores: Tensor, *, eps: float = 0.05, n_iters: int = 3,
             process_group=None) -> Tensor:
    """SwAV's codes: the equipartition assignment of B samples to K prototypes.

    scores (B, K) -> Q (B, K) in scores' dtype, what SwAV's distributed_sinkhorn computes:
    Q = exp(scores / eps) normalized n_iters times, first so that every column (prototype) carries
    1/K of the mass, then so that every row (sample) carries 1/B; returned scaled so each row sums
    to 1. Computed in the log domain (float32, float64 for float64 scores): no overflow for any
    scores / eps, where exp(scores / eps) overflows beyond 88.

    Not differentiable: like SwAV's code (run under no_grad), the result carries no grad_fn.

    process_group: B is split across the ranks of this group (e.g. torch.distributed.group.WORLD,
    each rank passing its own rows); the column sums are all-reduced every iteration, so each rank
    gets its rows of the result of one process on the concatenated scores. Runs eagerly (the
    collectives sit between the kernels).
    """
    op = "sinkhorn"
    _validate.floating(op, scores=scores)
    rows, columns = _validate.matrix(op, "scores", scores, "(B samples, K prototypes)")
    eps = _validate.positive_number(op, "eps", eps)
    n_iters = _validate.positive_int(op, "n_iters", n_iters)
    backend = _backend.resolve(op, scores.device, scores.dtype, n=rows, m=columns,
                               stepwise=process_group is not None)
    scores = scores.detach()
    if process_group is None:
        return _sinkhorn(scores, eps, n_iters, backend)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{op}: argument 'process_group' was given, but torch.distributed is "
                         "not initialized (call torch.distributed.init_process_group first)")
    world = dist.get_world_size(process_group)
    codes = torch.empty((rows, columns), dtype=scores.dtype, device=scores.device)
    if columns > 0:
        _iterate(backend, scores, 1.0 / eps, n_iters, _equipartition(rows * world, columns),
                 codes, combine=functools.partial(_all_reduce_logsum, group=process_group))
    return codes


class SinkhornInfo(NamedTuple):
    """sinkhorn_plan(..., return_info=True): the plan, the iterations run and the L2 error of the
    plan's column sums against c (its row sums are exact)."""
    plan: Tensor
    iterations: int
    marginal_error: float


def sinkhorn_plan(cost: Tensor, r: Tensor | None = None, c: Tensor | None = None, *,
                  eps: float, n_iters: int = 100, tol: float | None = None,
                  return_info: bool = False) -> Tensor | SinkhornInfo:
    """Entropic optimal transport (Cuturi): the plan P (B, K) minimizing <P, cost> - eps H(P)
    with row sums r (B,) and column sums c (K,).

    r, c: non-negative, equal totals; None is uniform with total 1. Log-domain Sinkhorn (POT's
    ot.sinkhorn order: each iteration normalizes the columns, then the rows), stable for any
    cost / eps. Stops after n_iters iterations, or earlier once the L2 norm of the column sums'
    error is below tol, checked after iterations 1, 11, 21, ... exactly as POT's ot.sinkhorn
    (ot.sinkhorn(a, b, M, reg) is sinkhorn_plan(M, a, b, eps=reg, n_iters=1000, tol=1e-9)).
    Scores (-cost / eps) are clamped to +-1e30, so an infinite cost is an overwhelming finite
    one. return_info=True returns SinkhornInfo(plan, iterations, marginal_error) (one sync).

    Differentiable w.r.t. cost: the gradient is that of the unrolled iterations (exact for the
    plan computed, converged or not), computed from the potentials kept by the forward (n_iters x
    (B + K) numbers, kept only when cost requires grad). r and c get no gradient.
    """
    op = "sinkhorn_plan"
    _validate.floating(op, cost=cost)
    rows, columns = _validate.matrix(op, "cost", cost, "(B, K)")
    for name, m, size, dim in (("r", r, rows, 0), ("c", c, columns, 1)):
        if m is not None:
            _validate.marginal(op, name, m, "cost", cost, size, dim)
    _validate.equal_totals(op, r, c, (rows, columns))
    eps = _validate.positive_number(op, "eps", eps)
    n_iters = _validate.positive_int(op, "n_iters", n_iters)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not tol >= 0):
        raise ValueError(f"{op}: argument 'tol' must be None or a number >= 0, got {tol!r}")
    backend = _backend.resolve(op, cost.device, cost.dtype, n=rows, m=columns,
                               stepwise=tol is not None)
    keep_history = torch.is_grad_enabled() and cost.requires_grad
    plan, _, _, iterations, logsum = _sinkhorn_plan(
        cost, r, c, eps, n_iters, None if tol is None else float(tol), keep_history, backend)
    if return_info:
        marginals = _log_marginals(cost, r, c)
        error = _marginal_error(logsum, marginals.log_c, marginals.log_c_const)
        return SinkhornInfo(plan, int(iterations.item()), float(error.item()))
    return plan
