"""Nearest-prototype search in Triton: one kernel for nearest, nearest_k, exclude, by-label and
both-ways search, never writing the (N, M) distance matrix.

A call is two launches in the common case:
1. `_prepare_kernel`, over the rows of x and y at once: squared norms, the flags of y's column
   tiles that hold a non-finite row, and for "tf32x3" the TF32 hi/lo split of both operands.
2. `_search_kernel`: a program owns a tile of x's rows and walks a range of y's column tiles (all
   of them, or a share when there are too few row tiles to fill the GPU), computing each distance
   tile on tensor cores and folding it into a running best per row (in registers). The best is
   kept as a packed int64 key (score bits << 32 | index): comparing keys compares scores, then
   indices, so ties go to the smaller index in one integer min. When one program sees all of a
   row's columns (one split), it also finishes: the winner's exact distance sum((x - y)^2),
   written straight into the output (whose strides are arguments, so dw_nearest's (N, G) layout
   needs no copy).
Otherwise (split columns, top-k, both ways) `_finish_kernel` turns the merged keys into indices and
exact distances, top-k slots ranked by them.

Ranking (the same in every backend, reference/nearest.py): a pair involving a row with NaN ranks
first (torch.argmin's NaN propagation); a pair involving a row with an infinite (or overflowing)
squared norm ranks after every finite distance; candidates that may not win (padding, excluded,
wrong label) never do, and a row without any gets index -1, distance inf. Indices are packed in
31 bits and scores are float32: float64 inputs are ranked by the reference backend (capabilities).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._capabilities import Capabilities
from ._common import (FLOAT32_MAX, SUMS_OF_SQUARES, TARGET_PROGRAMS, UPCAST_BF16, block, cdiv, dot,
                      fitted_config, launcher, next_power_of_2)

NO_KEY = 2**63 - 1  # "no allowed candidate": decodes to index -1, distance inf
# Kernels may only read globals that are constexpr.
_NO_KEY = tl.constexpr(NO_KEY)
_MAX = tl.constexpr(FLOAT32_MAX)
MAX_K = 64
# What these kernels can take (read by dispatch, protokernels/_capabilities.py).
CAPABILITIES = Capabilities(
    dtypes=(torch.float16, torch.bfloat16, torch.float32), max_rows=2**31 - 1, max_k=MAX_K,
    why="indices are packed in 31 bits and scores ranked as float32 keys; the reference backend "
        "takes float64")


@triton.jit
def _key(score, index):
    """Sortable int64 key of (score, index): the float32 score's bits made monotone as a signed
    integer, above the index. Scores are finite, -inf (NaN, ranks first) or +inf ("no allowed
    candidate", the largest key)."""
    bits = score.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | index.to(tl.int64)
    return tl.where(score == float("inf"), _NO_KEY, key)


@triton.jit
def _row_best(score, col0):
    """Key of the smallest score per row of a tile, ties to the smallest column."""
    low, first = tl.min(score, 1, return_indices=True, return_indices_tie_break_left=True)
    return _key(low, col0 + first)


@triton.jit
def _classified(score, row_norm, col_norm, row_ok, col_ok):
    """Scores of a tile that may hold non-finite rows: a NaN norm on either side ranks first
    (-inf), an infinite one after every finite score (the largest float32), and padding never
    wins (+inf). Only such tiles pay for this (flagged by _prepare_kernel)."""
    nan_pair = (row_norm != row_norm)[:, None] | (col_norm != col_norm)[None, :]
    inf_pair = (row_norm >= _MAX)[:, None] | (col_norm >= _MAX)[None, :]
    score = tl.where(inf_pair, _MAX, score)
    score = tl.where(nan_pair, float("-inf"), score)
    return tl.where(row_ok[:, None] & col_ok[None, :], score, float("inf"))


@triton.jit
def _fold_tile(acc, b, row0, row_ok, cols, col0, x_norm, y_norm, non_finite, excluded, x_label,
               best, best_other, top, Y_LABELS, COL_KEYS, M, K: tl.constexpr,
               HAS_EXCLUDE: tl.constexpr, HAS_LABELS: tl.constexpr, COLUMNS: tl.constexpr):
    """Fold a tile of x.y^T into the running bests. Rows are ranked by ||y||^2 - 2 x.y (||x||^2 is
    the same for the whole row), columns by ||x||^2 - 2 x.y: one FMA per element before the
    reductions. Out-of-range columns (rows) carry an infinite norm, so in a finite tile they
    score +inf and never win."""
    col_ok = cols < M
    score = y_norm[None, :] - 2.0 * acc
    if non_finite:
        score = _classified(score, x_norm, y_norm, row_ok, col_ok)
    if HAS_EXCLUDE:
        score = tl.where(cols[None, :] == excluded[:, None], float("inf"), score)
    if COLUMNS:  # nearest row per column, merged across programs
        col_score = x_norm[:, None] - 2.0 * acc
        if non_finite:
            col_score = _classified(col_score, x_norm, y_norm, row_ok, col_ok)
        low, first = tl.min(col_score, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.atomic_min(COL_KEYS + b * M + cols, _key(low, row0 + first), mask=col_ok)
    if HAS_LABELS:
        y_label = tl.load(Y_LABELS + b * M + cols, mask=col_ok, other=0)
        same = x_label[:, None] == y_label[None, :]
        best = tl.minimum(best, _row_best(tl.where(same, score, float("inf")), col0))
        best_other = tl.minimum(best_other, _row_best(tl.where(same, float("inf"), score), col0))
    elif K == 1:
        best = tl.minimum(best, _row_best(score, col0))
    else:
        # Move the tile's candidates into the set one per row per round, the best first, while
        # any row still has one better than its set's worst. After the first tiles few
        # candidates qualify, so this runs far fewer than K rounds.
        slots = tl.arange(0, top.shape[1])
        worst = tl.max(top, 1)
        low, first = tl.min(score, 1, return_indices=True, return_indices_tie_break_left=True)
        candidate = _key(low, col0 + first)
        while tl.max((candidate < worst).to(tl.int32), 0) > 0:
            replace = (slots[None, :] == tl.argmax(top, 1)[:, None]) & (candidate < worst)[:, None]
            top = tl.where(replace, candidate[:, None], top)
            score = tl.where(cols[None, :] == (col0 + first)[:, None], float("inf"), score)
            worst = tl.max(top, 1)
            low, first = tl.min(score, 1, return_indices=True, return_indices_tie_break_left=True)
            candidate = _key(low, col0 + first)
    return best, best_other, top


@triton.jit
def _load_dot(acc, X, Y, X_LO, Y_LO, x_base, y_base, rows64, row_ok, cols, ds, sx_n, sx_d, sy_m,
              sy_d, M, D, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
              SPLIT: tl.constexpr):
    """acc += x[rows, ds] . y[cols, ds]^T (3xTF32 from the pre-split parts with SPLIT)."""
    x_offsets = x_base + rows64[:, None] * sx_n + ds.to(tl.int64)[None, :] * sx_d
    y_offsets = y_base + cols.to(tl.int64)[:, None] * sy_m + ds.to(tl.int64)[None, :] * sy_d
    x_mask = row_ok[:, None] & (ds[None, :] < D)
    y_mask = (cols[:, None] < M) & (ds[None, :] < D)
    x = tl.load(X + x_offsets, mask=x_mask, other=0.0)
    y = tl.load(Y + y_offsets, mask=y_mask, other=0.0)
    acc = dot(x, tl.trans(y), acc, PRECISION, UPCAST_BF16)
    if SPLIT:  # hi.lo^T + lo.hi^T; lo.lo^T is below float32 rounding
        y_lo = tl.load(Y_LO + y_offsets, mask=y_mask, other=0.0)
        acc = dot(x, tl.trans(y_lo), acc, PRECISION, UPCAST_BF16)
        x_lo = tl.load(X_LO + x_offsets, mask=x_mask, other=0.0)
        acc = dot(x_lo, tl.trans(y), acc, PRECISION, UPCAST_BF16)
    return acc


@triton.jit
def _exact_distance(A, B, A_LO, B_LO, a_base, b_base, rows64, idx, valid, sa_r, sa_d, sb_r, sb_d,
                    D, GATHER, g_rows, sg_d, SPLIT: tl.constexpr, GATHERED: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """sum_d (a[rows, d] - b[idx, d])^2 in float32 for a block of pairs; with SPLIT the operands
    are their hi + lo parts (exactly the inputs). GATHERED: b[idx] is also stored to GATHER at
    element offsets g_rows + d * sg_d (dw_quantize's codes: the rows are read here anyway)."""
    total = tl.zeros(rows64.shape, tl.float32)
    a_rows = a_base + rows64 * sa_r
    b_rows = b_base + idx.to(tl.int64) * sb_r
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = valid[:, None] & (ds[None, :] < D)
        a_offsets = a_rows[:, None] + ds[None, :] * sa_d
        b_offsets = b_rows[:, None] + ds[None, :] * sb_d
        av = tl.load(A + a_offsets, mask=mask, other=0.0).to(tl.float32)
        bv = tl.load(B + b_offsets, mask=mask, other=0.0).to(tl.float32)
        if SPLIT:
            av += tl.load(A_LO + a_offsets, mask=mask, other=0.0)
            bv += tl.load(B_LO + b_offsets, mask=mask, other=0.0)
        if GATHERED:
            tl.store(GATHER + g_rows[:, None] + ds[None, :] * sg_d,
                     bv.to(GATHER.dtype.element_ty), mask=mask)
        diff = av - bv
        total += tl.sum(diff * diff, 1)
    return total


@triton.jit
def _store_pair(DIST, IDX, out, key, valid, A, B, A_LO, B_LO, a_base, b_base, rows64, sa_r, sa_d,
                sb_r, sb_d, D, GATHER, g_rows, sg_d, SPLIT: tl.constexpr,
                GATHERED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Decode keys of a block of rows and store (exact distance, index); none: (inf, -1)."""
    found = key != _NO_KEY
    idx = tl.where(found, key & 0xFFFFFFFF, 0)
    dist = _exact_distance(A, B, A_LO, B_LO, a_base, b_base, rows64, idx, valid & found, sa_r,
                           sa_d, sb_r, sb_d, D, GATHER, g_rows, sg_d, SPLIT, GATHERED, BLOCK_D)
    tl.store(DIST + out, tl.where(found, dist, float("inf")), mask=valid)
    tl.store(IDX + out, tl.where(found, idx, -1), mask=valid)


@triton.jit
def _search_kernel(X, Y, X_LO, Y_LO, X_NORM, Y_NORM, TILE_FLAGS, EXCLUDE, X_LABELS, Y_LABELS, KEYS,
                   COL_KEYS, DIST, IDX, GATHER,
                   N, M, D, tiles_n, tiles_per_split, splits,
                   sx_b, sx_n, sx_d, sy_b, sy_m, sy_d, snx_b, sny_b, sf_b, so_b, so_n,
                   sg_b, sg_n, sg_d,
                   PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                   SPLIT: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                   HAS_EXCLUDE: tl.constexpr, HAS_LABELS: tl.constexpr, COLUMNS: tl.constexpr,
                   FINISH: tl.constexpr, GATHERED: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """KEYS (B, N, splits, SLOTS): per split, the best K keys (SLOTS = K), or the best key of x's
    label and of other labels (SLOTS = 2). FINISH (one split, K = 1 or labels): instead, the exact
    distances and indices into DIST, IDX (B, N, SLOTS) with strides (so_b, so_n, 1), and with
    GATHERED (K = 1) the winners' rows of Y into GATHER (B, N, D), strides (sg_b, sg_n, sg_d).
    COLUMNS: also the best row per column, atomically min-ed into COL_KEYS (B, M). Norms (B, rows) with batch
    strides snx_b, sny_b (0: broadcast); TILE_FLAGS (B, column tiles), batch stride sf_b, marks
    the tiles holding a non-finite y row."""
    pid = tl.program_id(0)
    split = pid % splits
    tile_n = (pid // splits) % tiles_n
    b = (pid // (splits * tiles_n)).to(tl.int64)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    x_norm = tl.load(X_NORM + b * snx_b + rows64, mask=row_ok, other=float("inf"))
    rows_non_finite = tl.max((((x_norm != x_norm) | (x_norm >= _MAX)) & row_ok).to(tl.int32),
                             0) != 0
    excluded = tl.load(EXCLUDE + b * N + rows64, mask=row_ok & HAS_EXCLUDE, other=-1)
    x_label = tl.load(X_LABELS + b * N + rows64, mask=row_ok & HAS_LABELS, other=0)
    best = tl.full((BLOCK_N,), _NO_KEY, tl.int64)
    best_other = tl.full((BLOCK_N,), _NO_KEY, tl.int64)
    slots = tl.arange(0, K_PAD)
    # Top-k set, unordered; padding slots hold the smallest key so that they are never the
    # set's worst (the one replaced).
    top = tl.where(slots[None, :] < K, _NO_KEY, -_NO_KEY - 1) + tl.zeros((BLOCK_N, K_PAD), tl.int64)

    tiles_m = tl.cdiv(M, BLOCK_M)
    first_tile = split * tiles_per_split
    tiles = tl.minimum(tiles_per_split, tiles_m - first_tile)
    steps = tl.maximum(tl.cdiv(D, BLOCK_D), 1)  # D = 0 still needs one step (all distances 0)
    depth = tl.arange(0, BLOCK_D)
    x_base = b * sx_b
    y_base = b * sy_b
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    # One loop over (column tile, depth step) rather than nested loops: the tile's loads are
    # pipelined across column tiles too (same speed as nested on the H100, 1.28 vs 1.30 ms tf32).
    for it in range(0, tiles * steps):
        col0 = (first_tile + it // steps) * BLOCK_M
        cols = col0 + tl.arange(0, BLOCK_M)
        acc = _load_dot(acc, X, Y, X_LO, Y_LO, x_base, y_base, rows64, row_ok, cols,
                        (it % steps) * BLOCK_D + depth, sx_n, sx_d, sy_m, sy_d, M, D, PRECISION,
                        UPCAST_BF16, SPLIT)
        if it % steps == steps - 1:
            y_norm = tl.load(Y_NORM + b * sny_b + cols, mask=cols < M, other=float("inf"))
            tile_flag = tl.load(TILE_FLAGS + b * sf_b + col0 // BLOCK_M)
            best, best_other, top = _fold_tile(
                acc, b, tile_n * BLOCK_N, row_ok, cols, col0, x_norm, y_norm,
                rows_non_finite | (tile_flag != 0), excluded, x_label, best, best_other, top,
                Y_LABELS, COL_KEYS, M, K, HAS_EXCLUDE, HAS_LABELS, COLUMNS)
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)

    if FINISH:
        out = b * so_b + rows64 * so_n
        _store_pair(DIST, IDX, out, best, row_ok, X, Y, X_LO, Y_LO, x_base, y_base, rows64, sx_n,
                    sx_d, sy_m, sy_d, D, GATHER, b * sg_b + rows64 * sg_n, sg_d, SPLIT, GATHERED,
                    BLOCK_D)
        if HAS_LABELS:
            _store_pair(DIST, IDX, out + 1, best_other, row_ok, X, Y, X_LO, Y_LO, x_base, y_base,
                        rows64, sx_n, sx_d, sy_m, sy_d, D, GATHER, rows64, sg_d, SPLIT, False,
                        BLOCK_D)
    else:
        out = KEYS + ((b * N + rows64) * splits + split) * (2 if HAS_LABELS else K)
        if HAS_LABELS:
            tl.store(out, best, mask=row_ok)
            tl.store(out + 1, best_other, mask=row_ok)
        elif K == 1:
            tl.store(out, best, mask=row_ok)
        else:
            tl.store(out[:, None] + slots[None, :], top,
                     mask=row_ok[:, None] & (slots[None, :] < K))


@triton.jit
def _finish_kernel(KEYS, A, B, A_LO, B_LO, DIST, IDX, GATHER, R, D, sa_b, sa_r, sa_d, sb_b, sb_r,
                   sb_d, so_b, so_r, sg_b, sg_r, sg_d, SLOTS: tl.constexpr,
                   SLOTS_PAD: tl.constexpr, RANKED: tl.constexpr, SPLIT: tl.constexpr,
                   GATHERED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """For keys (B, R, SLOTS) contiguous: IDX = each key's index (-1 for none) and DIST its exact
    distance sum((a_r - b_idx)^2) (inf for none), into (B, R, SLOTS) with strides (so_b, so_r, 1).
    GATHERED (one slot): b_idx into GATHER (B, R, D), strides (sg_b, sg_r, sg_d).
    RANKED (top-k): the slots in ascending order of (exact distance, index), NaN first, "none"
    last: sorted as packed keys of the exact distances."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(1).to(tl.int64)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, SLOTS_PAD)
    mask = row_ok[:, None] & (slots[None, :] < SLOTS)
    keys = tl.load(KEYS + (b * R + rows64)[:, None] * SLOTS + slots[None, :], mask=mask,
                   other=_NO_KEY)
    dist = tl.full((BLOCK_R, SLOTS_PAD), float("inf"), tl.float32)
    for s in range(0, SLOTS):
        key = tl.sum(tl.where(slots[None, :] == s, keys, 0), 1)
        found = key != _NO_KEY
        idx = tl.where(found, key & 0xFFFFFFFF, 0)
        d = _exact_distance(A, B, A_LO, B_LO, b * sa_b, b * sb_b, rows64, idx, row_ok & found,
                            sa_r, sa_d, sb_r, sb_d, D, GATHER, b * sg_b + rows64 * sg_r, sg_d,
                            SPLIT, GATHERED, BLOCK_D)
        dist = tl.where((slots[None, :] == s) & found[:, None], d[:, None], dist)
    idx = tl.where(keys != _NO_KEY, keys & 0xFFFFFFFF, -1)
    if RANKED:
        # Re-rank by the exact distances: (NaN-first score bits << 32 | index), "none" last.
        ranked = _key(tl.where(dist != dist, float("-inf"),
                               tl.where(dist >= _MAX, _MAX, dist)), idx)
        ranked = tl.where(idx < 0, _NO_KEY, ranked)
        ranked = tl.sort(ranked, 1)
        order_idx = tl.where(ranked == _NO_KEY, -1, ranked & 0xFFFFFFFF)
        # The exact distance of each sorted slot: look it up by index (indices are distinct).
        sorted_dist = tl.full((BLOCK_R, SLOTS_PAD), float("inf"), tl.float32)
        for s in range(0, SLOTS):
            pick = tl.sum(tl.where(slots[None, :] == s, idx, 0), 1)
            value = tl.sum(tl.where(slots[None, :] == s, dist, 0.0), 1)
            sorted_dist = tl.where((order_idx == pick[:, None]) & (pick[:, None] >= 0),
                                   value[:, None], sorted_dist)
        dist, idx = sorted_dist, order_idx
    out = b * so_b + rows64[:, None] * so_r + slots[None, :]
    tl.store(DIST + out, dist, mask=mask)
    tl.store(IDX + out, idx, mask=mask)


@triton.jit
def _prepare_rows(T, T_HI, T_LO, NORM, FLAGS, b, row0, R, D, st_b, st_r, st_d, flag,
                  SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row0, row0 + BLOCK_R) of batch b of T (B, R, D): squared norms into NORM (B, R),
    clamped to the largest float32 (an overflowing row ranks as infinitely far; NaN stays NaN);
    with SPLIT the TF32 hi/lo parts into T_HI, T_LO (B, R, D) contiguous; FLAGS[flag] (if
    flag >= 0) = whether any of the rows is non-finite."""
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    base = T + b * st_b + rows64 * st_r
    total = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = row_ok[:, None] & (ds[None, :] < D)
        v = tl.load(base[:, None] + ds[None, :] * st_d, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(v * v, 1)
        if SPLIT:
            hi = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            out = (b * R + rows64)[:, None] * D + ds[None, :]
            tl.store(T_HI + out, hi, mask=mask)
            # an infinity is all hi (inf - inf would make the exact distance NaN)
            tl.store(T_LO + out, tl.where(hi == v, 0.0, v - hi), mask=mask)
    total = tl.where(total > _MAX, _MAX, total)  # NaN > x is false: kept
    tl.store(NORM + b * R + rows64, total, mask=row_ok)
    if flag >= 0:
        bad = ((total != total) | (total >= _MAX)) & row_ok
        tl.store(FLAGS + flag, tl.max(bad.to(tl.int8), 0))


@triton.jit
def _prepare_kernel(X, Y, X_HI, X_LO, Y_HI, Y_LO, X_NORM, Y_NORM, TILE_FLAGS,
                    BX, N, BY, M, D, x_blocks, sx_b, sx_n, sx_d, sy_b, sy_m, sy_d,
                    SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs [0, x_blocks) take x's rows (BX distinct batches), the rest y's column tiles of
    BLOCK_R rows (BY distinct batches), each writing its tile's flag."""
    pid = tl.program_id(0)
    if pid < x_blocks:
        per_batch = tl.cdiv(N, BLOCK_R)
        b = (pid // per_batch).to(tl.int64)
        _prepare_rows(X, X_HI, X_LO, X_NORM, TILE_FLAGS, b, (pid % per_batch) * BLOCK_R, N, D,
                      sx_b, sx_n, sx_d, -1, SPLIT, BLOCK_R, BLOCK_D)
    else:
        tile = pid - x_blocks
        per_batch = tl.cdiv(M, BLOCK_R)
        b = (tile // per_batch).to(tl.int64)
        _prepare_rows(Y, Y_HI, Y_LO, Y_NORM, TILE_FLAGS, b, (tile % per_batch) * BLOCK_R, M, D,
                      sy_b, sy_m, sy_d, tile, SPLIT, BLOCK_R, BLOCK_D)


@triton.jit
def _gather_grad_kernel(GRAD, A, B, IDX, GA, GB, R, S, D, T, sa_b, sa_r, sa_d, sb_b, sb_r, sb_d,
                        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """GA[b, r] = 2 sum_s g (a_r - b_idx) for GRAD and IDX (B, R, S) contiguous; the negated pair
    terms are atomically added into GB (B, T, D), contiguous, in the accumulate type."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < R
    b = tl.program_id(1).to(tl.int64)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds[None, :] < D
    ds64 = ds.to(tl.int64)
    mask = in_range[:, None] & d_ok
    a = tl.load(A + b * sa_b + rows[:, None] * sa_r + ds64[None, :] * sa_d, mask=mask,
                other=0.0).to(ACC)
    grad_a = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    for s in range(0, S):
        pair = (b * R + rows) * S + s
        idx = tl.load(IDX + pair, mask=in_range, other=-1)
        g = tl.load(GRAD + pair, mask=in_range, other=0.0).to(ACC)
        valid = mask & (idx >= 0)[:, None]
        bv = tl.load(B + b * sb_b + idx[:, None] * sb_r + ds64[None, :] * sb_d, mask=valid,
                     other=0.0).to(ACC)
        term = 2.0 * g[:, None] * (a - bv)
        grad_a += tl.where(valid, term, 0.0)
        tl.atomic_add(GB + (b * T + idx[:, None]) * D + ds64[None, :], -term, mask=valid)
    tl.store(GA + b * R * D + rows[:, None] * D + ds64[None, :], grad_a.to(GA.dtype.element_ty),
             mask=mask)


_launch_prepare = launcher(_prepare_kernel, **SUMS_OF_SQUARES)
_launch_search = launcher(_search_kernel, **SUMS_OF_SQUARES)
_launch_finish = launcher(_finish_kernel, **SUMS_OF_SQUARES)
_launch_gather_grad = launcher(_gather_grad_kernel)

# Launch configs by operand type: the fastest of scripts/tune_triton.py --op nearest on the H100
# at the spec's size (benchmarks/RESULTS.md, "nearest"); tiles shrink to fit small problems.
_SEARCH = {
    # search 1.28 ms tf32 (1.66 with 128x128 tiles, 1.30 with 256x128).
    torch.float32: dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=32, num_warps=8, num_stages=4),
    # 3xTF32 loads four tiles per step: half the depth keeps the stages in shared memory.
    "tf32x3": dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=16, num_warps=8, num_stages=4),
    # search 0.826 ms bf16 (1.04 with 128x128 tiles; 0.96 with BLOCK_D 32, 3 stages).
    torch.float16: dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=64, num_warps=8, num_stages=4),
}
_SEARCH[torch.bfloat16] = _SEARCH[torch.float16]
# Shallow rows (D <= 64, depthwise VQ's groups): scripts/tune_triton.py --op dw_nearest (N 65536,
# G 8, K 1024, Dg 64) on the H100: tf32 keeps 128x256 tiles with 3 stages (0.618 ms); 3xTF32 and
# bf16 take 128x128 tiles with 4 warps (tf32x3 1.345 vs 1.455 ms, bf16 0.578 vs 0.606 ms).
_SHALLOW_SEARCH = {
    torch.float32: dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=32, num_warps=8, num_stages=3),
    "tf32x3": dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=16, num_warps=4, num_stages=3),
    torch.float16: dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=32, num_warps=4, num_stages=3),
}
_SHALLOW_SEARCH[torch.bfloat16] = _SHALLOW_SEARCH[torch.float16]
# Splitting a row's columns over several programs (merged afterwards, one more launch) pays only
# when the programs of one split would each do a lot of work: at least this many multiply-adds
# per row (e.g. M 8192 at D 128).
_SPLIT_WORK = 2**20


def search_config(n: int, m: int, d: int, dtype: torch.dtype, precision: str) -> dict:
    """The search kernel's launch config."""
    table = _SHALLOW_SEARCH if d <= 64 else _SEARCH
    return fitted_config(table, dtype, precision, BLOCK_N=n, BLOCK_M=m, BLOCK_D=d)


def _broadcast_batch(t: torch.Tensor) -> int:
    """The batch count of t's distinct rows: 1 for a broadcast (stride-0) batch."""
    return 1 if t.stride(0) == 0 else t.shape[0]


def _prepare(x, y, split, block_m):
    """One launch: norms (distinct batches of x and y), y's tile flags, the hi/lo split.
    Returns (x_norm, y_norm, tile_flags, (x, x_lo), (y, y_lo)) with the operands to search."""
    batch, n, d = x.shape
    m = y.shape[1]
    bx, by = _broadcast_batch(x), _broadcast_batch(y)
    device = x.device
    x_norm = torch.empty((bx, n), dtype=torch.float32, device=device)
    y_norm = torch.empty((by, m), dtype=torch.float32, device=device)
    tiles_m = cdiv(m, block_m)
    # Flags per batch of y as the search indexes them: a broadcast y's flags are shared.
    flags = torch.empty((by, tiles_m), dtype=torch.int8, device=device)
    if split:
        x_hi, x_lo = torch.empty((2, bx, n, d), dtype=torch.float32, device=device)
        y_hi, y_lo = torch.empty((2, by, m, d), dtype=torch.float32, device=device)
    else:
        x_hi = x_lo = x
        y_hi = y_lo = y
    x_blocks = bx * cdiv(n, block_m)
    _launch_prepare((x_blocks + by * tiles_m,), x, y, x_hi, x_lo, y_hi, y_lo, x_norm, y_norm,
                    flags, bx, n, by, m, d, x_blocks, *x.stride(), *y.stride(), SPLIT=split,
                    BLOCK_R=block_m, BLOCK_D=block(d, 64), num_warps=8)
    if split:
        x_hi, x_lo = (t.expand(batch, n, d) for t in (x_hi, x_lo))
        y_hi, y_lo = (t.expand(batch, m, d) for t in (y_hi, y_lo))
    return x_norm, y_norm, flags, (x_hi, x_lo), (y_hi, y_lo)


def _search(x, y, precision, k=1, exclude=None, x_labels=None, y_labels=None, columns=False,
            out=None, gathered=None, config=None):
    """The search. With `out` = (dist, idx) views (B, N, slots) and one split (K = 1 or labels,
    not columns), finishes into them (and the winners' rows into `gathered` (B, N, D), if
    given) and returns None. Otherwise returns the packed keys
    (B, N, slots) of the best columns per row (slots = k, unordered, or 2 for labels), the best
    row per column (B, M) with `columns`, and the operands for _finish."""
    batch, n, d = x.shape
    m = y.shape[1]
    config = config or search_config(n, m, d, x.dtype, precision)
    block_m = config["BLOCK_M"]
    split = precision == "tf32x3" and x.dtype == torch.float32
    x_norm, y_norm, flags, (x, x_lo), (y, y_lo) = _prepare(x, y, split, block_m)
    tiles_n = cdiv(n, config["BLOCK_N"])
    tiles_m = cdiv(m, block_m)
    splits = 1
    if m * d >= _SPLIT_WORK:
        splits = max(1, min(tiles_m, TARGET_PROGRAMS // (batch * tiles_n)))
    tiles_per_split = cdiv(tiles_m, splits)
    splits = cdiv(tiles_m, tiles_per_split)
    slots = 2 if x_labels is not None else k
    finish = out is not None and splits == 1 and not columns and (k == 1 or x_labels is not None)
    if finish:
        dist, idx = out
        keys = idx
    else:
        keys = torch.empty((batch, n, splits, slots), dtype=torch.int64, device=x.device)
        dist = idx = keys
    col_keys = (torch.full((batch, m), NO_KEY, dtype=torch.int64, device=x.device) if columns
                else keys)
    _launch_search(
        (batch * tiles_n * splits,),
        x, y, x_lo, y_lo, x_norm, y_norm, flags,
        exclude if exclude is not None else keys,
        x_labels if x_labels is not None else keys, y_labels if y_labels is not None else keys,
        keys, col_keys, dist, idx, gathered if gathered is not None else dist, n, m, d, tiles_n,
        tiles_per_split, splits, *x.stride(), *y.stride(),
        *(t.stride(0) if t.shape[0] > 1 else 0 for t in (x_norm, y_norm, flags)),
        dist.stride(0), dist.stride(1), *(gathered.stride() if gathered is not None else (0,) * 3),
        PRECISION="tf32" if split else precision, UPCAST_BF16=UPCAST_BF16, SPLIT=split, K=k,
        K_PAD=next_power_of_2(k), HAS_EXCLUDE=exclude is not None,
        HAS_LABELS=x_labels is not None, COLUMNS=columns, FINISH=finish,
        GATHERED=finish and gathered is not None, **config)
    if finish:
        return None
    if splits == 1:
        keys = keys[:, :, 0]
    elif k == 1:
        keys = keys.amin(2)
    else:  # the best k of the splits' candidates
        keys = keys.flatten(2).topk(k, largest=False, sorted=False).values
    return keys, (col_keys if columns else None), (split, (x, x_lo), (y, y_lo))


def _finish(keys, a, b, out, split=False, ranked=False, gathered=None):
    """Indices and exact distances of keys (B, R, S) into out = (dist, idx) (B, R, S), strides
    (any, any, 1); `ranked` (top-k) slots in ascending order of the exact distances; `gathered`
    (B, R, D), one slot: the chosen rows of b."""
    batch, r, slots = keys.shape
    dist, idx = out
    (a, a_lo), (b, b_lo) = a, b
    block_r = max(1, min(64, 4096 // next_power_of_2(slots)))
    _launch_finish((cdiv(r, block_r), batch), keys.contiguous(), a, b, a_lo, b_lo, dist, idx,
                   gathered if gathered is not None else dist, r, a.shape[-1], *a.stride(),
                   *b.stride(), dist.stride(0), dist.stride(1),
                   *(gathered.stride() if gathered is not None else (0,) * 3),
                   SLOTS=slots, SLOTS_PAD=next_power_of_2(slots), RANKED=ranked, SPLIT=split,
                   GATHERED=gathered is not None, BLOCK_R=block_r,
                   BLOCK_D=block(a.shape[-1], 64), num_warps=4)


def nearest(x, y, exclude, k, precision, dist, idx, gathered=None):
    """x (B, N, D), y (B, M, D), exclude (B, N) or None -> dist, idx (B, N, k), ascending, filled
    (any strides with a unit slot stride); gathered (B, N, D) or None (k = 1): the winners' rows
    of y (a row without a winner is left as it is)."""
    searched = _search(x, y, precision, k=k, exclude=exclude, out=(dist, idx), gathered=gathered)
    if searched is not None:
        keys, _, (split, xs, ys) = searched
        _finish(keys, xs, ys, (dist, idx), split, ranked=k > 1, gathered=gathered)


def nearest_by_label(x, x_labels, y, y_labels, precision, dist, idx):
    """-> dist, idx (B, N, 2): slot 0 the nearest y of x's label, slot 1 of other labels."""
    searched = _search(x, y, precision, x_labels=x_labels, y_labels=y_labels, out=(dist, idx))
    if searched is not None:
        keys, _, (split, xs, ys) = searched
        _finish(keys, xs, ys, (dist, idx), split)


def nearest_both(x, y, precision, row_dist, row_idx, col_dist, col_idx):
    """Nearest y per x row into (row_dist, row_idx) (B, N) and nearest x per y row into
    (col_dist, col_idx) (B, M), from one pass over the tiles."""
    keys, col_keys, (split, xs, ys) = _search(x, y, precision, columns=True)
    _finish(keys, xs, ys, (row_dist[..., None], row_idx[..., None]), split)
    _finish(col_keys[..., None], ys, xs, (col_dist[..., None], col_idx[..., None]), split)


def gather_sqdist_grad(grad, a, b, idx):
    """(ga, gb) for dist (B, R, S) = ||a_r - b_idx||^2 and its gradient `grad`."""
    batch, r, slots = idx.shape
    t, d = b.shape[1], a.shape[-1]
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    ga = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    gb = torch.zeros(b.shape, dtype=acc_dtype, device=a.device)
    block_r, block_d = 32, block(d, 128)
    _launch_gather_grad((cdiv(r, block_r), batch, cdiv(d, block_d)), grad.contiguous(), a, b,
                        idx.contiguous(), ga, gb, r, slots, d, t, *a.stride(), *b.stride(),
                        ACC=tl.float64 if a.dtype == torch.float64 else tl.float32,
                        BLOCK_R=block_r, BLOCK_D=block_d)
    return ga, gb.to(b.dtype)
