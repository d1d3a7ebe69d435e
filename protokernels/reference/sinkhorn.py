"""sinkhorn in plain PyTorch: the two sweeps of the log-domain iteration, a tile of rows at a time.

The driver (protokernels/ops/sinkhorn.py) runs the iteration; every backend provides the same two
sweeps over the scores s (B, K), with a = scale (1/eps; -1/eps when s is a cost):
- sinkhorn_column_logsum: L_j = logsumexp_i(a s_ij), the first column step.
- sinkhorn_row_sweep: given column potentials v, the row step u_i = log r_i - logsumexp_j(a s_ij +
  v_j), and in the same pass the log column sums L_j = log sum_i exp(a s_ij + u_i + v_j) of the
  plan it makes (the next column step is v + log c - L); optionally the plan itself.
Both can also write v_next = v + log c - L. Marginals come as a log tensor or, when uniform, as a
constant. Accumulation is float32 (float64 for float64 scores).

Also here: the backward of sinkhorn_plan (the unrolled adjoint, see sinkhorn_plan_backward).
"""
from __future__ import annotations

import torch

from .._numerics import SCORE_LIMIT
from ._scratch import ranges, tile_sizes


def _row_tile(scores: torch.Tensor, acc: torch.dtype, temporaries: int) -> int:
    """Rows per tile so that `temporaries` (rows, K) tensors of `acc` fit the scratch budget."""
    k = max(scores.shape[1], 1)
    return tile_sizes({"b": scores.shape[0]}, lambda b: b * k * acc.itemsize * temporaries)["b"]


def _marginal(log_m: torch.Tensor | None, const: float, start: int, stop: int):
    return const if log_m is None else log_m[start:stop]


def scaled_scores(scores, scale, acc):
    """scale * scores in the accumulate dtype, clamped to +-SCORE_LIMIT: an infinite score acts as
    an overwhelming finite one (its row's mass goes to it) instead of making inf - inf = NaN of
    every potential (protokernels/_numerics.py)."""
    return (scores.to(acc) * scale).clamp_(-SCORE_LIMIT, SCORE_LIMIT)


def next_potential(v, log_c, log_c_const, l_out, v_next):
    """v_next = v + log c - L; a column of zero mass (log c = -inf) keeps v = -inf."""
    log_c = torch.full_like(l_out, log_c_const) if log_c is None else log_c.to(l_out.dtype)
    torch.where(torch.isneginf(log_c), log_c, v + log_c - l_out, out=v_next)


def sinkhorn_column_logsum(scores, scale, log_c, log_c_const, l_out, v_next):
    """l_out (K,) = logsumexp_i(scores_ij * scale); v_next (optional) = log c - l_out."""
    acc = l_out.dtype
    total = torch.full_like(l_out, -torch.inf)
    for r0, r1 in ranges(scores.shape[0], _row_tile(scores, acc, 2)):
        total = torch.logaddexp(total, torch.logsumexp(scaled_scores(scores[r0:r1], scale, acc),
                                                       dim=0))
    l_out.copy_(total)
    if v_next is not None:
        next_potential(torch.zeros_like(l_out), log_c, log_c_const, l_out, v_next)


def sinkhorn_row_sweep(scores, scale, v, log_r, log_r_const, log_c, log_c_const, l_out,
                       v_next, u_out, plan):
    """The row step with column potentials v (K,), and the log column sums of its plan (log-sum-
    exps, so that a column whose every term is below float range still gets its true log sum:
    with a zero-mass row or a tiny eps, its terms can all be e^-200 relative to their rows)."""
    acc = l_out.dtype
    logsum = torch.full_like(l_out, -torch.inf)
    for r0, r1 in ranges(scores.shape[0], _row_tile(scores, acc, 3)):
        z = scaled_scores(scores[r0:r1], scale, acc) + v
        u = _marginal(log_r, log_r_const, r0, r1) - torch.logsumexp(z, dim=1)
        t = z + u[:, None]  # log of the plan's entries
        logsum = torch.logaddexp(logsum, torch.logsumexp(t, dim=0))
        if u_out is not None:
            u_out[r0:r1] = u
        if plan is not None:
            plan[r0:r1] = torch.exp(t)
    l_out.copy_(logsum)
    if v_next is not None:
        next_potential(v, log_c, log_c_const, l_out, v_next)


def sinkhorn_plan_backward(grad, plan, cost, u_hist, v_hist, iterations, log_r, log_r_const,
                           log_c, log_c_const, scale):
    """The gradient w.r.t. cost of the plan after `iterations` Sinkhorn iterations (unrolled).

    With s = cost and a = scale = -1/eps, the forward is v_1 = log c - LSE_i(a s), then for t = 1..T
    u_t = log r - LSE_j(a s + v_t) and v_{t+1} = log c - LSE_i(a s + u_t), and P = exp(a s + u_T +
    v_T). Going back, with M_t = exp(a s + u_t + v_t) (plan after row step t) and N_t = exp(a s +
    u_{t-1} + v_t) (after column step t, u_0 = 0), adjoints u', v':
      row step t:    x = u'_t / r,  s' -= a x_i M_t,  v'_t -= sum_i x_i M_t
      column step t: y = v'_t / c,  s' -= a y_j N_t,  u'_{t-1} = -sum_j y_j N_t
    starting from G = grad * P: s' = a G, u'_T = rowsum G, v'_T = colsum G. Only the potentials
    (T x (B + K) numbers) are kept from the forward; M_t and N_t are recomputed a tile at a time.
    """
    acc = u_hist.dtype
    b, k = cost.shape
    steps = int(iterations)
    tile = _row_tile(cost, acc, 4)
    inv_r = _inverse_marginal(log_r, log_r_const, b, acc, cost.device)
    inv_c = _inverse_marginal(log_c, log_c_const, k, acc, cost.device)
    grad_cost = torch.empty((b, k), dtype=acc, device=cost.device)
    u_grad = torch.zeros(b, dtype=acc, device=cost.device)
    v_grad = torch.zeros(k, dtype=acc, device=cost.device)
    for r0, r1 in ranges(b, tile):
        g = grad[r0:r1].to(acc) * plan[r0:r1].to(acc)
        grad_cost[r0:r1] = g * scale
        u_grad[r0:r1] = g.sum(1)
        v_grad += g.sum(0)
    for t in range(steps - 1, -1, -1):
        x = u_grad * inv_r
        for r0, r1 in ranges(b, tile):
            m = torch.exp(scaled_scores(cost[r0:r1], scale, acc) + u_hist[t, r0:r1, None] + v_hist[t])
            m *= x[r0:r1, None]
            grad_cost[r0:r1] -= m * scale
            v_grad -= m.sum(0)
        y = v_grad * inv_c
        for r0, r1 in ranges(b, tile):
            u_before = u_hist[t - 1, r0:r1, None] if t > 0 else 0.0
            n = torch.exp(scaled_scores(cost[r0:r1], scale, acc) + u_before + v_hist[t])
            n *= y
            grad_cost[r0:r1] -= n * scale
            u_grad[r0:r1] = -n.sum(1)
        v_grad.zero_()
    return grad_cost.to(cost.dtype)


def _inverse_marginal(log_m, const, size, acc, device):
    """1 / m, and 0 where m = 0 (a zero-mass row or column passes no gradient)."""
    log_m = torch.full((size,), const, dtype=acc, device=device) if log_m is None else log_m.to(acc)
    return torch.where(torch.isneginf(log_m), 0.0, torch.exp(-log_m))
