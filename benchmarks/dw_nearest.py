"""dw_nearest + codebook_lookup benchmark cases: depthwise VQ's quantization step (search every
group's codebook, gather the codes), run as one dw_quantize call, against the formulas users write
by hand and against the package's own two-call form.

Interface as benchmarks/sqdist.py. Inputs: x (N, G*Dg), codebooks (G, K, Dg); every runner
returns (quantized (N, G*Dg), idx); fwd+bwd back-propagates into the codebooks through the lookup.
"""
from __future__ import annotations

import torch

import protokernels

OP = "dw_nearest"


def naive(sizes, x, codebooks):
    """Batched over groups: the (G, N, K) distance tensor, argmin, gather."""
    groups, _, depth = codebooks.shape
    xg = x.view(-1, groups, depth).transpose(0, 1)  # (G, N, Dg)
    dist = torch.baddbmm(codebooks.square().sum(-1).unsqueeze(1), xg, codebooks.mT, alpha=-2)
    idx = dist.argmin(-1)  # ||x||^2 is the same for a row: not needed for the argmin
    quantized = codebooks.gather(1, idx[..., None].expand(-1, -1, depth))
    return quantized.transpose(0, 1).reshape(x.shape), idx.t()


def _loop_over_groups(sizes, x, codebooks):
    """One torch.cdist(...).argmin() and index per group, as separate codebooks are often coded."""
    groups, _, depth = codebooks.shape
    parts, indices = [], []
    for g in range(groups):
        idx = torch.cdist(x[:, g * depth:(g + 1) * depth], codebooks[g]).argmin(-1)
        parts.append(codebooks[g][idx])
        indices.append(idx)
    return torch.cat(parts, -1), torch.stack(indices, -1)


def two_calls(sizes, x, codebooks):
    """The package's two-call form of the step: dw_nearest, then codebook_lookup (what
    VectorQuantizer runs without EMA)."""
    _, idx = protokernels.dw_nearest(x, codebooks)
    return protokernels.codebook_lookup(idx, codebooks), idx


def _two_calls_under_auto(sizes, x, codebooks):
    """two_calls as `auto` runs it (baselines otherwise run under the reference backend)."""
    with protokernels.use_backend("auto"):
        return two_calls(sizes, x, codebooks)


BASELINES = {"loop over groups": _loop_over_groups, "two calls": _two_calls_under_auto}


def fused(sizes, x, codebooks):
    quantized, idx, _ = protokernels.dw_quantize(x, codebooks)
    return quantized, idx


# What `python -m protokernels.warmup` compiles for this op: both forms, so that dw_nearest's and
# the lookup's kernels are warm too (dw_quantize's search kernel is another specialization).
WARMUP = (fused, two_calls)


def _sizes(n, g, k, d):
    return {"N": n, "G": g, "K": k, "Dg": d}


def cases(quick: bool):
    """The large size (README, "Speed": N 65536, G 8, K 1024, Dg 64) at tf32, highest and bf16,
    and plain VQ (G 1) with K 8192 at dim 256."""
    vq = _sizes(512, 4, 64, 16) if quick else _sizes(65536, 8, 1024, 64)
    plain = _sizes(512, 1, 256, 64) if quick else _sizes(65536, 1, 8192, 256)
    return [
        ("tf32", "high", torch.float32, vq),
        ("highest", "highest", torch.float32, vq),
        ("bf16", "high", torch.bfloat16, vq),
        ("G1 tf32", "high", torch.float32, plain),
    ]


def sweep_cases(quick: bool):
    """(panel, swept variable, cases), tf32: codebook size K and group count G at dim 512."""
    n = 1024 if quick else 65536
    ks = [16, 256] if quick else [64, 256, 1024, 4096, 16384]
    gs = [1, 8] if quick else [1, 2, 4, 8, 16, 32, 64]
    return [
        ("K (G 8, Dg 64)", "K", [(f"K{k}", "high", torch.float32, _sizes(n, 8, k, 64))
                                 for k in ks]),
        ("G (dim 512, K 1024)", "G", [(f"G{g}", "high", torch.float32,
                                       _sizes(n, g, 1024 if not quick else 64, 512 // g))
                                      for g in gs]),
    ]


def model_cases(quick: bool):
    """VQ inside models (tf32): N vectors, G groups of Dg features, K codes per group."""
    grid = [(512, 1, 64, 16)] if quick else [
        (8192, 1, 512, 64), (8192, 8, 256, 32), (16384, 1, 8192, 256), (65536, 1, 1024, 64),
        (65536, 8, 1024, 32), (65536, 4, 4096, 64)]
    return [(f"N{n} G{g} K{k} Dg{d}", "high", torch.float32, _sizes(n, g, k, d))
            for n, g, k, d in grid]


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    n, g, k, d = sizes["N"], sizes["G"], sizes["K"], sizes["Dg"]
    x = torch.randn(n, g * d, device=device, dtype=dtype, generator=generator)
    codebooks = torch.randn(g, k, d, device=device, dtype=dtype, generator=generator)
    return x, codebooks


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): the x.c products; reading x and the codebooks, writing the
    quantized vectors and indices (backward: reading the gradient, writing the codebooks')."""
    n, g, k, d = sizes["N"], sizes["G"], sizes["K"], sizes["Dg"]
    size = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * n * g * k * d
    moved = size * (2 * n * g * d + g * k * d) + 8 * n * g
    if backward:
        moved += size * (n * g * d + g * k * d)
    return flops, moved
