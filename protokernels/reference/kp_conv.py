"""kp_conv2d in plain PyTorch: the three-convolution formula x^2 * 1 - 2 x * w + ||w||^2
(prototype-layers..., eq. 21) and its gradients, chunked over images and prototypes so that the
temporaries stay within the scratch budget.

Every function fills the preallocated `out` (its layout chosen by protokernels.ops.kp_conv).
Convolutions run at the requested float32 precision (cuDNN's TF32 only for "tf32"); float16 and
bfloat16 are computed in float32 and rounded once at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import matmul_precision
from ._scratch import ranges, tile_sizes
from .._numerics import accumulate_dtype


def _chunks(x: torch.Tensor, w: torch.Tensor, out_hw: int):
    """(images, prototypes) per chunk: the upcast images and their squares, each image's columns
    (the im2col a CPU convolution may build), and the energy and distance maps."""
    images, channels, height, width = x.shape
    taps = w.shape[1] * w.shape[2] * w.shape[3]
    size = accumulate_dtype(x.dtype).itemsize
    tile = tile_sizes({"b": images, "p": w.shape[0]},
                      lambda b, p: size * (b * (2 * channels * height * width + taps * out_hw
                                                + (p + 1) * out_hw) + p * taps))
    return ranges(images, tile["b"]), ranges(w.shape[0], tile["p"])


def kp_conv2d(x, w, stride, padding, dilation, precision, out):
    """x (B, C, H, W), w (P, C, kh, kw) -> out (B, P, Ho, Wo)."""
    acc = accumulate_dtype(x.dtype)
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    ones = x.new_ones((1,) + w.shape[1:], dtype=acc)
    image_chunks, proto_chunks = _chunks(x, w, out.shape[2] * out.shape[3])
    with matmul_precision(precision):
        for b0, b1 in image_chunks:
            xs = x[b0:b1].to(acc)
            energy = F.conv2d(xs.square(), ones, **geometry)
            for p0, p1 in proto_chunks:
                ws = w[p0:p1].to(acc)
                w_norm = ws.square().sum((1, 2, 3)).view(1, -1, 1, 1)
                dist = F.conv2d(xs, ws, **geometry).mul_(-2).add_(energy).add_(w_norm)
                out[b0:b1, p0:p1] = dist.clamp_min_(0)


def kp_conv2d_grad_input(grad, x, w, stride, padding, dilation, precision, out):
    """gx = 2 x convT(sum_p g, ones) - 2 convT(g, w) for g = grad (B, P, Ho, Wo)."""
    acc = accumulate_dtype(x.dtype)
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    ones = x.new_ones((1, 1) + w.shape[2:], dtype=acc)
    image_chunks, proto_chunks = _chunks(x, w, grad.shape[2] * grad.shape[3])
    with matmul_precision(precision):
        for b0, b1 in image_chunks:
            xs = x[b0:b1].to(acc)
            cover = torch.zeros((b1 - b0, 1) + x.shape[2:], dtype=acc, device=x.device)
            cross = torch.zeros(xs.shape, dtype=acc, device=x.device)
            for p0, p1 in proto_chunks:
                gs = grad[b0:b1, p0:p1].to(acc)
                cover += torch.nn.grad.conv2d_input(cover.shape, ones, gs.sum(1, keepdim=True),
                                                    **geometry)
                cross += torch.nn.grad.conv2d_input(xs.shape, w[p0:p1].to(acc), gs, **geometry)
            out[b0:b1] = (cover * xs).sub_(cross).mul_(2)


def kp_conv2d_grad_weight(grad, x, w, stride, padding, dilation, precision, out):
    """gw = 2 w sum_{b,h,w} g - 2 corr(x, g) for g = grad (B, P, Ho, Wo)."""
    acc = accumulate_dtype(x.dtype)
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    image_chunks, proto_chunks = _chunks(x, w, grad.shape[2] * grad.shape[3])
    with matmul_precision(precision):
        for p0, p1 in proto_chunks:
            ws = w[p0:p1].to(acc)
            mass = torch.zeros((p1 - p0, 1, 1, 1), dtype=acc, device=x.device)
            cross = torch.zeros(ws.shape, dtype=acc, device=x.device)
            for b0, b1 in image_chunks:
                gs = grad[b0:b1, p0:p1].to(acc)
                mass += gs.sum((0, 2, 3)).view(-1, 1, 1, 1)
                cross += torch.nn.grad.conv2d_weight(x[b0:b1].to(acc), ws.shape, gs, **geometry)
            out[p0:p1] = (mass * ws).sub_(cross).mul_(2)
