"""codebook_lookup in plain PyTorch: an advanced-indexing gather, a tile of rows at a time."""
from __future__ import annotations

import torch

from ._scratch import ranges, tile_sizes


def codebook_lookup(idx: torch.Tensor, codebooks: torch.Tensor, out: torch.Tensor) -> None:
    """Fill out (N, G*Dg) with codebooks[g, idx[n, g]]; an out-of-range index (unchecked under
    torch.compile) reads as NaN rather than faulting."""
    groups, size, depth = codebooks.shape
    group = torch.arange(groups, device=idx.device)
    valid_bytes = idx.element_size() + 1
    tile = tile_sizes({"n": idx.shape[0]},
                      lambda n: n * groups * (depth * codebooks.element_size() + valid_bytes))
    for n0, n1 in ranges(idx.shape[0], tile["n"]):
        codes = idx[n0:n1]
        valid = (codes >= 0) & (codes < size)
        rows = codebooks[group, codes.clamp(0, size - 1)].masked_fill(~valid[..., None], torch.nan)
        out[n0:n1].view(-1, groups, depth).copy_(rows)
