"""sqdist benchmark cases: the fused op against the formula users write by hand.

The interface every benchmarks/<op>.py follows (protokernels.bench runs it): OP; cases(quick) ->
[(name, float32 matmul precision, dtype, sizes)] at the spec's sizes, and optionally
model_cases(quick) at the sizes used inside models (`--regime model`) and sweep_cases(quick)
(`--sweep`); make_inputs(sizes, dtype, device) -> tensors; naive(sizes, *inputs) and
fused(sizes, *inputs), whose first output is the differentiated one; BASELINES, more eager
implementations by label; work(sizes, dtype, backward) -> (FLOPs, bytes).
"""
from __future__ import annotations

import torch

import protokernels

OP = "sqdist"


def naive(sizes, x, y):
    """What users write today: ||x||^2 - 2 x y^T + ||y||^2 with three kernels and temporaries."""
    return (x.square().sum(-1, keepdim=True) - 2 * x @ y.mT
            + y.square().sum(-1).unsqueeze(-2)).clamp_min(0)


def fused(sizes, x, y):
    return protokernels.sqdist(x, y)


BASELINES = {}


def cases(quick: bool):
    """(name, matmul precision, dtype, sizes). The large size first (README, "Speed")."""
    b, n, m, d = (2, 256, 256, 64) if quick else (8, 4096, 4096, 128)
    sizes = {"B": b, "N": n, "M": m, "D": d}
    return [
        ("tf32", "high", torch.float32, sizes),
        ("highest", "highest", torch.float32, sizes),
        ("bf16", "high", torch.bfloat16, sizes),
    ]


def model_cases(quick: bool):
    """Distance layers inside models: a batch of N samples against M prototypes (tf32)."""
    grid = [(1, 64, 10, 16)] if quick else [(1, 256, 10, 64), (1, 1024, 100, 128),
                                            (1, 4096, 512, 128), (1, 8192, 2000, 256)]
    return [(f"N{n} M{m} D{d}", "high", torch.float32, {"B": b, "N": n, "M": m, "D": d})
            for b, n, m, d in grid]


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sizes["B"], sizes["N"], sizes["D"], device=device, dtype=dtype,
                    generator=generator)
    y = torch.randn(sizes["B"], sizes["M"], sizes["D"], device=device, dtype=dtype,
                    generator=generator)
    return x, y


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes moved): x.y^T dominates the FLOPs, the (N, M) output the bytes."""
    b, n, m, d = sizes["B"], sizes["N"], sizes["M"], sizes["D"]
    size = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * b * n * m * d
    moved = size * b * (n * d + m * d + n * m)
    if backward:  # two (N, M) x (M, D) products, reading the (N, M) gradient, writing gx and gy
        flops += 4 * b * n * m * d
        moved += size * b * (n * m + 2 * (n * d + m * d))
    return flops, moved
