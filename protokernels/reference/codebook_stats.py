"""codebook_stats in plain PyTorch: index_add_ into (G*K) flat slots, a tile of rows at a time.

On the CPU index_add_ is deterministic; on CUDA it uses atomics unless PyTorch's deterministic
mode is on, which `deterministic` turns on for the call (PyTorch then sorts the indices).
"""
from __future__ import annotations

import contextlib

import torch

from ._scratch import ranges, tile_sizes
from .._numerics import accumulate_dtype


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled and not previous[0]:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if enabled and not previous[0]:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def codebook_stats(x: torch.Tensor, idx: torch.Tensor, size: int, deterministic: bool):
    """x (N, G*Dg), idx (N, G) -> sums (G, K, Dg) in the accumulate dtype, counts (G, K) int64.
    Out-of-range indices (unchecked under torch.compile) are ignored: they land in a spare slot."""
    n, groups = idx.shape
    depth = x.shape[1] // groups
    acc = accumulate_dtype(x.dtype)
    spare = groups * size
    counts = torch.zeros(spare + 1, dtype=torch.int64, device=x.device)
    sums = torch.zeros((spare + 1, depth), dtype=acc, device=x.device)
    offsets = torch.arange(groups, device=x.device) * size
    tile = tile_sizes({"n": n}, lambda n: n * groups * (depth * acc.itemsize + 24))
    with _deterministic_algorithms(deterministic):
        for n0, n1 in ranges(n, tile["n"]):
            codes = idx[n0:n1]
            slots = torch.where((codes >= 0) & (codes < size), codes + offsets, spare).flatten()
            rows = x[n0:n1].unflatten(1, (groups, depth)).flatten(0, 1)  # (n * G, Dg)
            sums.index_add_(0, slots, rows.to(acc))
            counts.index_add_(0, slots, torch.ones_like(slots))
    return sums[:spare].view(groups, size, depth), counts[:spare].view(groups, size)
