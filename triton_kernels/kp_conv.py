"""kp_conv2d in Triton: implicit-GEMM kernels for the kernel-prototype convolution and its two
gradients, each one pass with its statistic taken from the tiles already loaded.

  forward:      rows = output pixels, columns = prototypes, depth = (c, i, j) window taps;
                out = energy + ||w||^2 - 2 acc, the window energy x^2 * 1 summed from the x tiles
  grad input:   rows = input pixels, columns = channels, depth = (p, i, j);
                gx = 2 (cover x - acc), cover = convT(sum_p g, ones) summed from the g tiles
  grad weight:  rows = prototypes, columns = (c, i, j), depth = output pixels (split over the
                GPU, partial sums reduced on the host); gw = 2 (mass w - acc), mass = sum g

The depth is walked one tap at a time in channel blocks ("taps outer": the index math is per
tile row, and channels_last loads are contiguous) unless the channels are few, where blocks would
be mostly padding; then the flattened (c, i, j) depth is gathered element by element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (SUMS_OF_SQUARES, TARGET_PROGRAMS, UPCAST_BF16, accumulator, cdiv, dot,
                      fitted_config, launcher, tile_coordinates)


@triton.jit
def _index(v, WIDE: tl.constexpr):
    """v as an offset: int64 where offsets may pass 2**31 (WIDE), else int32, whose multiplies
    are one instruction instead of several."""
    if WIDE:
        v = v.to(tl.int64)
    return v


@triton.jit
def _pixel_coordinates(pixels, height, width, WIDE: tl.constexpr):
    """(image, row, column) of flat pixel indices over (images, height, width)."""
    per_image = height * width
    rest = pixels % per_image
    return _index(pixels // per_image, WIDE), rest // width, rest % width


@triton.jit
def _depth_step(step, rows_h, rows_w, in_rows, CHANNELS, KH, KW, sign, dil_h, dil_w,
                BLOCK_K: tl.constexpr, TAPS_OUTER: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """Depth step `step` over (channel, i, j): the channels (BLOCK_K,), and the rows' positions
    rows_h + sign * i * dil_h, rows_w + sign * j * dil_w with the taps (i, j): scalars and (rows,)
    positions when taps are outer, else (BLOCK_K,) taps and (rows, BLOCK_K) positions."""
    if TAPS_OUTER:
        blocks = tl.cdiv(CHANNELS, BLOCK_K)
        tap = step // blocks
        channel = (step % blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        i = tap // KW
        j = tap % KW
        pos_h = rows_h + sign * i * dil_h
        pos_w = rows_w + sign * j * dil_w
        in_depth = channel < CHANNELS
    else:
        k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        channel = k // (KH * KW)
        i = (k // KW) % KH
        j = k % KW
        pos_h = rows_h[:, None] + (sign * i * dil_h)[None, :]
        pos_w = rows_w[:, None] + (sign * j * dil_w)[None, :]
        in_depth = k < CHANNELS * KH * KW
    return channel, _index(i, WIDE_INDEX), _index(j, WIDE_INDEX), pos_h, pos_w, in_depth


@triton.jit
def _gather(row_base, position, depth, valid, in_rows, in_depth, TAPS_OUTER: tl.constexpr):
    """Offsets and mask of a gathered (rows, BLOCK_K) tile: row_base (rows,) + position + depth
    (BLOCK_K,), valid where the position is; position and valid are (rows,) when taps are
    outer, else (rows, BLOCK_K)."""
    # One return after the branches: triton 3.6 compiles both branches' returns otherwise.
    if TAPS_OUTER:
        offsets = (row_base + position)[:, None] + depth[None, :]
        mask = (valid & in_rows)[:, None] & in_depth[None, :]
    else:
        offsets = row_base[:, None] + depth[None, :] + position
        mask = valid & in_rows[:, None] & in_depth[None, :]
    return offsets, mask


@triton.jit
def _window_tile(X, image, top, left, in_rows, step, C, H, W, KH, KW, dil_h, dil_w,
                 sxb, sxc, sxh, sxw, BLOCK_K: tl.constexpr, TAPS_OUTER: tl.constexpr,
                 WIDE_INDEX: tl.constexpr):
    """The (pixels, BLOCK_K) tile of the im2col matrix at depth step `step` (zero in the padding),
    for pixels whose windows start at (top, left); also its channels and taps (i, j)."""
    channel, i, j, ih, iw, in_depth = _depth_step(step, top, left, in_rows, C, KH, KW, 1, dil_h,
                                                  dil_w, BLOCK_K, TAPS_OUTER, WIDE_INDEX)
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    position = _index(ih, WIDE_INDEX) * sxh + _index(iw, WIDE_INDEX) * sxw
    offsets, mask = _gather(image * sxb, position, _index(channel, WIDE_INDEX) * sxc, inside,
                            in_rows, in_depth, TAPS_OUTER)
    return tl.load(X + offsets, mask=mask, other=0.0), channel, i, j, in_depth


@triton.jit
def _kp_conv2d_kernel(X, Wt, OUT, PIXELS, C, H, W, OH, OW, P, KH, KW, tiles_m, tiles_p,
                      stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                      sxb, sxc, sxh, sxw, swp, swc, swh, sww, sob, sop, soh, sow,
                      ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                      TAPS_OUTER: tl.constexpr, WIDE_INDEX: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    _, tile_m, tile_p = tile_coordinates(tl.program_id(0), tiles_m, tiles_p, GROUP)
    tile_m = _index(tile_m, WIDE_INDEX)
    pixels = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    protos = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_rows, in_protos = pixels < PIXELS, protos < P
    image, oh, ow = _pixel_coordinates(pixels, OH, OW, WIDE_INDEX)
    top, left = oh * stride_h - pad_h, ow * stride_w - pad_w
    w_protos = _index(protos, WIDE_INDEX) * swp
    acc = tl.zeros((BLOCK_M, BLOCK_P), ACC)
    energy = tl.zeros((BLOCK_M,), ACC)
    w_norm = tl.zeros((BLOCK_P,), ACC)
    if TAPS_OUTER:
        steps = KH * KW * tl.cdiv(C, BLOCK_K)
    else:
        steps = tl.cdiv(C * KH * KW, BLOCK_K)
    for step in range(steps):
        x, channel, i, j, in_depth = _window_tile(X, image, top, left, in_rows, step, C, H, W, KH,
                                                  KW, dil_h, dil_w, sxb, sxc, sxh, sxw, BLOCK_K,
                                                  TAPS_OUTER, WIDE_INDEX)
        w_depth = _index(channel, WIDE_INDEX) * swc + i * swh + j * sww
        w = tl.load(Wt + w_depth[:, None] + w_protos[None, :],
                    mask=in_depth[:, None] & in_protos[None, :], other=0.0)
        acc = dot(x, w, acc, PRECISION, UPCAST_BF16)
        xa, wa = x.to(ACC), w.to(ACC)
        energy += tl.sum(xa * xa, 1)
        w_norm += tl.sum(wa * wa, 0)
    dist = energy[:, None] + w_norm[None, :] - 2.0 * acc
    dist = tl.where(dist < 0.0, 0.0, dist)  # keeps NaN, unlike tl.maximum
    rows = image * sob + _index(oh, WIDE_INDEX) * soh + _index(ow, WIDE_INDEX) * sow
    tl.store(OUT + rows[:, None] + (_index(protos, WIDE_INDEX) * sop)[None, :],
             dist.to(OUT.dtype.element_ty), mask=in_rows[:, None] & in_protos[None, :])


@triton.jit
def _kp_conv2d_grad_input_kernel(G, X, Wt, OUT, PIXELS, C, H, W, OH, OW, P, KH, KW, tiles_m,
                                 tiles_c, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                 sgb, sgp, sgh, sgw, sxb, sxc, sxh, sxw, swp, swc, swh, sww,
                                 sob, soc, soh, sow, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                 UPCAST_BF16: tl.constexpr, TAPS_OUTER: tl.constexpr,
                                 WIDE_INDEX: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP: tl.constexpr):
    """Rows are input pixels (image, ih, iw); depth (p, i, j) reads g at the output pixel whose
    window puts tap (i, j) on it: oh = (ih + pad_h - i dil_h) / stride_h when that divides."""
    _, tile_m, tile_c = tile_coordinates(tl.program_id(0), tiles_m, tiles_c, GROUP)
    tile_m = _index(tile_m, WIDE_INDEX)
    pixels = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    channels = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_rows, in_channels = pixels < PIXELS, channels < C
    image, ih, iw = _pixel_coordinates(pixels, H, W, WIDE_INDEX)
    w_channels = _index(channels, WIDE_INDEX) * swc
    acc = tl.zeros((BLOCK_M, BLOCK_C), ACC)
    cover = tl.zeros((BLOCK_M,), ACC)
    if TAPS_OUTER:
        steps = KH * KW * tl.cdiv(P, BLOCK_K)
    else:
        steps = tl.cdiv(P * KH * KW, BLOCK_K)
    for step in range(steps):
        proto, i, j, from_h, from_w, in_depth = _depth_step(
            step, ih + pad_h, iw + pad_w, in_rows, P, KH, KW, -1, dil_h, dil_w, BLOCK_K,
            TAPS_OUTER, WIDE_INDEX)
        oh, ow = from_h // stride_h, from_w // stride_w
        hit = ((from_h >= 0) & (from_w >= 0) & (oh * stride_h == from_h)
               & (ow * stride_w == from_w) & (oh < OH) & (ow < OW))
        offsets, mask = _gather(image * sgb,
                                _index(oh, WIDE_INDEX) * sgh + _index(ow, WIDE_INDEX) * sgw,
                                _index(proto, WIDE_INDEX) * sgp, hit, in_rows, in_depth,
                                TAPS_OUTER)
        g = tl.load(G + offsets, mask=mask, other=0.0)
        w_depth = _index(proto, WIDE_INDEX) * swp + i * swh + j * sww
        w = tl.load(Wt + w_depth[:, None] + w_channels[None, :],
                    mask=in_depth[:, None] & in_channels[None, :], other=0.0)
        acc = dot(g, w, acc, PRECISION, UPCAST_BF16)
        cover += tl.sum(g.to(ACC), 1)
    mask = in_rows[:, None] & in_channels[None, :]
    x_rows = image * sxb + _index(ih, WIDE_INDEX) * sxh + _index(iw, WIDE_INDEX) * sxw
    x = tl.load(X + x_rows[:, None] + (_index(channels, WIDE_INDEX) * sxc)[None, :], mask=mask,
                other=0.0)
    grad = 2.0 * (cover[:, None] * x.to(ACC) - acc)
    out_rows = image * sob + _index(ih, WIDE_INDEX) * soh + _index(iw, WIDE_INDEX) * sow
    tl.store(OUT + out_rows[:, None] + (_index(channels, WIDE_INDEX) * soc)[None, :],
             grad.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _kp_conv2d_grad_weight_kernel(G, X, PARTIAL, MASS, PIXELS, C, H, W, OH, OW, P, KH, KW,
                                  tiles_p, tiles_k, split_pixels, stride_h, stride_w, pad_h,
                                  pad_w, dil_h, dil_w, sgb, sgp, sgh, sgw, sxb, sxc, sxh, sxw,
                                  spp, spc, sph, spw, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                  UPCAST_BF16: tl.constexpr, TAPS_OUTER: tl.constexpr,
                                  WIDE_INDEX: tl.constexpr, BLOCK_P: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                  GROUP: tl.constexpr):
    """One program: a (prototypes x (c, i, j)) tile summed over one split of the output pixels,
    written to PARTIAL[split] (laid out like w), and the prototypes' sum of g to MASS[split]."""
    _, tile_p, tile_k = tile_coordinates(tl.program_id(0), tiles_p, tiles_k, GROUP)
    split = tl.program_id(1)
    split = _index(split, WIDE_INDEX)
    first = split * split_pixels
    last = tl.minimum(first + split_pixels, PIXELS)
    protos = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_protos = protos < P
    g_protos = _index(protos, WIDE_INDEX) * sgp
    acc = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    mass = tl.zeros((BLOCK_P,), ACC)
    for start in range(first, last, BLOCK_M):
        pixels = start + tl.arange(0, BLOCK_M)
        in_rows = pixels < last
        image, oh, ow = _pixel_coordinates(pixels, OH, OW, WIDE_INDEX)
        x = _window_tile(
            X, image, oh * stride_h - pad_h, ow * stride_w - pad_w, in_rows, tile_k, C, H, W, KH,
            KW, dil_h, dil_w, sxb, sxc, sxh, sxw, BLOCK_K, TAPS_OUTER, WIDE_INDEX)[0]
        g_pixels = image * sgb + _index(oh, WIDE_INDEX) * sgh + _index(ow, WIDE_INDEX) * sgw
        g = tl.load(G + g_protos[:, None] + g_pixels[None, :],
                    mask=in_protos[:, None] & in_rows[None, :], other=0.0)
        acc = dot(g, x, acc, PRECISION, UPCAST_BF16)
        mass += tl.sum(g.to(ACC), 1)
    no_rows = tl.zeros((BLOCK_M,), tl.int32)
    channel, i, j, _, _, in_depth = _depth_step(tile_k, no_rows, no_rows, no_rows, C, KH, KW, 1,
                                                dil_h, dil_w, BLOCK_K, TAPS_OUTER, WIDE_INDEX)
    partial_depth = _index(channel, WIDE_INDEX) * spc + i * sph + j * spw
    PARTIAL += split.to(tl.int64) * P * C * KH * KW
    tl.store(PARTIAL + (_index(protos, WIDE_INDEX) * spp)[:, None] + partial_depth[None, :], acc,
             mask=in_protos[:, None] & in_depth[None, :])
    if tile_k == 0:
        tl.store(MASS + split * P + protos, mass, mask=in_protos)


# Launch configs by dtype ("tf32x3" for split float32): scripts/tune_triton.py --op kp_conv on the
# H100 at the spec's size (benchmarks/results/2026-11-23-h100-tune-kp_conv.log). Large pixel tiles
# win the forward (tf32 0.155 ms against 0.42 with 128 x 128 x 32); the weight gradient wants a
# shallow pixel step (BLOCK_M 16: 0.63 ms, 0.75 with 32). float64 keeps small tiles (registers).
_launch_kp_conv2d = launcher(_kp_conv2d_kernel, **SUMS_OF_SQUARES)
_launch_kp_conv2d_grad_input = launcher(_kp_conv2d_grad_input_kernel)
_launch_kp_conv2d_grad_weight = launcher(_kp_conv2d_grad_weight_kernel)


_FORWARD = {
    torch.float32: dict(BLOCK_M=256, BLOCK_P=128, BLOCK_K=32, num_warps=8, num_stages=4),
    "tf32x3": dict(BLOCK_M=128, BLOCK_P=128, BLOCK_K=16, num_warps=8, num_stages=3),
    torch.float16: dict(BLOCK_M=256, BLOCK_P=128, BLOCK_K=32, num_warps=8, num_stages=4),
    torch.float64: dict(BLOCK_M=64, BLOCK_P=64, BLOCK_K=16, num_warps=4, num_stages=2),
}
_GRAD_INPUT = {
    torch.float32: dict(BLOCK_M=128, BLOCK_C=64, BLOCK_K=32, num_warps=4, num_stages=3),
    "tf32x3": dict(BLOCK_M=128, BLOCK_C=64, BLOCK_K=16, num_warps=4, num_stages=3),
    torch.float16: dict(BLOCK_M=128, BLOCK_C=64, BLOCK_K=64, num_warps=4, num_stages=2),
    torch.float64: dict(BLOCK_M=64, BLOCK_C=64, BLOCK_K=16, num_warps=4, num_stages=2),
}
_GRAD_WEIGHT = {
    torch.float32: dict(BLOCK_P=64, BLOCK_K=128, BLOCK_M=16, num_warps=4, num_stages=3),
    "tf32x3": dict(BLOCK_P=128, BLOCK_K=64, BLOCK_M=16, num_warps=4, num_stages=3),
    torch.float16: dict(BLOCK_P=64, BLOCK_K=128, BLOCK_M=16, num_warps=4, num_stages=3),
    torch.float64: dict(BLOCK_P=64, BLOCK_K=64, BLOCK_M=16, num_warps=4, num_stages=2),
}
for _table in (_FORWARD, _GRAD_INPUT, _GRAD_WEIGHT):
    _table[torch.bfloat16] = _table[torch.float16]


def _taps_outer(channels: int, taps: int, block: int) -> bool:
    """Walk the depth one tap at a time in channel blocks, unless that takes clearly more steps
    than the flattened depth (few channels: blocks mostly padding)."""
    return taps * cdiv(channels, block) <= 1.25 * cdiv(channels * taps, block)


def _geometry(x, w, stride, padding, dilation, out_hw):
    batch, channels, height, width = x.shape
    protos, _, kh, kw = w.shape
    return dict(C=channels, H=height, W=width, OH=out_hw[0], OW=out_hw[1], P=protos, KH=kh,
                KW=kw, stride_h=stride[0], stride_w=stride[1], pad_h=padding[0],
                pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1])


def _contiguous_along(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t, or a copy of it laid out with dimension `dim` contiguous (same shape and values).

    The products' depth runs along that dimension: float32 wgmma needs K-major operands in
    shared memory, and the loads vectorize."""
    return t if t.stride(dim) == 1 else t.movedim(dim, -1).contiguous().movedim(-1, dim)


def _strides(**tensors) -> dict[str, int]:
    """Kernel arguments s<name><dimension> for 4-D tensors given as name=(tensor, dimensions),
    e.g. x=(x, "bchw") -> sxb, sxc, sxh, sxw."""
    return {f"s{name}{dim}": stride for name, (t, dims) in tensors.items()
            for dim, stride in zip(dims, t.stride())}


def _wide_index(pixels: int, *tensors: torch.Tensor) -> bool:
    """Whether a pixel index or an element offset of any tensor may pass int32."""
    offsets = (sum((n - 1) * abs(stride) for n, stride in zip(t.shape, t.stride()))
               for t in tensors)
    return max(pixels, *offsets) >= 2**31 - 1


def _constants(x, precision):
    return dict(ACC=accumulator(x.dtype), PRECISION=precision,
                UPCAST_BF16=UPCAST_BF16)


def kp_conv2d(x, w, stride, padding, dilation, precision, out, config=None):
    """x (B, C, H, W), w (P, C, kh, kw) -> out (B, P, Ho, Wo). `config` overrides the table's."""
    geometry = _geometry(x, w, stride, padding, dilation, out.shape[2:])
    pixels = x.shape[0] * out.shape[2] * out.shape[3]
    taps = geometry["KH"] * geometry["KW"]
    config = config or fitted_config(_FORWARD, x.dtype, precision, BLOCK_M=pixels,
                                     BLOCK_P=geometry["P"], BLOCK_K=geometry["C"] * taps)
    w = _contiguous_along(w, 1)
    tiles_m, tiles_p = cdiv(pixels, config["BLOCK_M"]), cdiv(geometry["P"], config["BLOCK_P"])
    _launch_kp_conv2d(
        (tiles_m * tiles_p,), x, w, out, pixels, tiles_m=tiles_m, tiles_p=tiles_p, **geometry,
        **_strides(x=(x, "bchw"), w=(w, "pchw"), o=(out, "bphw")),
        **_constants(x, precision),
        TAPS_OUTER=_taps_outer(geometry["C"], taps, config["BLOCK_K"]),
        WIDE_INDEX=_wide_index(pixels, x, w, out), GROUP=8, **config)


def kp_conv2d_grad_input(grad, x, w, stride, padding, dilation, precision, out, config=None):
    """gx = 2 (cover x - convT(g, w)) into out (B, C, H, W)."""
    geometry = _geometry(x, w, stride, padding, dilation, grad.shape[2:])
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    taps = geometry["KH"] * geometry["KW"]
    config = config or fitted_config(_GRAD_INPUT, x.dtype, precision, BLOCK_M=pixels,
                                     BLOCK_C=geometry["C"], BLOCK_K=geometry["P"] * taps)
    w = _contiguous_along(w, 0)
    tiles_m, tiles_c = cdiv(pixels, config["BLOCK_M"]), cdiv(geometry["C"], config["BLOCK_C"])
    _launch_kp_conv2d_grad_input(
        (tiles_m * tiles_c,), grad, x, w, out, pixels, tiles_m=tiles_m, tiles_c=tiles_c, **geometry,
        **_strides(g=(grad, "bphw"), x=(x, "bchw"), w=(w, "pchw"), o=(out, "bchw")),
        **_constants(x, precision),
        TAPS_OUTER=_taps_outer(geometry["P"], taps, config["BLOCK_K"]),
        WIDE_INDEX=_wide_index(pixels, grad, x, w, out), GROUP=8, **config)


def kp_conv2d_grad_weight(grad, x, w, stride, padding, dilation, precision, out, config=None):
    """gw = 2 (mass w - corr(x, g)) into out (P, C, kh, kw): the pixels are split over the GPU
    and the float32 (float64) partial sums added here."""
    geometry = _geometry(x, w, stride, padding, dilation, grad.shape[2:])
    pixels = grad.shape[0] * grad.shape[2] * grad.shape[3]
    taps = geometry["KH"] * geometry["KW"]
    config = config or fitted_config(_GRAD_WEIGHT, x.dtype, precision, BLOCK_P=geometry["P"],
                                     BLOCK_K=geometry["C"] * taps, BLOCK_M=pixels)
    taps_outer = _taps_outer(geometry["C"], taps, config["BLOCK_K"])
    tiles_p = cdiv(geometry["P"], config["BLOCK_P"])
    tiles_k = (taps * cdiv(geometry["C"], config["BLOCK_K"]) if taps_outer
               else cdiv(geometry["C"] * taps, config["BLOCK_K"]))
    splits = max(1, min(cdiv(pixels, config["BLOCK_M"]), TARGET_PROGRAMS // (tiles_p * tiles_k)))
    split_pixels = cdiv(cdiv(pixels, splits), config["BLOCK_M"]) * config["BLOCK_M"]
    splits = cdiv(pixels, split_pixels)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = w.new_empty((splits,) + w.shape, dtype=acc)
    mass = w.new_empty((splits, geometry["P"]), dtype=acc)
    _launch_kp_conv2d_grad_weight(
        (tiles_p * tiles_k, splits), grad, x, partial, mass, pixels, tiles_p=tiles_p,
        tiles_k=tiles_k, split_pixels=split_pixels, **geometry,
        **_strides(g=(grad, "bphw"), x=(x, "bchw"), p=(partial[0], "pchw")),
        **_constants(x, precision),
        TAPS_OUTER=taps_outer, WIDE_INDEX=_wide_index(pixels, grad, x, partial),
        GROUP=8, **config)
    mass = mass.sum(0).view(-1, 1, 1, 1)
    out.copy_((mass * w).sub_(partial.sum(0)).mul_(2))
