"""nearest benchmark cases: the fused search against the formulas users write by hand.

Interface as benchmarks/sqdist.py. The naive versions materialize the (N, M) distance matrix;
the fused op never does, which the peak-extra-memory column shows.
"""
from __future__ import annotations

import torch

import protokernels

OP = "nearest"


def naive(sizes, x, y, *labels):
    """||x||^2 - 2 x y^T + ||y||^2, then min (k = 1) or topk over the (N, M) matrix; with labels
    (GLVQ's d+ and d-), the min over the prototypes of the sample's class and of the others."""
    dist = (x.square().sum(-1, keepdim=True) - 2 * x @ y.mT
            + y.square().sum(-1).unsqueeze(-2)).clamp_min(0)
    if labels:
        same = labels[0][:, None] == labels[1][None, :]
        d_same, i_same = dist.masked_fill(~same, float("inf")).min(-1)
        d_other, i_other = dist.masked_fill(same, float("inf")).min(-1)
        return d_same, i_same, d_other, i_other
    k = sizes.get("k", 1)
    if k == 1:
        return dist.min(-1)
    return dist.topk(k, largest=False)


def _cdist_argmin(sizes, x, y, *labels):
    """torch.cdist(x, y).argmin(1), squared at the winner (what most code writes)."""
    if labels:
        return naive(sizes, x, y, *labels)
    dist = torch.cdist(x, y)
    k = sizes.get("k", 1)
    if k == 1:
        value, idx = dist.min(-1)
    else:
        value, idx = dist.topk(k, largest=False)
    return value.square(), idx


BASELINES = {"cdist argmin": _cdist_argmin}


def fused(sizes, x, y, *labels):
    if labels:
        return protokernels.nearest_by_label(x, labels[0], y, labels[1])
    k = sizes.get("k", 1)
    if k == 1:
        return protokernels.nearest(x, y)
    return protokernels.nearest_k(x, y, k)


def cases(quick: bool):
    """The large size (README, "Speed": N 65536, K 8192, D 256) at tf32, highest and bf16."""
    n, m, d = (512, 256, 64) if quick else (65536, 8192, 256)
    sizes = {"N": n, "M": m, "D": d}
    return [
        ("tf32", "high", torch.float32, sizes),
        ("highest", "highest", torch.float32, sizes),
        ("bf16", "high", torch.bfloat16, sizes),
    ]


def sweep_cases(quick: bool):
    """(panel, swept variable, cases): M and D at N 65536 (tf32), and k of nearest_k."""
    n = 1024 if quick else 65536
    ms = [16, 256, 4096] if quick else [16, 64, 256, 1024, 4096, 16384, 65536]
    ds = [8, 64] if quick else [8, 32, 64, 128, 256, 512, 1024]
    ks = [1, 8, 32]
    return [
        ("M (D 256)" if not quick else "M (D 64)", "M",
         [(f"M{m}", "high", torch.float32, {"N": n, "M": m, "D": 64 if quick else 256})
          for m in ms]),
        ("D (M 8192)" if not quick else "D (M 256)", "D",
         [(f"D{d}", "high", torch.float32, {"N": n, "M": 256 if quick else 8192, "D": d})
          for d in ds]),
        ("k of nearest_k (M 8192, D 256)" if not quick else "k (M 256, D 64)", "k",
         [(f"k{k}", "high", torch.float32,
           {"N": n, "M": 256 if quick else 8192, "D": 64 if quick else 256, "k": k})
          for k in ks]),
    ]


def model_cases(quick: bool):
    """Prototype heads inside models (N samples, M prototypes, D features; tf32): winner-takes-
    all, and with class labels (C classes: GLVQ's d+ and d-), plus a large codebook search."""
    if quick:
        return [("N64 M10 D16", "high", torch.float32, {"N": 64, "M": 10, "D": 16}),
                ("labels", "high", torch.float32, {"N": 64, "M": 10, "D": 16, "C": 5})]
    grid = [(256, 10, 64), (256, 10, 512), (1024, 100, 128), (4096, 512, 128), (8192, 100, 64),
            (8192, 2000, 256), (65536, 1024, 64)]
    rows = [(f"N{n} M{m} D{d}", "high", torch.float32, {"N": n, "M": m, "D": d})
            for n, m, d in grid]
    rows.append(("N65536 M1024 D64 highest", "highest", torch.float32,
                 {"N": 65536, "M": 1024, "D": 64}))
    rows += [(f"labels N{n} M{m} D{d}", "high", torch.float32, {"N": n, "M": m, "D": d, "C": c})
             for n, m, d, c in [(256, 10, 512, 10), (8192, 100, 64, 10), (4096, 2000, 128, 100)]]
    return rows


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sizes["N"], sizes["D"], device=device, dtype=dtype, generator=generator)
    y = torch.randn(sizes["M"], sizes["D"], device=device, dtype=dtype, generator=generator)
    if "C" not in sizes:
        return x, y
    x_labels = torch.randint(0, sizes["C"], (sizes["N"],), device=device, generator=generator)
    return x, y, x_labels, torch.arange(sizes["M"], device=device) % sizes["C"]


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): the x.y^T products; reading x and y, writing (N, k) results."""
    n, m, d, k = sizes["N"], sizes["M"], sizes["D"], sizes.get("k", 1)
    size = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * n * m * d
    moved = size * (n * d + m * d) + 12 * n * k
    if backward:  # gathers the winners, writes gx and gy
        flops += 6 * n * k * d
        moved += size * (2 * n * d + 2 * m * d) + 12 * n * k
    return flops, moved
