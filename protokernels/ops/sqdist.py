"""protokernels::sqdist: batched squared Euclidean distance (prototype-layers..., eq. 10-12)."""
from __future__ import annotations

from torch import Tensor

from .. import _backend, _validate
from ._registry import custom_op

_SQDIST = _backend.Implementations("sqdist", "sqdist")
_SQDIST_GRAD = _backend.Implementations("sqdist", "sqdist_grad")


@custom_op("sqdist")
def _sqdist(x: Tensor, y: Tensor, precision: str, backend: str) -> Tensor:
    """x (B, N, D), y (B, M, D) -> (B, N, M)."""
    batch, n, d = x.shape
    m = y.shape[1]
    if batch * n * m == 0:
        return x.new_empty((batch, n, m))
    if d == 0:
        return x.new_zeros((batch, n, m))
    return _SQDIST[backend](x, y, precision)


@_sqdist.register_fake
def _(x, y, precision, backend):
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]))


@custom_op("sqdist_grad")
def _sqdist_grad(grad: Tensor, a: Tensor, b: Tensor, transpose: bool, precision: str,
                 backend: str) -> Tensor:
    """2 (rowsum(G) a - G b) with G = grad or grad^T: the gradient of sqdist w.r.t. a."""
    if a.numel() == 0:
        return a.new_empty(a.shape)
    if b.shape[1] == 0:
        return a.new_zeros(a.shape)
    return _SQDIST_GRAD[backend](grad, a, b, transpose, precision)


@_sqdist_grad.register_fake
def _(grad, a, b, transpose, precision, backend):
    return a.new_empty(a.shape)


def _setup_grad_context(ctx, inputs, output):
    grad, a, b, ctx.transpose, _, _ = inputs
    ctx.save_for_backward(grad, a, b)


def _grad_backward(ctx, upstream):
    # Second derivatives (gradient penalties), off the hot path: plain torch matmuls of the
    # gradient's size. With G = grad (or grad^T), out = 2 (rowsum(G) a - G b), U = upstream:
    grad, a, b = ctx.saved_tensors
    g = grad.mT if ctx.transpose else grad
    d_grad = d_a = d_b = None
    if ctx.needs_input_grad[0]:
        d_g = 2 * ((upstream * a).sum(-1, keepdim=True) - upstream @ b.mT)
        d_grad = d_g.mT if ctx.transpose else d_g
    if ctx.needs_input_grad[1]:
        d_a = 2 * g.sum(-1, keepdim=True) * upstream
    if ctx.needs_input_grad[2]:
        d_b = -2 * g.mT @ upstream
    return d_grad, d_a, d_b, None, None, None


_sqdist_grad.register_autograd(_grad_backward, setup_context=_setup_grad_context)


def _setup_context(ctx, inputs, output):
    x, y, ctx.precision, ctx.backend = inputs
    ctx.save_for_backward(x, y)


def sqdist_grads(grad: Tensor, x: Tensor, y: Tensor, precision: str, backend: str,
                 needs=(True, True)) -> tuple[Tensor | None, Tensor | None]:
    """(grad_x, grad_y) of dist = sqdist(x, y) (B, N, M) receiving `grad`, each where `needs`
    asks for it: the gradient kernels, as operators (so that a backward calling them traces)."""
    grad_x = _sqdist_grad(grad, x, y, False, precision, backend) if needs[0] else None
    grad_y = _sqdist_grad(grad, y, x, True, precision, backend) if needs[1] else None
    return grad_x, grad_y


def _backward(ctx, grad):
    # The clamp at 0 is taken as the identity: it only cuts rounding noise below 0.
    x, y = ctx.saved_tensors
    return *sqdist_grads(grad, x, y, ctx.precision, ctx.backend, ctx.needs_input_grad[:2]), \
        None, None


_sqdist.register_autograd(_backward, setup_context=_setup_context)


def sqdist(x: Tensor, y: Tensor, *, precision: str | None = None) -> Tensor:
    """Squared Euclidean distances ||x_i - y_j||^2 between the rows of x and y.

    x (..., N, D) and y (..., M, D), batch dimensions broadcast like torch.matmul, give
    (..., N, M) in the inputs' dtype: ||x||^2 - 2 x.y + ||y||^2 in one fused kernel, clamped at 0.
    float16/bfloat16 accumulate in float32. `precision` ("ieee", "tf32x3", "tf32") sets how
    float32 products are computed; None follows torch.get_float32_matmul_precision() ("highest":
    within 1e-5 relative of float64, "high"/"medium": TF32), read when torch.compile traces.
    Differentiable w.r.t. x and y: gx = 2 (rowsum(g) x - g y), gy = 2 (colsum(g) y - g^T x).
    """
    _validate.floating("sqdist", x=x, y=y)
    batch, x3, y3 = _validate.batched_rows("sqdist", x, y)
    precision = _backend.resolve_precision("sqdist", precision, x.dtype)
    backend = _backend.resolve("sqdist", x.device, x.dtype, precision, n=x3.shape[1],
                               m=y3.shape[1], d=x3.shape[2], batch=x3.shape[0],
                               grad=_backend.wants_grad(x, y))
    out = _sqdist(x3, y3, precision, backend)
    return out.reshape(batch + out.shape[-2:])
