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

from .sqdist import _ACCUMULATOR, _UPCAST_BF16, _block, _dot, _split_tf32

_NO_KEY = 2**63 - 1  # "no allowed candidate": decodes to index -1, distance inf
_FLOAT32_MAX = 3.4028234663852886e38


@triton.jit
def _ranks(dist, allowed):
    """Distances (clamped at 0) as float32 ranks: NaN -> -1 (ranks first, like torch.argmin's
    NaN propagation), inf -> the largest float (a real infinity still beats a forbidden
    candidate), forbidden -> inf."""
    dist = dist.to(tl.float32)
    rank = tl.where(dist != dist, -1.0, tl.minimum(dist, _FLOAT32_MAX))
    return tl.where(allowed, rank, float("inf"))


@triton.jit
def _pack(rank, index):
    """Sortable int64 key of (rank, index): rank bits (NaN's -1 sign-extends below every
    distance) above the index; no candidate (inf) -> the largest key."""
    bits = tl.where(rank < 0, -1, rank.to(tl.int32, bitcast=True))
    key = (bits.to(tl.int64) << 32) | index.to(tl.int64)
    return tl.where(rank == float("inf"), _NO_KEY, key)


@triton.jit
def _best_per_row(rank, cols):
    """The smallest rank per row of a tile and its smallest column."""
    low = tl.min(rank, 1)
    first = tl.min(tl.where(rank == low[:, None], cols[None, :], 2147483647), 1)
    return low, first


@triton.jit
def _search_kernel(X, Y, X_LO, Y_LO, X_NORM, Y_NORM, EXCLUDE, X_LABELS, Y_LABELS, KEYS, COL_KEYS,
                   N, M, D, tiles_n, tiles_per_split, splits,
                   sx_b, sx_n, sx_d, sy_b, sy_m, sy_d,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                   SPLIT: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                   HAS_EXCLUDE: tl.constexpr, HAS_LABELS: tl.constexpr, COLUMNS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """KEYS (B, N, splits, SLOTS): per split, the best K keys (SLOTS = K), or the best key of x's
    label and of other labels (SLOTS = 2). COLUMNS: also the best row per column, atomically
    min-ed into COL_KEYS (B, M)."""
    pid = tl.program_id(0)
    split = pid % splits
    tile_n = (pid // splits) % tiles_n
    b = (pid // (splits * tiles_n)).to(tl.int64)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    x_norm = tl.load(X_NORM + b * N + rows64, mask=row_ok, other=0.0)
    if HAS_EXCLUDE:
        excluded = tl.load(EXCLUDE + b * N + rows64, mask=row_ok, other=-1)
    if HAS_LABELS:
        x_label = tl.load(X_LABELS + b * N + rows64, mask=row_ok, other=0)
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
    acc = tl.zeros((BLOCK_N, BLOCK_M), ACC)
    # One flat loop over (column tile, depth step), so that loads are pipelined across column
    # tiles too; the distance tile is folded in at each tile's last step.
    for it in range(0, tiles * steps):
        cols = (first_tile + it // steps) * BLOCK_M + tl.arange(0, BLOCK_M)
        ds = (it % steps) * BLOCK_D + depth
        x_offsets = b * sx_b + rows64[:, None] * sx_n + ds.to(tl.int64)[None, :] * sx_d
        y_offsets = b * sy_b + cols.to(tl.int64)[:, None] * sy_m + ds.to(tl.int64)[None, :] * sy_d
        x_mask = row_ok[:, None] & (ds[None, :] < D)
        y_mask = (cols[:, None] < M) & (ds[None, :] < D)
        x = tl.load(X + x_offsets, mask=x_mask, other=0.0)
        y = tl.load(Y + y_offsets, mask=y_mask, other=0.0)
        acc = _dot(x, tl.trans(y), acc, PRECISION, UPCAST_BF16)
        if SPLIT:  # 3xTF32: hi.lo^T + lo.hi^T; lo.lo^T is below float32 rounding
            y_lo = tl.load(Y_LO + y_offsets, mask=y_mask, other=0.0)
            acc = _dot(x, tl.trans(y_lo), acc, PRECISION, UPCAST_BF16)
            x_lo = tl.load(X_LO + x_offsets, mask=x_mask, other=0.0)
            acc = _dot(x_lo, tl.trans(y), acc, PRECISION, UPCAST_BF16)
        if it % steps == steps - 1:
            col_ok = cols < M
            y_norm = tl.load(Y_NORM + b * M + cols, mask=col_ok, other=0.0)
            dist = x_norm[:, None] + y_norm[None, :] - 2.0 * acc
            dist = tl.where(dist <= 0.0, 0.0, dist)  # clamp; -0.0 -> 0.0, NaN kept
            allowed = col_ok[None, :] & row_ok[:, None]
            if HAS_EXCLUDE:
                allowed = allowed & (cols[None, :] != excluded[:, None])
            if COLUMNS:  # nearest row per column, merged across programs
                col_rank = _ranks(dist, allowed)
                low = tl.min(col_rank, 0)
                first = tl.min(tl.where(col_rank == low[None, :], rows[:, None], 2147483647), 0)
                tl.atomic_min(COL_KEYS + b * M + cols, _pack(low, first), mask=col_ok)
            if HAS_LABELS:
                y_label = tl.load(Y_LABELS + b * M + cols, mask=col_ok, other=0)
                same = x_label[:, None] == y_label[None, :]
                low, first = _best_per_row(_ranks(dist, allowed & same), cols)
                best = tl.minimum(best, _pack(low, first))
                low, first = _best_per_row(_ranks(dist, allowed & ~same), cols)
                best_other = tl.minimum(best_other, _pack(low, first))
            elif K == 1:
                low, first = _best_per_row(_ranks(dist, allowed), cols)
                best = tl.minimum(best, _pack(low, first))
            else:
                # Move the tile's candidates into the set one per row per round, the best first,
                # while any row still has one better than its set's worst. After the first
                # tiles few candidates qualify, so this runs far fewer than K rounds.
                rank = _ranks(dist, allowed)
                worst = tl.max(top, 1)
                low, first = _best_per_row(rank, cols)
                candidate = _pack(low, first)
                while tl.max((candidate < worst).to(tl.int32), 0) > 0:
                    replace = (slots[None, :] == tl.argmax(top, 1)[:, None]) & \
                        (candidate < worst)[:, None]
                    top = tl.where(replace, candidate[:, None], top)
                    rank = tl.where(cols[None, :] == first[:, None], float("inf"), rank)
                    worst = tl.max(top, 1)
                    low, first = _best_per_row(rank, cols)
                    candidate = _pack(low, first)
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


# Launch configs by operand type (benchmarks/RESULTS.md, "nearest"); tiles shrink to fit small
# problems. The running-best epilogue adds a (BLOCK_N, BLOCK_M) float32 tile of ranks to the
# accumulator, so the tiles are smaller than sqdist's.
_SEARCH = {
    torch.float32: dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=32, num_warps=8, num_stages=3),
    "tf32x3": dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=16, num_warps=8, num_stages=3),
    torch.float16: dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=64, num_warps=8, num_stages=3),
    torch.float64: dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=16, num_warps=4, num_stages=2),
}
_SEARCH[torch.bfloat16] = _SEARCH[torch.float16]
# Programs wanted per launch: a few per SM of the largest GPU (132 SMs on the H100), so that a
# small N still spreads over the GPU by splitting the columns.
_TARGET_PROGRAMS = 4 * 132


def search_config(n: int, m: int, d: int, dtype: torch.dtype, precision: str) -> dict:
    split = dtype == torch.float32 and precision == "tf32x3"
    config = dict(_SEARCH["tf32x3" if split else dtype])
    config["BLOCK_N"] = _block(n, config["BLOCK_N"])
    config["BLOCK_M"] = _block(m, config["BLOCK_M"])
    config["BLOCK_D"] = _block(d, config["BLOCK_D"])
    return config


def _squared_norms(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """||t_r||^2 (B, R), contiguous, in the accumulate type."""
    return torch.linalg.vector_norm(t, dim=-1, dtype=acc).square_()


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
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_norm, y_norm = _squared_norms(x, acc_dtype), _squared_norms(y, acc_dtype)
    config = config or search_config(n, m, d, x.dtype, precision)
    tiles_n = triton.cdiv(n, config["BLOCK_N"])
    tiles_m = triton.cdiv(m, config["BLOCK_M"])
    splits = max(1, min(tiles_m, _TARGET_PROGRAMS // (batch * tiles_n)))
    tiles_per_split = triton.cdiv(tiles_m, splits)
    splits = triton.cdiv(tiles_m, tiles_per_split)
    slots = 2 if x_labels is not None else k
    keys = torch.empty((batch, n, splits, slots), dtype=torch.int64, device=x.device)
    col_keys = (torch.full((batch, m), _NO_KEY, dtype=torch.int64, device=x.device) if columns
                else keys)
    split = precision == "tf32x3" and x.dtype == torch.float32
    if split:
        (x, x_lo), (y, y_lo) = _split_tf32(x), _split_tf32(y)
        precision = "tf32"
    else:
        x_lo, y_lo = x, y
    _search_kernel[(batch * tiles_n * splits,)](
        x, y, x_lo, y_lo, x_norm, y_norm,
        exclude if exclude is not None else keys,
        x_labels if x_labels is not None else keys, y_labels if y_labels is not None else keys,
        keys, col_keys, n, m, d, tiles_n, tiles_per_split, splits, *x.stride(), *y.stride(),
        ACC=acc, PRECISION=precision, UPCAST_BF16=_UPCAST_BF16, SPLIT=split, K=k,
        K_PAD=triton.next_power_of_2(k), HAS_EXCLUDE=exclude is not None,
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
    _pair_distance_kernel[(triton.cdiv(pairs, block_p),)](
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
    grid = (triton.cdiv(r, block_r), batch, triton.cdiv(d, block_d))
    _gather_grad_kernel[grid](grad.contiguous(), a, b, idx.contiguous(), ga, gb, r, slots, d, t,
                              *a.stride(), *b.stride(), ACC=_ACCUMULATOR.get(a.dtype, tl.float32),
                              BLOCK_R=block_r, BLOCK_D=block_d)
    return ga, gb.to(b.dtype)
