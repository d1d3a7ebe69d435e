"""Nearest-prototype search in plain PyTorch, tile by tile: never more than the scratch budget.

Every search walks (batch, N) tiles and, inside them, M tiles of the distance matrix (the
expanded formula at the requested precision, as reference.sqdist), keeping the running best per
row. The chosen pairs' distances are then recomputed exactly as sum((x - y)^2), so the returned
distance does not carry the expanded formula's cancellation error.

Ranking rules, shared by every backend: smaller distance first, ties to the smaller index; a
pair involving a row that holds NaN ranks before everything (torch.argmin's NaN propagation: a
NaN row of x returns NaN, a NaN prototype wins every row); a pair involving a row with an
infinite (or overflowing) squared norm ranks after every finite distance, where the expanded
formula would give inf - inf; a candidate that may not win (excluded, wrong label) never does,
and a row without any allowed candidate gets index -1 and distance inf.
"""
from __future__ import annotations

import torch

from .._backend import matmul_precision
from .._numerics import accumulate_dtype
from ._scratch import ranges, tile_sizes


def _ranking(dist: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Distances as sort keys: NaN -> -inf (ranks first), inf -> the largest finite value (so that
    a real infinite distance still beats a forbidden candidate), forbidden -> inf."""
    rank = torch.where(dist.isnan(), -torch.inf, dist.clamp_max(torch.finfo(dist.dtype).max))
    return rank if allowed is None else rank.masked_fill(~allowed, torch.inf)


def _merge_best(best_rank, best_idx, rank, offset):
    """Keep the smaller of the running best (B, R, 1) and the tile's best; ties keep the running
    best, whose indices are smaller. Forbidden winners (rank inf) leave index -1."""
    tile_rank, tile_idx = rank.min(-1, keepdim=True)  # first occurrence on ties
    better = tile_rank < best_rank
    best_idx = torch.where(better & (tile_rank < torch.inf), tile_idx + offset, best_idx)
    return torch.minimum(best_rank, tile_rank), best_idx


def _merge_top_k(best_rank, best_idx, rank, offset, k):
    """Keep the k smallest of the running best (B, R, k), in order, and the tile. The running best
    comes first and holds smaller indices, so a stable sort breaks ties by index."""
    idx = torch.arange(offset, offset + rank.shape[-1], device=rank.device).expand(rank.shape)
    rank = torch.cat([best_rank, rank], -1)
    idx = torch.cat([best_idx, idx], -1)
    rank, order = rank.sort(dim=-1, stable=True)
    idx = idx.gather(-1, order[..., :k]).masked_fill(rank[..., :k] == torch.inf, -1)
    return rank[..., :k], idx


def _classified(dist, x_norm, y_norm):
    """The distance tile as ranked: NaN where either row holds NaN, inf where either has an
    infinite squared norm (the expanded formula gives inf - inf = NaN there)."""
    dist = torch.where(x_norm.isinf() | y_norm.isinf(), torch.inf, dist)
    return torch.where(x_norm.isnan() | y_norm.isnan(), torch.nan, dist)


def _distance_tiles(x, y, precision, tile_bytes_per_pair):
    """Yield (b0, b1, n0, n1, x_norm, per_m) where per_m() yields (m0, m1, dist) for the tiles of
    the (B, N, M) distance matrix, computed in the accumulate dtype at `precision`, classified as
    ranked. `tile_bytes_per_pair`: the caller's scratch per distance-tile element."""
    batch, n, d = x.shape
    m = y.shape[1]
    acc = accumulate_dtype(x.dtype)
    size = acc.itemsize
    # Per tile: x and y rows upcast, their norms, and the caller's temporaries per pair.
    tile = tile_sizes({"b": batch, "n": n, "m": m},
                      lambda b, n, m: b * (size * (n + m) * (d + 1) + tile_bytes_per_pair * n * m))
    for b0, b1 in ranges(batch, tile["b"]):
        for n0, n1 in ranges(n, tile["n"]):
            xs = x[b0:b1, n0:n1].to(acc)
            x_norm = xs.square().sum(-1, keepdim=True)

            def per_m(xs=xs, x_norm=x_norm, b0=b0, b1=b1):
                for m0, m1 in ranges(m, tile["m"]):
                    ys = y[b0:b1, m0:m1].to(acc)
                    y_norm = ys.square().sum(-1).unsqueeze(-2)
                    with matmul_precision(precision):
                        dist = torch.baddbmm(y_norm, xs, ys.mT, alpha=-2)
                    yield m0, m1, _classified(dist.add_(x_norm).clamp_min_(0), x_norm, y_norm)

            yield b0, b1, n0, n1, per_m


def _search(x, y, slots, allowed_in, precision):
    """Indices (B, N, slots) of the best allowed columns per row (slots = k, in order), where
    allowed_in(b0, b1, n0, n1, m0, m1) gives the (b, n, m) mask of the tile (or None)."""
    batch, n, _ = x.shape
    idx = torch.full((batch, n, slots), -1, dtype=torch.int64, device=x.device)
    acc = accumulate_dtype(x.dtype)
    # Scratch per distance-tile element: the ranking's keys and masks (about six tiles of acc);
    # top-k also sorts the tile with the running best (values, int64 indices, the sort's order
    # and its buffers): 20 tiles of acc, measured (nearest_k of 100 000 x 3000 rows, k 64, on
    # the CPU: 1.6 times the budget with 12).
    per_pair = acc.itemsize * (6 if slots == 1 else 20)
    for b0, b1, n0, n1, per_m in _distance_tiles(x, y, precision, per_pair):
        best_rank = torch.full((b1 - b0, n1 - n0, slots), torch.inf, dtype=acc, device=x.device)
        best_idx = idx[b0:b1, n0:n1].clone()
        for m0, m1, dist in per_m():
            rank = _ranking(dist, allowed_in(b0, b1, n0, n1, m0, m1))
            if slots == 1:
                best_rank, best_idx = _merge_best(best_rank, best_idx, rank, m0)
            else:
                best_rank, best_idx = _merge_top_k(best_rank, best_idx, rank, m0, slots)
        idx[b0:b1, n0:n1] = best_idx
    return idx


def _pair_differences(a, b, idx, acc):
    """Tiles of a_r - b_idx[r, s] for a (B, R, D), b (B, T, D), idx (B, R, S) within the scratch
    budget: yields (b0, b1, r0, r1, the idx tile, the difference (b, r, S, D) in `acc`); index -1
    reads row 0 (callers mask those pairs). Advanced indexing allocates only the gathered rows: a
    gather along dim 1 would need an index expanded to (b, r*S, D) (measured: it doubled
    pair_distances' peak memory)."""
    batch, r, slots = idx.shape
    d = a.shape[-1]
    # Per row: the gathered rows, their difference and the indexing's own buffers (or the
    # gradient's pair terms), about three (slots x D) tiles (measured: the CPU peak was 1.6 times
    # the budget counting two).
    tile = tile_sizes({"b": batch, "r": r},
                      lambda b, r: acc.itemsize * b * r * (3 * slots + 2) * d)
    for b0, b1 in ranges(batch, tile["b"]):
        rows_of = torch.arange(b1 - b0, device=b.device)[:, None, None]
        for r0, r1 in ranges(r, tile["r"]):
            i = idx[b0:b1, r0:r1]
            yield b0, b1, r0, r1, i, (a[b0:b1, r0:r1, None].to(acc)
                                      - b[b0:b1][rows_of, i.clamp_min(0)].to(acc))


def pair_distances(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum((a_r - b_idx[r, s])^2) for idx (B, R, S), exactly (no expansion): (B, R, S) in float32
    (float64 for float64 input); inf where idx is -1."""
    acc = accumulate_dtype(a.dtype)
    out = torch.empty(idx.shape, dtype=acc, device=a.device)
    for b0, b1, r0, r1, i, diff in _pair_differences(a, b, idx, acc):
        out[b0:b1, r0:r1] = diff.square_().sum(-1).masked_fill(i < 0, torch.inf)
    return out


def _finish(x, y, idx, ranked=False):
    """(dist, idx) for searched indices, distances exact; ranked (top-k) slots reordered by them."""
    dist = pair_distances(x, y, idx)
    if ranked:  # the search ranked by the expanded formula; re-sort by exact values
        rank, order = _ranking(dist, idx >= 0).sort(dim=-1, stable=True)
        dist, idx = dist.gather(-1, order), idx.gather(-1, order)
    return dist, idx


def nearest(x: torch.Tensor, y: torch.Tensor, exclude: torch.Tensor | None, k: int,
            precision: str, dist: torch.Tensor, idx: torch.Tensor,
            gathered: torch.Tensor | None = None) -> None:
    """x (B, N, D), y (B, M, D), exclude (B, N) or None -> dist, idx (B, N, k), ascending;
    gathered (B, N, D) or None (k = 1): the winners' rows of y (a row without a winner, idx -1,
    is left as it is)."""
    def allowed(b0, b1, n0, n1, m0, m1):
        if exclude is None:
            return None
        columns = torch.arange(m0, m1, device=x.device)
        return exclude[b0:b1, n0:n1, None] != columns
    found = _finish(x, y, _search(x, y, k, allowed, precision), ranked=k > 1)
    _store(found, dist, idx)
    if gathered is not None:  # without a boolean mask's device sync (CUDA graphs capture it)
        winners = found[1][..., 0]
        batches = torch.arange(y.shape[0], device=y.device)[:, None]
        codes = y[batches, winners.clamp_min(0)]
        gathered.copy_(torch.where((winners >= 0)[..., None], codes, gathered))


def nearest_by_label(x: torch.Tensor, x_labels: torch.Tensor, y: torch.Tensor,
                     y_labels: torch.Tensor, precision: str, dist: torch.Tensor,
                     idx: torch.Tensor) -> None:
    """Nearest y of the same label and of another label: dist, idx (B, N, 2), slot 0 the same."""
    def labelled(same):
        def allowed(b0, b1, n0, n1, m0, m1):
            equal = x_labels[b0:b1, n0:n1, None] == y_labels[b0:b1, None, m0:m1]
            return equal if same else ~equal
        return allowed
    # Two searches of the same tiles: simple, and the reference is about correctness.
    found = torch.cat([_search(x, y, 1, labelled(True), precision),
                       _search(x, y, 1, labelled(False), precision)], -1)
    _store(_finish(x, y, found), dist, idx)


def nearest_both(x: torch.Tensor, y: torch.Tensor, precision: str, row_dist: torch.Tensor,
                 row_idx: torch.Tensor, col_dist: torch.Tensor, col_idx: torch.Tensor) -> None:
    """Nearest y per x row and nearest x per y row into (row_dist, row_idx) (B, N), (col_dist,
    col_idx) (B, M). The column search is the row search with x and y swapped."""
    no_mask = lambda *_: None  # noqa: E731
    _store(_finish(x, y, _search(x, y, 1, no_mask, precision)), row_dist[..., None],
           row_idx[..., None])
    _store(_finish(y, x, _search(y, x, 1, no_mask, precision)), col_dist[..., None],
           col_idx[..., None])


def _store(found, dist, idx) -> None:
    dist.copy_(found[0])
    idx.copy_(found[1])


def gather_sqdist_grad(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor):
    """Gradient of dist[r, s] = ||a_r - b_idx[r, s]||^2 for grad (B, R, S): (ga, gb) with
    ga_r = 2 sum_s g (a_r - b_idx) and gb_j = -2 sum over pairs with idx = j of g (a_r - b_j).
    Pairs with idx -1 contribute nothing."""
    acc = accumulate_dtype(a.dtype)
    ga = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    gb = torch.zeros(b.shape, dtype=acc, device=a.device)
    for b0, b1, r0, r1, i, diff in _pair_differences(a, b, idx, acc):
        g = grad[b0:b1, r0:r1].to(acc).masked_fill(i < 0, 0)[..., None]
        pair = 2 * g * diff  # (b, r, S, D)
        ga[b0:b1, r0:r1] = pair.sum(2)
        for batch in range(b0, b1):  # index_add_: no (r*S, D) index tensor
            gb[batch].index_add_(0, i[batch - b0].clamp_min(0).flatten(),
                                 -pair[batch - b0].flatten(0, 1))
    return ga, gb.to(b.dtype)
