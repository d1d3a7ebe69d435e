"""kp_conv2d benchmark cases: the fused op against the three-convolution formula users write by
hand, and against one plain F.conv2d of the same shape (the floor: the fused op does that
convolution's work plus the window energy).

Interface as benchmarks/sqdist.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import protokernels

OP = "kp_conv"


def _geometry(sizes):
    return dict(stride=sizes["stride"], padding=sizes["k"] // 2)


def naive(sizes, x, w):
    """x^2 * 1 - 2 x * w + ||w||^2 as three cuDNN convolutions (eq. 21 as written)."""
    geometry = _geometry(sizes)
    energy = F.conv2d(x.square(), torch.ones_like(w[:1]), **geometry)
    return (energy - 2 * F.conv2d(x, w, **geometry)
            + w.square().sum((1, 2, 3)).view(1, -1, 1, 1)).clamp_min(0)


def fused(sizes, x, w):
    return protokernels.kp_conv2d(x, w, **_geometry(sizes))


def _one_conv(sizes, x, w):
    return F.conv2d(x, w, **_geometry(sizes))


BASELINES = {"one F.conv2d (floor)": _one_conv}


def _sizes(b, c, hw, p, k, stride=1):
    return {"B": b, "C": c, "H": hw, "W": hw, "P": p, "k": k, "stride": stride}


def cases(quick: bool):
    """The large size (README, "Speed": x (32, 64, 56, 56), w (128, 64, 3, 3), padding 1)."""
    sizes = _sizes(2, 16, 14, 32, 3) if quick else _sizes(32, 64, 56, 128, 3)
    return [
        ("tf32", "high", torch.float32, sizes),
        ("highest", "highest", torch.float32, sizes),
        ("bf16", "high", torch.bfloat16, sizes),
    ]


def sweep_cases(quick: bool):
    """(panel, swept variable, cases), tf32 at B 32 and 56 x 56 unless stated: channels,
    prototypes, kernel size, stride 2, and a ResNet-like stack of stages (P = C)."""
    b, hw = (2, 14) if quick else (32, 56)
    scale = 4 if quick else 1

    def case(name, **sizes):
        return (name, "high", torch.float32, sizes)

    stages = [(64, 56), (128, 28), (256, 14), (512, 7)]
    return [
        ("C (P 128, k 3)", "C", [case(f"C{c}", **_sizes(b, c // scale, hw, 128 // scale, 3))
                                 for c in (16, 32, 64, 128, 256)]),
        ("P (C 64, k 3)", "P", [case(f"P{p}", **_sizes(b, 64 // scale, hw, p // scale, 3))
                                for p in (16, 64, 128, 256, 512)]),
        ("kernel (C 64, P 128)", "k", [case(f"k{k}", **_sizes(b, 64 // scale, hw, 128 // scale, k))
                                       for k in (1, 3, 5, 7)]),
        ("stride (C 64, P 128, k 3)", "stride",
         [case(f"s{s}", **_sizes(b, 64 // scale, hw, 128 // scale, 3, s)) for s in (1, 2)]),
        ("ResNet stages (P = C, k 3)", "C",
         [case(f"C{c}", **_sizes(b, c // scale, max(s // scale, 4), c // scale, 3))
          for c, s in stages]),
    ]


def model_cases(quick: bool):
    """Kernel-prototype layers on small images (tf32): MNIST-like to 56x56 feature maps."""
    grid = [(8, 1, 8, 16, 3)] if quick else [(64, 1, 8, 16, 3), (64, 1, 28, 32, 3),
                                             (32, 64, 14, 64, 3), (32, 64, 56, 128, 3)]
    return [(f"B{b} C{c} {hw}x{hw} P{p}", "high", torch.float32, _sizes(b, c, hw, p, k))
            for b, c, hw, p, k in grid]


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sizes["B"], sizes["C"], sizes["H"], sizes["W"], device=device, dtype=dtype,
                    generator=generator)
    w = torch.randn(sizes["P"], sizes["C"], sizes["k"], sizes["k"], device=device, dtype=dtype,
                    generator=generator)
    return x, w


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): the x * w products; reading x and w, writing the output."""
    b, c, p, k, s = sizes["B"], sizes["C"], sizes["P"], sizes["k"], sizes["stride"]
    out_hw = ((sizes["H"] - 1) // s + 1) * ((sizes["W"] - 1) // s + 1)  # padding k // 2
    size = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * b * out_hw * p * c * k * k
    x_size, out_size = b * c * sizes["H"] * sizes["W"], b * p * out_hw
    moved = size * (x_size + p * c * k * k + out_size)
    if backward:  # gx and gw: two more products; reading g twice and x, writing gx
        flops *= 3
        moved += size * (2 * out_size + 2 * x_size)
    return flops, moved
