"""codebook_lookup in Triton: a program gathers a block of rows' codes of one group."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import block, cdiv, launcher


@triton.jit
def _lookup_kernel(IDX, BOOKS, OUT, N, G, K, D, sb_g, sb_k, sb_d,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT (N, G*D) contiguous, IDX (N, G) contiguous; an out-of-range code (unchecked under
    torch.compile) reads as NaN instead of faulting."""
    pid = tl.program_id(0)
    g = (pid % G).to(tl.int64)
    rows = (pid // G).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    code = tl.load(IDX + rows * G + g, mask=row_ok, other=0)
    valid = row_ok & (code >= 0) & (code < K)
    src = BOOKS + g * sb_g + code * sb_k
    dst = OUT + rows * (G * D) + g * D
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_ok = ds[None, :] < D
        v = tl.load(src[:, None] + ds[None, :] * sb_d, mask=valid[:, None] & d_ok,
                    other=float("nan"))
        tl.store(dst[:, None] + ds[None, :], v, mask=row_ok[:, None] & d_ok)


_launch_lookup = launcher(_lookup_kernel)


def codebook_lookup(idx, codebooks, out):
    """Fill out (N, G*Dg) with codebooks[g, idx[n, g]]."""
    groups, size, depth = codebooks.shape
    block_d = block(depth, 128)
    block_n = max(1, 4096 // block_d)  # ~4K elements per program
    _launch_lookup((cdiv(idx.shape[0], block_n) * groups,), idx, codebooks, out, idx.shape[0],
                   groups, size, depth, *codebooks.stride(), BLOCK_N=block_n, BLOCK_D=block_d,
                   num_warps=4)
