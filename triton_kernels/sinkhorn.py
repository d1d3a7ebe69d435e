"""sinkhorn in Triton: the two sweeps of the log-domain iteration (see reference/sinkhorn.py).

One HBM read of the scores per sweep. A program owns a set of rows and keeps, for every column,
its partial column sum in registers while it streams its rows: each row is loaded once, its
log-sum-exp taken, and its contribution exp(a s + u + v) added to the column sums while the row is
still in registers. The programs' partial sums (programs x K floats) are then added in a fixed
order by a small finish kernel, which also takes the log and the next column potential: results
are the same every run (no atomics).

The sums are linear (one exp per element, the sweep stays at the copy rate); a column whose every
term underflows (all its mass from rows where it is e^-100 below the row's best: a zero-mass row
elsewhere, a tiny eps) comes out below exp(-69) and the finish kernel takes its log-sum again,
exactly, from the row potentials the sweep wrote. (Online per-column log-sums in the sweep itself,
two exps per element, made the SwAV size 2.5 times slower on the H100: 0.55 against 0.18 ms.)

Rows wider than _RESIDENT_COLUMNS take the chunked path: the row is read twice (log-sum-exp, then
contributions; the second read mostly hits L1/L2) and the partial sums live in the program's own
row of the partials, in global memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._numerics import SCORE_LIMIT
from ._common import accumulator, cdiv, launcher, next_power_of_2, sm_count

_LIMIT = tl.constexpr(SCORE_LIMIT)

# Columns a program holds in registers (row, potentials and column sums: 3 x 32 floats a thread
# at 16 warps).
_RESIDENT_COLUMNS = 16384
_CHUNK_COLUMNS = 4096


def sweep_config(k: int) -> tuple[int, int, int, int]:
    """(BLOCK_K, rows per step, warps, programs per SM) of the row sweep for K columns.

    From scripts/profile_sinkhorn.py on the H100 (RESULTS.md): 8192-element tiles, 16 warps.
    K 3000: 2 rows, 16 warps 0.035 ms (1 row, 8 warps 0.042); K 16384: 1 row, 16 warps, 2.98 TB/s
    (32 warps or 1 program per SM: within 1%)."""
    block_k = max(16, next_power_of_2(k)) if k <= _RESIDENT_COLUMNS else _CHUNK_COLUMNS
    rows = max(1, min(8, 8192 // block_k))
    return block_k, rows, max(4, min(16, block_k * rows // 512)), 2


def _programs(scores: torch.Tensor, rows_per_step: int, per_sm: int) -> int:
    steps = cdiv(scores.shape[0], rows_per_step)
    if scores.device.type != "cuda":  # the interpreter: a few programs still test the partials
        return max(1, min(steps, 3))
    return max(1, min(steps, sm_count(scores.device.index) * per_sm))


@triton.jit
def _column_logsum_kernel(S, PART_MAX, PART_SUM, B, K, ss_b, ss_k, scale, rows_per_program,
                          ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """PART_MAX/PART_SUM (programs, K): each program's online log-sum-exp of a s over its rows
    (a = scale: 1/eps, or -1/eps for a cost matrix)."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    start = pid * rows_per_program
    stop = tl.minimum(B, start + rows_per_program)
    top = tl.full((BLOCK_K,), float("-inf"), ACC)
    total = tl.zeros((BLOCK_K,), ACC)
    for r0 in range(start, stop, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        mask = (rows < stop)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * ss_b + cols.to(tl.int64)[None, :] * ss_k
        z = tl.where(mask, _scaled(tl.load(S + offsets, mask=mask).to(ACC), scale), float("-inf"))
        new_top = tl.maximum(top, tl.max(z, 0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no row yet: nothing to scale
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(z - shift[None, :]), 0)
        top = new_top
    slot = pid.to(tl.int64) * K + cols
    tl.store(PART_MAX + slot, top, mask=col_ok)
    tl.store(PART_SUM + slot, total, mask=col_ok)


@triton.jit
def _row_terms(S, V, rows, row_ok, cols, col_ok, ss_b, ss_k, scale):
    """z = a s + v (a = scale) for a (ROWS, BLOCK_K) tile (masked entries: -inf)."""
    offsets = rows.to(tl.int64)[:, None] * ss_b + cols.to(tl.int64)[None, :] * ss_k
    mask = row_ok[:, None] & col_ok[None, :]
    v = tl.load(V + cols, mask=col_ok, other=0.0)
    # mask after scaling: scale is negative for a cost matrix
    z = tl.where(mask, _scaled(tl.load(S + offsets, mask=mask).to(v.dtype), scale) + v[None, :],
                 float("-inf"))
    return z, offsets, mask


@triton.jit
def _scaled(s, scale):
    """scale * s clamped to +-SCORE_LIMIT (protokernels/_numerics.py), NaN kept."""
    z = s * scale
    return tl.where(z > _LIMIT, _LIMIT, tl.where(z < -_LIMIT, -_LIMIT, z))


@triton.jit
def _row_log_r(LOG_R, rows, row_ok, log_r_const, ACC: tl.constexpr, HAS_LOG_R: tl.constexpr):
    if HAS_LOG_R:
        log_r = tl.load(LOG_R + rows, mask=row_ok, other=0.0).to(ACC)
    else:
        log_r = tl.full((rows.shape[0],), log_r_const, ACC)
    return log_r


@triton.jit
def _row_sweep_kernel(S, V, LOG_R, U, PLAN, PART, B, K, ss_b, ss_k, sp_b, sp_k, scale,
                      log_r_const, ACC: tl.constexpr, HAS_LOG_R: tl.constexpr,
                      WRITE_PLAN: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr):
    """PART (programs, K): each program's column sums of exp(a s + u + v) over its rows, with
    u = log r - logsumexp_j(a s + v) (written to U: the finish may need it); the plan itself to
    PLAN on request. Linear sums, one exp per element: a column whose every term underflows is
    caught and redone exactly by _finish_kernel."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    part = PART + pid.to(tl.int64) * K
    if RESIDENT:
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        colsum = tl.zeros((BLOCK_K,), ACC)
        for r0 in range(pid * ROWS, B, programs * ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_ok = rows < B
            z, offsets, mask = _row_terms(S, V, rows, row_ok, cols, col_ok, ss_b, ss_k, scale)
            log_r = _row_log_r(LOG_R, rows, row_ok, log_r_const, ACC, HAS_LOG_R)
            top = tl.where(row_ok, tl.max(z, 1), 0.0)
            p = tl.exp(z - top[:, None])
            mass = tl.sum(p, 1)
            w = p * (tl.exp(log_r) / mass)[:, None]  # = exp(z + u): the row carries mass r
            colsum += tl.sum(tl.where(mask, w, 0.0), 0)
            tl.store(U + rows, log_r - top - tl.log(mass), mask=row_ok)
            if WRITE_PLAN:
                plan_offsets = rows.to(tl.int64)[:, None] * sp_b + cols.to(tl.int64)[None, :] * sp_k
                tl.store(PLAN + plan_offsets, w.to(PLAN.dtype.element_ty), mask=mask)
        tl.store(part + cols, colsum, mask=col_ok)
    else:
        for c0 in range(0, K, BLOCK_K):
            cols = c0 + tl.arange(0, BLOCK_K)
            tl.store(part + cols, tl.zeros((BLOCK_K,), ACC), mask=cols < K)
        for r0 in range(pid * ROWS, B, programs * ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_ok = rows < B
            top = tl.full((ROWS,), float("-inf"), ACC)
            mass = tl.zeros((ROWS,), ACC)
            for c0 in range(0, K, BLOCK_K):
                cols = c0 + tl.arange(0, BLOCK_K)
                z, _, _ = _row_terms(S, V, rows, row_ok, cols, cols < K, ss_b, ss_k, scale)
                new_top = tl.where(row_ok, tl.maximum(top, tl.max(z, 1)), 0.0)
                mass = mass * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top[:, None]), 1)
                top = new_top
            log_r = _row_log_r(LOG_R, rows, row_ok, log_r_const, ACC, HAS_LOG_R)
            row_scale = tl.exp(log_r) / mass  # exp(u - top): the row carries mass r
            for c0 in range(0, K, BLOCK_K):
                cols = c0 + tl.arange(0, BLOCK_K)
                col_ok = cols < K
                z, offsets, mask = _row_terms(S, V, rows, row_ok, cols, col_ok, ss_b, ss_k,
                                              scale)
                w = tl.exp(z - top[:, None]) * row_scale[:, None]
                column_part = tl.load(part + cols, mask=col_ok, other=0.0)
                tl.store(part + cols, column_part + tl.sum(tl.where(mask, w, 0.0), 0),
                         mask=col_ok)
                if WRITE_PLAN:
                    plan_offsets = (rows.to(tl.int64)[:, None] * sp_b
                                    + cols.to(tl.int64)[None, :] * sp_k)
                    tl.store(PLAN + plan_offsets, w.to(PLAN.dtype.element_ty), mask=mask)
            tl.store(U + rows, log_r - top - tl.log(mass), mask=row_ok)


@triton.jit
def _finish_kernel(PART_SUM, PART_MAX, V, LOG_C, V_NEXT, L, S, U, programs, B, K, ss_b, ss_k,
                   scale, log_c_const, underflow, ACC: tl.constexpr, FROM_LOGSUMS: tl.constexpr,
                   HAS_V: tl.constexpr, HAS_LOG_C: tl.constexpr, UPDATE: tl.constexpr,
                   EXACT_FALLBACK: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """L = log of the programs' summed partials (FROM_LOGSUMS: partial log-sum-exps as max and
    scaled sum), in program order; with UPDATE also V_NEXT = V + log c - L.

    EXACT_FALLBACK (after a row sweep's linear sums): a column that should carry mass but whose
    sum came out below exp(underflow) had terms lost to underflow (all its mass comes from rows
    where it is e^-100 below the row's best: a zero-mass row elsewhere, a tiny eps); its log-sum
    is taken again, exactly, as an online log-sum-exp of a s_ij + v_j + u_i over the rows. Column
    blocks without such a column skip that (one comparison)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    if FROM_LOGSUMS:
        top = tl.full((BLOCK_K,), float("-inf"), ACC)
        for p0 in range(0, programs, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            mask = (ps < programs)[:, None] & col_ok[None, :]
            slots = ps.to(tl.int64)[:, None] * K + cols[None, :]
            top = tl.maximum(top, tl.max(tl.load(PART_MAX + slots, mask=mask,
                                                 other=float("-inf")), 0))
        shift = tl.where(top == float("-inf"), 0.0, top)
    else:
        shift = tl.zeros((BLOCK_K,), ACC)
    total = tl.zeros((BLOCK_K,), ACC)
    for p0 in range(0, programs, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < programs)[:, None] & col_ok[None, :]
        slots = ps.to(tl.int64)[:, None] * K + cols[None, :]
        part = tl.load(PART_SUM + slots, mask=mask, other=0.0)
        if FROM_LOGSUMS:
            part *= tl.exp(tl.load(PART_MAX + slots, mask=mask, other=float("-inf"))
                           - shift[None, :])
        total += tl.sum(part, 0)
    logsum = shift + tl.log(total)
    if HAS_LOG_C:
        log_c = tl.load(LOG_C + cols, mask=col_ok, other=0.0).to(ACC)
    else:
        log_c = tl.full((BLOCK_K,), log_c_const, ACC)
    if HAS_V:
        v = tl.load(V + cols, mask=col_ok, other=0.0)
    else:
        v = tl.zeros((BLOCK_K,), ACC)
    if EXACT_FALLBACK:
        redo = col_ok & (logsum < underflow) & (log_c > float("-inf"))
        if tl.max(redo.to(tl.int32), 0) > 0:
            top = tl.full((BLOCK_K,), float("-inf"), ACC)
            mass = tl.zeros((BLOCK_K,), ACC)
            for r0 in range(0, B, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                row_ok = rows < B
                z, _, mask = _row_terms(S, V, rows, row_ok, cols, redo, ss_b, ss_k, scale)
                u = tl.load(U + rows, mask=row_ok, other=float("-inf"))
                t = tl.where(mask, z + u[:, None], float("-inf"))
                new_top = tl.maximum(top, tl.max(t, 0))
                ref = tl.where(new_top == float("-inf"), 0.0, new_top)
                mass = mass * tl.exp(top - ref) + tl.sum(tl.exp(t - ref[None, :]), 0)
                top = new_top
            logsum = tl.where(redo, tl.where(top == float("-inf"), 0.0, top) + tl.log(mass),
                              logsum)
    tl.store(L + cols, logsum, mask=col_ok)
    if UPDATE:
        # a column of zero mass (log c = -inf) keeps v = -inf (not -inf - -inf)
        tl.store(V_NEXT + cols, tl.where(log_c == float("-inf"), log_c, v + log_c - logsum),
                 mask=col_ok)


_launch_column_logsum = launcher(_column_logsum_kernel)
_launch_row_sweep = launcher(_row_sweep_kernel)
_launch_finish = launcher(_finish_kernel)


def _finish(part_sum, part_max, v, log_c, log_c_const, l_out, v_next, sweep=None):
    """sweep: (scores, scale, u) after a row sweep: columns whose linear sum underflowed are
    redone exactly."""
    programs, k = part_sum.shape
    acc = accumulator(l_out.dtype)
    block_k = 128
    scores, scale, u = sweep if sweep is not None else (l_out[None], 0.0, l_out)
    _launch_finish(
        (cdiv(k, block_k),), part_sum, part_max if part_max is not None else part_sum,
        v if v is not None else l_out, log_c if log_c is not None else l_out,
        v_next if v_next is not None else l_out, l_out, scores, u, programs, scores.shape[0], k,
        *scores.stride(), scale, log_c_const,
        # sums below exp(-69) (float32; exp(-690) in float64) may have lost every term
        -690.0 if l_out.dtype == torch.float64 else -69.0, ACC=acc,
        FROM_LOGSUMS=part_max is not None, HAS_V=v is not None, HAS_LOG_C=log_c is not None,
        UPDATE=v_next is not None, EXACT_FALLBACK=sweep is not None, ROWS=16, BLOCK_P=32,
        BLOCK_K=block_k, num_warps=4)


def sinkhorn_column_logsum(scores, scale, log_c, log_c_const, l_out, v_next):
    """l_out (K,) = logsumexp_i(scores_ij * scale); v_next (optional) = log c - l_out."""
    b, k = scores.shape
    acc = accumulator(l_out.dtype)
    block_k = min(1024, max(16, next_power_of_2(k)))
    rows = 8
    column_blocks = cdiv(k, block_k)
    programs = max(1, min(cdiv(b, rows), cdiv(_programs(scores, 1, 4), column_blocks)))
    rows_per_program = max(1, cdiv(cdiv(b, programs), rows)) * rows
    programs = max(1, cdiv(b, rows_per_program))
    part_max = torch.empty((programs, k), dtype=l_out.dtype, device=scores.device)
    part_sum = torch.empty_like(part_max)
    _launch_column_logsum(
        (programs, column_blocks), scores, part_max, part_sum, b, k, *scores.stride(), scale,
        rows_per_program, ACC=acc, ROWS=rows, BLOCK_K=block_k, num_warps=4)
    _finish(part_sum, part_max, None, log_c, log_c_const, l_out, v_next)


def sinkhorn_row_sweep(scores, scale, v, log_r, log_r_const, log_c, log_c_const, l_out,
                       v_next, u_out, plan):
    """The row step with column potentials v (K,), and the log column sums of its plan."""
    b, k = scores.shape
    acc = accumulator(l_out.dtype)
    block_k, rows, num_warps, per_sm = sweep_config(k)
    programs = _programs(scores, rows, per_sm)
    part = torch.empty((programs, k), dtype=l_out.dtype, device=scores.device)
    if u_out is None:  # the finish's exact fallback needs the row potentials
        u_out = torch.empty(b, dtype=l_out.dtype, device=scores.device)
    plan_strides = plan.stride() if plan is not None else (0, 0)
    _launch_row_sweep(
        (programs,), scores, v, log_r if log_r is not None else v, u_out,
        plan if plan is not None else scores, part, b, k, *scores.stride(), *plan_strides, scale,
        log_r_const, ACC=acc, HAS_LOG_R=log_r is not None, WRITE_PLAN=plan is not None, ROWS=rows, BLOCK_K=block_k, RESIDENT=k <= _RESIDENT_COLUMNS,
        num_warps=num_warps)
    _finish(part, None, v, log_c, log_c_const, l_out, v_next, sweep=(scores, scale, u_out))
