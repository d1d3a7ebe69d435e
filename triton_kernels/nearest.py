"""Nearest-prototype search in Triton: one kernel for nearest, nearest_k, exclude, by-label and
both-ways search, never writing the (N, M) distance matrix.

A program owns a tile of x's rows and walks a range of y's column tiles (all of them, or a
share when there are too few row tiles to fill the GPU), computing each distance tile on tensor
cores and folding it into a running best per row (in registers). The best is kept as a packed
int64 key (distance bits << 32 | index): comparing keys compares distances, then indices, so
ties go to the smaller index in one integer min. A second small kernel turns the keys into
indices and exact distances sum((x - y)^2); the gradient kernel scatters into the winners.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sqdist import (_ACCUMULATOR, _UPCAST_BF16, _block, _dot, cdiv, fitted_config, next_power_of_2,
                     split_operands)

NO_KEY = 2**63 - 1  # "no allowed candidate": decodes to index -1, distance inf
# Kernels may only read globals that are constexpr.
_NO_KEY = tl.constexpr(NO_KEY)
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _key(score, index):
    """Sortable int64 key of (score, index): the float32 score's bits made monotone as a signed
    integer, above the index. Scores are finite or -inf (NaN, which ranks first); +inf means "no
    allowed candidate" and gives the largest key."""
    bits = score.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | index.to(tl.int64)
    return tl.where(score == float("inf"), _NO_KEY, key)


@triton.jit
def _nan_first(score):
    return tl.where(score != score, float("-inf"), score)


@triton.jit
def _non_finite(norm, ok):
    """Whether any valid row has a NaN or infinite norm (norms are clamped to the float32 range,
    so infinity shows as its largest value)."""
    return tl.max((((norm != norm) | (norm >= _FLOAT32_MAX)) & ok).to(tl.int32), 0) != 0


@triton.jit
def _row_best(score, col0):
    """Key of the smallest score per row of a tile, ties to the smallest column."""
    low, first = tl.min(score, 1, return_indices=True, return_indices_tie_break_left=True)
    return _key(low, col0 + first)


@triton.jit
def _fold_tile(acc, b, row0, cols, col0, x_norm, non_finite, excluded, x_label, best, best_other, top,
               Y_NORM, Y_LABELS, COL_KEYS, M, K: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
               HAS_LABELS: tl.constexpr, COLUMNS: tl.constexpr):
    """Fold a tile of x.y^T into the running bests. Rows are ranked by ||y||^2 - 2 x.y (||x||^2 is
    the same for the whole row), columns by ||x||^2 - 2 x.y: one FMA per element before the
    reductions. Out-of-range columns (rows) carry an infinite norm, so they never win."""
    col_ok = cols < M
    y_norm = tl.load(Y_NORM + b * M + cols, mask=col_ok, other=float("inf"))
    acc = acc.to(tl.float32)
    score = y_norm[None, :] - 2.0 * acc
    # NaN ranks first. Only a NaN or infinite input row can make a score NaN, so the mapping runs
    # only for tiles flagged by the norms (per element it cost 7% at tf32; a per-tile reduction
    # over the norms in the kernel cost 17%).
    if non_finite:
        score = _nan_first(score)
    if HAS_EXCLUDE:
        score = tl.where(cols[None, :] == excluded[:, None], float("inf"), score)
    if COLUMNS:  # nearest row per column, merged across programs
        col_score = x_norm[:, None] - 2.0 * acc
        if non_finite:
            col_score = _nan_first(col_score)
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
    acc = _dot(x, tl.trans(y), acc, PRECISION, UPCAST_BF16)
    if SPLIT:  # hi.lo^T + lo.hi^T; lo.lo^T is below float32 rounding
        y_lo = tl.load(Y_LO + y_offsets, mask=y_mask, other=0.0)
        acc = _dot(x, tl.trans(y_lo), acc, PRECISION, UPCAST_BF16)
        x_lo = tl.load(X_LO + x_offsets, mask=x_mask, other=0.0)
        acc = _dot(x_lo, tl.trans(y), acc, PRECISION, UPCAST_BF16)
    return acc


@triton.jit
def _search_kernel(X, Y, X_LO, Y_LO, X_NORM, Y_NORM, TILE_FLAGS, EXCLUDE, X_LABELS, Y_LABELS, KEYS,
                   COL_KEYS,
                   N, M, D, tiles_n, tiles_per_split, splits,
                   sx_b, sx_n, sx_d, sy_b, sy_m, sy_d,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                   SPLIT: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                   HAS_EXCLUDE: tl.constexpr, HAS_LABELS: tl.constexpr, COLUMNS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """KEYS (B, N, splits, SLOTS): per split, the best K keys (SLOTS = K), or the best key of x's
    label and of other labels (SLOTS = 2). COLUMNS: also the best row per column, atomically
    min-ed into COL_KEYS (B, M). Norms are precomputed, clamped to the float32 range;
    TILE_FLAGS (B, column tiles) marks the tiles holding a non-finite y row."""
    pid = tl.program_id(0)
    split = pid % splits
    tile_n = (pid // splits) % tiles_n
    b = (pid // (splits * tiles_n)).to(tl.int64)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    x_norm = tl.load(X_NORM + b * N + rows64, mask=row_ok, other=float("inf"))
    rows_non_finite = _non_finite(x_norm, row_ok)
    excluded = tl.load(EXCLUDE + b * N + rows64, mask=row_ok & HAS_EXCLUDE, other=-1)
    x_label = tl.load(X_LABELS + b * N + rows64, mask=row_ok & HAS_LABELS, other=0)
    best = tl.full((BLOCK_N,), _NO_KEY, tl.int64)
    best_other = tl.full((BLOCK_N,), _NO_KEY, tl.int64)
    slots = tl.arange(0, K_PAD)
    # Top-k set, unordered; padding slots hold the smallest key so that they are never the
    # set's worst (the one replaced).
    top = tl.where(slots[None, :] < K, _NO_KEY, -_NO_KEY - 1) + tl.zeros((BLOCK_N, K_PAD), tl.int64)

    first_tile = split * tiles_per_split
    tiles = tl.minimum(tiles_per_split, tl.cdiv(M, BLOCK_M) - first_tile)
    steps = tl.maximum(tl.cdiv(D, BLOCK_D), 1)  # D = 0 still needs one step (all distances 0)
    depth = tl.arange(0, BLOCK_D)
    x_base = b * sx_b
    y_base = b * sy_b
    acc = tl.zeros((BLOCK_N, BLOCK_M), ACC)
    # One loop over (column tile, depth step) rather than nested loops: the tile's loads are
    # pipelined across column tiles too (same speed as nested on the H100, 1.28 vs 1.30 ms tf32).
    for it in range(0, tiles * steps):
        col0 = (first_tile + it // steps) * BLOCK_M
        cols = col0 + tl.arange(0, BLOCK_M)
        acc = _load_dot(acc, X, Y, X_LO, Y_LO, x_base, y_base, rows64, row_ok, cols,
                        (it % steps) * BLOCK_D + depth, sx_n, sx_d, sy_m, sy_d, M, D, PRECISION,
                        UPCAST_BF16, SPLIT)
        if it % steps == steps - 1:
            tile_flag = tl.load(TILE_FLAGS + b * tl.cdiv(M, BLOCK_M) + col0 // BLOCK_M)
            best, best_other, top = _fold_tile(
                acc, b, tile_n * BLOCK_N, cols, col0, x_norm, rows_non_finite | (tile_flag != 0),
                excluded, x_label, best, best_other,
                top, Y_NORM, Y_LABELS, COL_KEYS, M, K, HAS_EXCLUDE, HAS_LABELS, COLUMNS)
            acc = tl.zeros((BLOCK_N, BLOCK_M), ACC)

    out = KEYS + ((b * N + rows64) * splits + split) * (2 if HAS_LABELS else K)
    if HAS_LABELS:
        tl.store(out, best, mask=row_ok)
        tl.store(out + 1, best_other, mask=row_ok)
    elif K == 1:
        tl.store(out, best, mask=row_ok)
    else:
        tl.store(out[:, None] + slots[None, :], top, mask=row_ok[:, None] & (slots[None, :] < K))


@triton.jit
def _pair_distance_kernel(KEYS, A, B, DIST, IDX, P, R, S, D, sa_b, sa_r, sa_d, sb_b, sb_r, sb_d,
                          ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """For the P = B*R*S keys (B, R, S): IDX = the key's index (-1 for none) and
    DIST = sum((a_r - b_idx)^2) exactly, in the accumulate type (inf for none)."""
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = pairs < P
    b = pairs // (R * S)
    r = (pairs // S) % R
    key = tl.load(KEYS + pairs, mask=in_range, other=_NO_KEY)
    found = key != _NO_KEY
    idx = tl.where(found, key & 0xFFFFFFFF, 0)
    a_rows = A + b * sa_b + r * sa_r
    b_rows = B + b * sb_b + idx * sb_r
    total = tl.zeros((BLOCK_P,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = in_range[:, None] & (ds[None, :] < D)
        av = tl.load(a_rows[:, None] + ds[None, :] * sa_d, mask=mask, other=0.0).to(ACC)
        bv = tl.load(b_rows[:, None] + ds[None, :] * sb_d, mask=mask, other=0.0).to(ACC)
        diff = av - bv
        total += tl.sum(diff * diff, 1)
    tl.store(DIST + pairs, tl.where(found, total, float("inf")), mask=in_range)
    tl.store(IDX + pairs, tl.where(found, idx, -1), mask=in_range)


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


# Launch configs by operand type: the fastest of scripts/tune_triton.py --op nearest on the H100
# at the spec's size (benchmarks/RESULTS.md, "nearest"); tiles shrink to fit small problems.
_SEARCH = {
    # search 1.28 ms tf32 (1.66 with 128x128 tiles, 1.30 with 256x128).
    torch.float32: dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=32, num_warps=8, num_stages=4),
    # 3xTF32 loads four tiles per step: half the depth keeps the stages in shared memory.
    "tf32x3": dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=16, num_warps=8, num_stages=4),
    # search 0.826 ms bf16 (1.04 with 128x128 tiles; 0.96 with BLOCK_D 32, 3 stages).
    torch.float16: dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=64, num_warps=8, num_stages=4),
    torch.float64: dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=16, num_warps=4, num_stages=2),
}
_SEARCH[torch.bfloat16] = _SEARCH[torch.float16]
# Programs wanted per launch: a few per SM of the largest GPU (132 SMs on the H100), so that a
# small N still spreads over the GPU by splitting the columns.
_TARGET_PROGRAMS = 4 * 132


# Shallow rows (D <= 64, depthwise VQ's groups): scripts/tune_triton.py --op dw_nearest (N 65536,
# G 8, K 1024, Dg 64) on the H100: tf32 keeps 128x256 tiles with 3 stages (0.618 ms); 3xTF32 and
# bf16 take 128x128 tiles with 4 warps (tf32x3 1.345 vs 1.455 ms, bf16 0.578 vs 0.606 ms).
_SHALLOW_SEARCH = {
    torch.float32: dict(BLOCK_N=128, BLOCK_M=256, BLOCK_D=32, num_warps=8, num_stages=3),
    "tf32x3": dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=16, num_warps=4, num_stages=3),
    torch.float16: dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=32, num_warps=4, num_stages=3),
    torch.float64: _SEARCH[torch.float64],
}
_SHALLOW_SEARCH[torch.bfloat16] = _SHALLOW_SEARCH[torch.float16]


def search_config(n: int, m: int, d: int, dtype: torch.dtype, precision: str) -> dict:
    """The search kernel's launch config."""
    table = _SHALLOW_SEARCH if d <= 64 else _SEARCH
    return fitted_config(table, dtype, precision, BLOCK_N=n, BLOCK_M=m, BLOCK_D=d)


@triton.jit
def _norms_kernel(T, NORMS, P, R, D, st_b, st_r, st_d, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """NORMS[p] = min(||T[b, r]||^2, largest float32) for the P = B*R rows; NaN stays NaN."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < P
    base = T + (rows // R) * st_b + (rows % R) * st_r
    total = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        v = tl.load(base[:, None] + ds[None, :] * st_d, mask=row_ok[:, None] & (ds[None, :] < D),
                    other=0.0).to(ACC)
        total += tl.sum(v * v, 1)
    total = tl.where(total > _FLOAT32_MAX, _FLOAT32_MAX, total)  # NaN > x is false: kept
    tl.store(NORMS + rows, total.to(tl.float32), mask=row_ok)


def _squared_norms(t: torch.Tensor) -> torch.Tensor:
    """||t_r||^2 (B, R) in float32, contiguous, at most the largest float32 (an overflowing row
    still ranks, behind every finite one). One kernel: torch's vector_norm took 0.15 ms for
    depthwise VQ's x (65536 x 8 rows of 64, a strided view) on the H100, three times a read of x."""
    batch, rows, depth = t.shape
    norms = torch.empty((batch, rows), dtype=torch.float32, device=t.device)
    block_d = _block(depth, 64)
    block_r = max(16, 2048 // block_d)
    _norms_kernel[(cdiv(batch * rows, block_r),)](
        t, norms, batch * rows, rows, depth, *t.stride(), ACC=_ACCUMULATOR.get(t.dtype, tl.float32),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return norms


def _search(x, y, precision, k=1, exclude=None, x_labels=None, y_labels=None, columns=False,
            config=None):
    """Packed keys (B, N, slots) of the best columns per row (slots = k, unordered, or 2 for
    labels), and with `columns` also the best row per column (B, M)."""
    batch, n, d = x.shape
    m = y.shape[1]
    if m >= 2**31 or (columns and n >= 2**31):
        raise ValueError("nearest: the packed keys hold 31-bit indices; M (and N for "
                         f"nearest_both) must be below 2**31, got N {n}, M {m}")
    acc = _ACCUMULATOR.get(x.dtype, tl.float32)
    x_norm, y_norm = _squared_norms(x), _squared_norms(y)
    config = config or search_config(n, m, d, x.dtype, precision)
    tiles_n = cdiv(n, config["BLOCK_N"])
    tiles_m = cdiv(m, config["BLOCK_M"])
    non_finite = y_norm.isnan() | (y_norm >= torch.finfo(torch.float32).max)
    tile_flags = torch.nn.functional.pad(non_finite, (0, tiles_m * config["BLOCK_M"] - m))
    tile_flags = tile_flags.view(batch, tiles_m, config["BLOCK_M"]).any(-1).to(torch.int8)
    splits = max(1, min(tiles_m, _TARGET_PROGRAMS // (batch * tiles_n)))
    tiles_per_split = cdiv(tiles_m, splits)
    splits = cdiv(tiles_m, tiles_per_split)
    slots = 2 if x_labels is not None else k
    keys = torch.empty((batch, n, splits, slots), dtype=torch.int64, device=x.device)
    col_keys = (torch.full((batch, m), NO_KEY, dtype=torch.int64, device=x.device) if columns
                else keys)
    split, precision, (x, x_lo), (y, y_lo) = split_operands(x, y, precision)
    _search_kernel[(batch * tiles_n * splits,)](
        x, y, x_lo, y_lo, x_norm, y_norm, tile_flags,
        exclude if exclude is not None else keys,
        x_labels if x_labels is not None else keys, y_labels if y_labels is not None else keys,
        keys, col_keys, n, m, d, tiles_n, tiles_per_split, splits, *x.stride(), *y.stride(),
        ACC=acc, PRECISION=precision, UPCAST_BF16=_UPCAST_BF16, SPLIT=split, K=k,
        K_PAD=next_power_of_2(k), HAS_EXCLUDE=exclude is not None,
        HAS_LABELS=x_labels is not None, COLUMNS=columns, **config)
    if splits == 1:
        keys = keys[:, :, 0]
    elif k == 1:
        keys = keys.amin(2)
    else:  # the best k of the splits' candidates
        keys = keys.flatten(2).topk(k, largest=False, sorted=False).values
    return keys, (col_keys if columns else None)


def _finish(keys, a, b, ranked=False):
    """(dist, idx) from keys (B, R, S): indices and exact distances; ranked (top-k) slots are put
    in ascending order of the exact distances (ties by index)."""
    batch, r, slots = keys.shape
    dist = torch.empty(keys.shape, device=a.device,
                       dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
    idx = torch.empty(keys.shape, dtype=torch.int64, device=a.device)
    pairs = keys.numel()
    block_p, block_d = 64, _block(a.shape[-1], 64)
    _pair_distance_kernel[(cdiv(pairs, block_p),)](
        keys.contiguous(), a, b, dist, idx, pairs, r, slots, a.shape[-1], *a.stride(),
        *b.stride(), ACC=_ACCUMULATOR.get(a.dtype, tl.float32), BLOCK_P=block_p, BLOCK_D=block_d)
    if ranked:
        # Ascending by (distance, index), NaN first as in the search: sort by index, then stably
        # by the distance ranks.
        idx, order = idx.sort(dim=-1)
        dist = dist.gather(-1, order)
        rank = torch.where(dist.isnan(), -torch.inf, dist.clamp_max(torch.finfo(dist.dtype).max))
        rank = rank.masked_fill(idx < 0, torch.inf)
        _, order = rank.sort(dim=-1, stable=True)
        dist, idx = dist.gather(-1, order), idx.gather(-1, order)
    return dist, idx


def nearest(x, y, exclude, k, precision):
    """x (B, N, D), y (B, M, D), exclude (B, N) or None -> dist, idx (B, N, k), ascending."""
    keys, _ = _search(x, y, precision, k=k, exclude=exclude)
    return _finish(keys, x, y, ranked=k > 1)


def nearest_by_label(x, x_labels, y, y_labels, precision):
    """-> dist, idx (B, N, 2): slot 0 the nearest y of x's label, slot 1 of other labels."""
    keys, _ = _search(x, y, precision, x_labels=x_labels, y_labels=y_labels)
    return _finish(keys, x, y)


def nearest_both(x, y, precision):
    """-> row_dist, row_idx (B, N), col_dist, col_idx (B, M), from one pass over the tiles."""
    keys, col_keys = _search(x, y, precision, columns=True)
    row_dist, row_idx = _finish(keys, x, y)
    col_dist, col_idx = _finish(col_keys[..., None], y, x)
    return row_dist[..., 0], row_idx[..., 0], col_dist[..., 0], col_idx[..., 0]


def gather_sqdist_grad(grad, a, b, idx):
    """(ga, gb) for dist (B, R, S) = ||a_r - b_idx||^2 and its gradient `grad`."""
    batch, r, slots = idx.shape
    t, d = b.shape[1], a.shape[-1]
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    ga = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    gb = torch.zeros(b.shape, dtype=acc_dtype, device=a.device)
    block_r, block_d = 32, _block(d, 128)
    grid = (cdiv(r, block_r), batch, cdiv(d, block_d))
    _gather_grad_kernel[grid](grad.contiguous(), a, b, idx.contiguous(), ga, gb, r, slots, d, t,
                              *a.stride(), *b.stride(), ACC=_ACCUMULATOR.get(a.dtype, tl.float32),
                              BLOCK_R=block_r, BLOCK_D=block_d)
    return ga, gb.to(b.dtype)
