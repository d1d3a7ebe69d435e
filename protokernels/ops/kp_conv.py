"""protokernels::kp_conv2d: the kernel-prototype convolution (prototype-layers..., §6.2, eq. 21).

The squared distance between every sliding window of x and every kernel-prototype,
x^2 * 1 - 2 x * w + ||w||^2, in one fused pass; kp_conv1d is kp_conv2d on a height-1 image.
Gradients (clamp at 0 taken as the identity), with g the incoming gradient (B, P, Ho, Wo):
  gx = 2 x convT(sum_p g, ones) - 2 convT(g, w)      (protokernels::kp_conv2d_grad_input)
  gw = 2 w sum_{b,h,w} g - 2 corr(x, g)              (protokernels::kp_conv2d_grad_weight)
Each backend fills an output allocated here, so that every backend and the fake agree on its
layout: channels_last in, channels_last out, like F.conv2d. Each of the three computations has a
backend of its own (`backend`, `input_backend`, `weight_backend`): `auto` gives each CUDA's
Hopper kernel where that one runs, whichever backend runs the others (the xformers way: forward
and backward dispatched apart).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from ._registry import custom_op

_FORWARD = _backend.Implementations("kp_conv", "kp_conv2d")
_GRAD_INPUT = _backend.Implementations("kp_conv", "kp_conv2d_grad_input")
_GRAD_WEIGHT = _backend.Implementations("kp_conv", "kp_conv2d_grad_weight")


def _output_size(size, kernel, stride, padding, dilation) -> list[int]:
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(size, kernel, stride, padding, dilation)]


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _new_like(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _new_output(x: Tensor, w: Tensor, stride, padding, dilation) -> Tensor:
    spatial = _output_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    return _new_like(x, [x.shape[0], w.shape[0], *spatial])


@custom_op("kp_conv2d")
def _kp_conv2d(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
               precision: str, backend: str, input_backend: str, weight_backend: str) -> Tensor:
    """x (B, C, H, W), w (P, C, kh, kw) -> (B, P, Ho, Wo); the backward's gradients run on
    input_backend (x's) and weight_backend (w's)."""
    out = _new_output(x, w, stride, padding, dilation)
    if out.numel() == 0:
        return out
    if x.shape[1] == 0:  # no features: every distance is 0
        return out.zero_()
    _FORWARD[backend](x, w, stride, padding, dilation, precision, out)
    return out


@_kp_conv2d.register_fake
def _(x, w, stride, padding, dilation, precision, backend, input_backend, weight_backend):
    return _new_output(x, w, stride, padding, dilation)


def _define_gradient(implementations: _backend.Implementations, of_weight: bool):
    """protokernels::<function>(grad, x, w, stride, padding, dilation, precision, backend): the
    gradient of kp_conv2d w.r.t. x, or w if `of_weight`, laid out like that argument."""

    def fake(grad: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int],
             dilation: list[int], precision: str, backend: str) -> Tensor:
        like = w if of_weight else x
        return _new_like(like, like.shape)

    def gradient(grad: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int],
                 dilation: list[int], precision: str, backend: str) -> Tensor:
        out = fake(grad, x, w, stride, padding, dilation, precision, backend)
        if out.numel() == 0:
            return out
        if grad.numel() == 0:
            return out.zero_()
        implementations[backend](grad, x, w, stride, padding, dilation, precision, out)
        return out

    op = custom_op(implementations.function)(gradient)
    op.register_fake(fake)
    return op


_grad_input = _define_gradient(_GRAD_INPUT, of_weight=False)
_grad_weight = _define_gradient(_GRAD_WEIGHT, of_weight=True)


def _setup_context(ctx, inputs, output):
    x, w, *ctx.geometry, ctx.precision, _, ctx.input_backend, ctx.weight_backend = inputs
    ctx.save_for_backward(x, w)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input(grad, x, w, *ctx.geometry, ctx.precision, ctx.input_backend)
    if ctx.needs_input_grad[1]:
        grad_w = _grad_weight(grad, x, w, *ctx.geometry, ctx.precision, ctx.weight_backend)
    return grad_x, grad_w, None, None, None, None, None, None, None


_kp_conv2d.register_autograd(_backward, setup_context=_setup_context)


def _kp_conv(op: str, spatial: int, layout: str, x, w, stride, padding, dilation, precision):
    _validate.floating(op, x=x, w=w)
    stride, padding, dilation = _validate.conv_windows(op, x, w, stride, padding, dilation,
                                                       spatial, layout)
    precision = _backend.resolve_precision(op, precision, x.dtype)
    # grad_input_conv: the grad input is a convolution of g (stride 1, padding within the
    # kernel's reach), as CUDA's Hopper kernel computes it.
    sizes = dict(batch=x.shape[0] if x.dim() > spatial + 1 else 1, c=x.shape[-spatial - 1],
                 p=w.shape[0], pixels=x.shape[-1] * (x.shape[-2] if spatial == 2 else 1),
                 taps=w.shape[-1] * (w.shape[-2] if spatial == 2 else 1), kw=w.shape[-1],
                 stride_w=stride[-1],
                 grad_input_conv=all(s == 1 for s in stride) and all(
                     p <= d * (k - 1) for p, d, k in zip(padding, dilation, w.shape[2:])))
    grad = _backend.wants_grad(x, w)
    backend = _backend.resolve(op, x.device, x.dtype, precision, grad=grad, **sizes)
    input_backend = (_backend.resolve("kp_conv2d_grad_input", x.device, x.dtype, precision,
                                      **sizes)
                     if grad and x.requires_grad else backend)
    weight_backend = (_backend.resolve("kp_conv2d_grad_weight", x.device, x.dtype, precision,
                                       **sizes)
                      if grad and w.requires_grad else backend)
    unbatched = x.dim() == spatial + 1
    if unbatched:
        x = x.unsqueeze(0)
    if spatial == 1:  # a 1-D convolution is a 2-D one over a height-1 image
        x, w = x.unsqueeze(2), w.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    out = _kp_conv2d(x, w, list(stride), list(padding), list(dilation), precision, backend,
                     input_backend, weight_backend)
    if spatial == 1:
        out = out.squeeze(2)
    return out.squeeze(0) if unbatched else out


def kp_conv2d(x: Tensor, w: Tensor, *, stride=1, padding=0, dilation=1,
              precision: str | None = None) -> Tensor:
    """Kernel-prototype convolution: the squared Euclidean distance between every sliding window
    of x and every kernel-prototype, x^2 * 1 - 2 x * w + ||w||^2 (prototype-layers..., eq. 21).

    x (B, C, H, W) or (C, H, W), w (P, C, kh, kw) -> (B, P, Ho, Wo) in x's dtype, with the output
    geometry of F.conv2d(x, w, stride=, padding=, dilation=) (each an int or a pair). Zero
    padding: a padded position counts as 0, so it adds w^2. One fused pass (the window energy comes
    from the tiles loaded for the product), clamped at 0; channels_last in, channels_last out.
    float16/bfloat16 accumulate in float32; `precision` as in sqdist. Differentiable w.r.t. x and
    w (fused backward kernels).
    """
    return _kp_conv("kp_conv2d", 2, "(B, C, H, W)", x, w, stride, padding, dilation, precision)


def kp_conv1d(x: Tensor, w: Tensor, *, stride=1, padding=0, dilation=1,
              precision: str | None = None) -> Tensor:
    """kp_conv2d for sequences: x (B, C, L) or (C, L), w (P, C, k) -> (B, P, Lo), the geometry of
    F.conv1d."""
    return _kp_conv("kp_conv1d", 1, "(B, C, L)", x, w, stride, padding, dilation, precision)
