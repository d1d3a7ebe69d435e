"""codebook_lookup benchmark cases: the fused gather (and its scatter-add backward) against
advanced indexing. Interface as benchmarks/sqdist.py. Inputs: idx (N, G), codebooks (G, K, Dg)."""
from __future__ import annotations

import torch

import protokernels

from . import dw_nearest

OP = "codebook_lookup"


def naive(sizes, idx, codebooks):
    """codebooks[arange(G), idx] flattened: (N, G*Dg)."""
    return codebooks[torch.arange(codebooks.shape[0], device=idx.device), idx].flatten(1)


BASELINES: dict = {}


def fused(sizes, idx, codebooks):
    return protokernels.codebook_lookup(idx, codebooks)


def cases(quick: bool):
    """Depthwise VQ's size (N 65536, G 8, K 1024, Dg 64)."""
    sizes = {"N": 512, "G": 4, "K": 64, "Dg": 16} if quick else {"N": 65536, "G": 8, "K": 1024,
                                                                   "Dg": 64}
    return [("fp32", "high", torch.float32, sizes), ("bf16", "high", torch.bfloat16, sizes)]


def model_cases(quick: bool):
    """The lookup at the VQ sizes of models: dw_nearest's in-model grid (N, G, K, Dg)."""
    return dw_nearest.model_cases(quick)


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, sizes["K"], (sizes["N"], sizes["G"]), device=device,
                        generator=generator)
    codebooks = torch.randn(sizes["G"], sizes["K"], sizes["Dg"], device=device, dtype=dtype,
                            generator=generator)
    return idx, codebooks


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): reading idx and writing (N, G*Dg); backward reads the gradient."""
    n, g, d = sizes["N"], sizes["G"], sizes["Dg"]
    size = torch.tensor([], dtype=dtype).element_size()
    moved = 8 * n * g + size * n * g * d
    return (n * g * d if backward else 0), moved * (2 if backward else 1)
