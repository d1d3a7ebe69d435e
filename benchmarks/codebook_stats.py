"""codebook_stats benchmark cases: the fused per-code counts and sums against index_add_ and the
one-hot matmul users write for EMA updates. Interface as benchmarks/sqdist.py. Inputs: x (N, G*Dg),
idx (N, G); fwd+bwd back-propagates the sums into x."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import protokernels

from . import dw_nearest

OP = "codebook_stats"


def naive(sizes, x, idx):
    """Per group: one-hot (N, K) matmuls, as EMA codebook updates are often written."""
    groups, size = idx.shape[1], sizes["K"]
    onehot = F.one_hot(idx.t(), size).to(x.dtype)  # (G, N, K)
    sums = onehot.mT @ x.view(x.shape[0], groups, -1).transpose(0, 1)
    return sums, onehot.sum(1)


def _index_add(sizes, x, idx):
    groups, size = idx.shape[1], sizes["K"]
    depth = x.shape[1] // groups
    flat = (idx + torch.arange(groups, device=idx.device) * size).flatten()
    sums = x.new_zeros(groups * size, depth).index_add(0, flat, x.reshape(-1, depth))
    return sums.view(groups, size, depth), torch.bincount(flat, minlength=groups * size)


BASELINES = {"index_add_": _index_add}


def fused(sizes, x, idx):
    counts, sums = protokernels.codebook_stats(x, idx, sizes["K"])
    return sums, counts


def cases(quick: bool):
    """Depthwise VQ's size (N 65536, G 8, K 1024, Dg 64)."""
    sizes = {"N": 512, "G": 4, "K": 64, "Dg": 16} if quick else {"N": 65536, "G": 8, "K": 1024,
                                                                   "Dg": 64}
    return [("fp32", "high", torch.float32, sizes)]


def model_cases(quick: bool):
    """The statistics at the VQ sizes of models: dw_nearest's in-model grid (N, G, K, Dg)."""
    return dw_nearest.model_cases(quick)


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sizes["N"], sizes["G"] * sizes["Dg"], device=device, dtype=dtype,
                    generator=generator)
    idx = torch.randint(0, sizes["K"], (sizes["N"], sizes["G"]), device=device,
                        generator=generator)
    return x, idx


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): one add per element of x; reading x and idx."""
    n, g, d = sizes["N"], sizes["G"], sizes["Dg"]
    size = torch.tensor([], dtype=dtype).element_size()
    moved = size * n * g * d + 8 * n * g
    return n * g * d, moved * (2 if backward else 1)
