"""kp_conv2d / kp_conv1d in every backend against float64 ground truth: values, gradients, layouts,
op registration, bad input."""
import pytest
import torch
import torch.nn.functional as F

import protokernels
from conftest import (DEVICE, HAS_GPU, assert_ran, cuda_kernels_run, hopper_build, relative_error,
                      tolerance)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


def truth(x, w, stride=1, padding=0, dilation=1):
    """float64 sum over each window of (x - w)^2 by explicit differences (no expansion)."""
    x, w = x.double(), w.double()
    kernel = w.shape[2:]
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    dist = (cols.unsqueeze(1) - w.flatten(1).unsqueeze(-1)).square().sum(2)
    size = F.conv2d(x[:, :1], x.new_ones((1, 1) + kernel), stride=stride, padding=padding,
                    dilation=dilation).shape[2:]
    return dist.view(x.shape[0], w.shape[0], *size)


def term_scale(x, w, **geometry):
    """window energy + ||w||^2: the size of the terms the expanded formula adds before cancelling."""
    x, w = x.double(), w.double()
    energy = F.conv2d(x.square(), torch.ones_like(w[:1]), **geometry)
    return energy + w.square().sum((1, 2, 3)).view(1, -1, 1, 1)


# (B, C, H, W, P, kh, kw, stride, padding, dilation): 1s, primes, few channels (the flattened depth
# walk), many channels (one tap at a time in channel blocks), D = C kh kw from 1 to 1072, every
# geometry argument as a pair.
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 1),
    (2, 3, 7, 5, 5, 3, 3, 1, 1, 1),
    (1, 32, 6, 7, 17, 2, 3, (2, 1), (1, 0), (1, 2)),
    (3, 5, 11, 13, 37, 5, 5, 2, 2, 1),
    (1, 67, 6, 6, 3, 4, 4, 1, (0, 3), 1),
    (2, 130, 3, 4, 33, 1, 1, 1, 0, 1),
]
DTYPES = [(torch.float32, "ieee"), (torch.float32, "tf32x3"), (torch.float32, "tf32"),
          (torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float64, "ieee")]
ids = lambda v: str(v).replace("torch.", "")  # noqa: E731


def make(shape, dtype=torch.float32):
    b, c, h, w, p, kh, kw, stride, padding, dilation = shape
    x, weight = randn(b, c, h, w, dtype=dtype), randn(p, c, kh, kw, dtype=dtype)
    return x, weight, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("dtype,precision", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, shape, dtype, precision):
    x, w, geometry = make(shape, dtype)
    out = protokernels.kp_conv2d(x, w, precision=precision, **geometry)
    ref = truth(x, w, **geometry)
    assert out.dtype == dtype and out.shape == ref.shape
    # As for sqdist: rounding is relative to the terms added before they cancel, plus the final
    # rounding to the output dtype, relative to the result (Triton's interpreter truncates there:
    # 0.51941 became bfloat16 0.515625, not 0.51953125).
    bound = tolerance(dtype, precision)
    assert (out.double() - ref).norm() / (term_scale(x, w, **geometry) + ref).norm() <= bound
    if shape[1] * shape[5] * shape[6] > 1:
        assert relative_error(out, ref) <= bound
    assert (out >= 0).all()


GRAD_SHAPES = [SHAPES[1], SHAPES[2], SHAPES[3],
               (2, 24, 5, 6, 40, 3, 3, 2, 1, (2, 1))]  # P 40: the gx depth walks taps outer


@pytest.mark.parametrize("dtype,precision", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_gradients_match_float64(backend, shape, dtype, precision):
    x, w, geometry = make(shape, dtype)
    xr, wr = x.double().detach().requires_grad_(), w.double().detach().requires_grad_()
    ref = truth(xr, wr, **geometry)
    g = randn(*ref.shape, dtype=dtype)
    ref.backward(g.double())
    xg, wg = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    protokernels.kp_conv2d(xg, wg, precision=precision, **geometry).backward(g)
    assert xg.grad.dtype == dtype and wg.grad.dtype == dtype
    assert relative_error(xg.grad, xr.grad) <= tolerance(dtype, precision)
    assert relative_error(wg.grad, wr.grad) <= tolerance(dtype, precision)


@pytest.mark.parametrize("geometry", [dict(), dict(stride=2, padding=1), dict(dilation=(2, 1))],
                         ids=str)
def test_gradcheck_float64(backend, geometry):
    x = randn(2, 3, 5, 6, dtype=torch.float64).requires_grad_()
    w = randn(4, 3, 2, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: protokernels.kp_conv2d(a, b, **geometry), (x, w),
                                    fast_mode=backend == "triton" and not HAS_GPU)


def test_conv1d_is_conv2d_of_height_1(backend):
    x, w = randn(3, 6, 29), randn(7, 6, 4)
    out = protokernels.kp_conv1d(x, w, stride=2, padding=3, dilation=2, precision="ieee")
    ref = truth(x[:, :, None], w[:, :, None], stride=(1, 2), padding=(0, 3), dilation=(1, 2))
    assert out.shape == (3, 7, 15)
    assert relative_error(out, ref[:, :, 0]) <= 1e-5
    unbatched = protokernels.kp_conv1d(x[1], w, stride=2, padding=3, dilation=2, precision="ieee")
    assert relative_error(unbatched, out[1]) <= 1e-6


def test_unbatched_input(backend):
    x, w = randn(4, 9, 8), randn(5, 4, 3, 3)
    out = protokernels.kp_conv2d(x, w, padding=1, precision="ieee")
    assert out.shape == (5, 9, 8)
    assert relative_error(out, truth(x[None], w, padding=1)[0]) <= 1e-5


def test_channels_last_and_strided_inputs(backend):
    x = randn(2, 40, 9, 11).to(memory_format=torch.channels_last)
    w = randn(6, 40, 3, 3).to(memory_format=torch.channels_last)
    out = protokernels.kp_conv2d(x, w, padding=1, precision="ieee")
    assert out.is_contiguous(memory_format=torch.channels_last)  # like F.conv2d
    assert relative_error(out, truth(x, w, padding=1)) <= 1e-5
    xs = randn(3, 5, 20, 14)[::2, 1:4, ::2, 1::3]  # (2, 3, 10, 5), no dense layout
    ws = randn(1, 3, 2, 2).expand(4, 3, 2, 2)       # four copies of one prototype, stride 0
    xs.requires_grad_(), ws.requires_grad_()
    out = protokernels.kp_conv2d(xs, ws, stride=(2, 1), precision="ieee")
    assert relative_error(out, truth(xs, ws, stride=(2, 1))) <= 1e-5
    g = randn(*out.shape[::-1]).permute(3, 2, 1, 0)  # a non-contiguous incoming gradient
    out.backward(g)
    xr, wr = xs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    truth(xr, wr, stride=(2, 1)).backward(g.double())
    assert relative_error(xs.grad, xr.grad) <= 1e-5
    assert relative_error(ws.grad, wr.grad) <= 1e-5


@pytest.mark.parametrize("x_shape,w_shape,expected", [
    ((0, 3, 5, 5), (4, 3, 3, 3), (0, 4, 3, 3)),  # no images
    ((2, 3, 5, 5), (0, 3, 3, 3), (2, 0, 3, 3)),  # no prototypes
    ((2, 0, 5, 5), (4, 0, 3, 3), (2, 4, 3, 3)),  # no channels: every distance is 0
], ids=str)
def test_empty_inputs(backend, x_shape, w_shape, expected):
    x, w = randn(*x_shape).requires_grad_(), randn(*w_shape).requires_grad_()
    out = protokernels.kp_conv2d(x, w)
    assert out.shape == expected and (out == 0).all()
    out.sum().backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()
    assert w.grad.shape == w.shape and (w.grad == 0).all()


def test_nan_propagates(backend):
    x, w = randn(1, 2, 8, 8), randn(3, 2, 3, 3)
    x[0, 1, 2, 5] = float("nan")
    out = protokernels.kp_conv2d(x, w)  # windows at rows 0-2, columns 3-5 cover the NaN
    hit = torch.zeros(6, 6, dtype=torch.bool, device=DEVICE)
    hit[0:3, 3:6] = True
    assert out[:, :, hit].isnan().all() and not out[:, :, ~hit].isnan().any()


# (geometry, the grad input is a convolution of g): stride 1 and padding within the kernel's
# reach, dil (k - 1), in every dimension.
GRAD_INPUT_CONV_CASES = [
    (dict(padding=1), True),
    (dict(padding=2), True),
    (dict(padding=3), False),
    (dict(stride=(2, 1), padding=1), False),
    (dict(padding=(0, 4), dilation=(1, 2)), True),
    (dict(padding=(0, 5), dilation=(1, 2)), False),
]


@pytest.mark.parametrize("geometry,is_conv", GRAD_INPUT_CONV_CASES, ids=str)
def test_each_computation_gets_its_own_backend(monkeypatch, geometry, is_conv):
    """The wrapper resolves the forward, the grad input and the weight gradient apart, tells the
    size table whether the grad input is a convolution of g (grad_input_conv: what CUDA's Hopper
    kernel needs), and the backward runs each gradient on its own backend."""
    ops = protokernels.ops.kp_conv
    resolved, ran = {}, []

    def resolve(op, device, dtype, precision, **sizes):
        resolved[op] = sizes
        return {"kp_conv2d_grad_input": "triton", "kp_conv2d_grad_weight": "cuda"}.get(
            op, "reference")

    def spy(name, implementation):
        def run(*args):
            ran.append(name)
            implementation(*args)
        return run

    reference_input = ops._GRAD_INPUT["reference"]
    reference_weight = ops._GRAD_WEIGHT["reference"]
    monkeypatch.setattr(ops._backend, "resolve", resolve)
    monkeypatch.setitem(ops._GRAD_INPUT, "triton", spy("grad input", reference_input))
    monkeypatch.setitem(ops._GRAD_WEIGHT, "cuda", spy("grad weight", reference_weight))
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    protokernels.kp_conv2d(x, w, **geometry).sum().backward()
    assert resolved["kp_conv2d_grad_input"]["grad_input_conv"] is is_conv
    assert resolved["kp_conv2d"]["grad"] is True
    assert sorted(ran) == ["grad input", "grad weight"]
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    truth(xr, wr, **geometry).sum().backward()
    assert torch.allclose(x.grad, xr.grad) and torch.allclose(w.grad, wr.grad)


def test_only_requested_gradients(backend):
    x, w = randn(1, 2, 5, 5).requires_grad_(), randn(3, 2, 3, 3)
    protokernels.kp_conv2d(x, w).sum().backward()
    assert x.grad is not None and w.grad is None


# The Hopper kernels' dtypes and precisions: float32 at "tf32", and at "tf32x3" (the default
# "highest") as split products; the half types, widened to float32 copies (exact in TF32).
HOPPER_DTYPES = [(torch.float32, "tf32"), (torch.float32, "tf32x3"), (torch.bfloat16, "tf32"),
                 (torch.float16, "tf32")]


def hopper_conv_runs(shape, precision):
    """Whether the Hopper convolution kernel (forward, grad input) takes a kernel this wide."""
    return precision == "tf32" or shape[6] <= 3


def incoming_gradient(out, layout, dtype):
    """The gradient of out in dtype: random, or the broadcast 1 that out.sum() passes back."""
    if layout == "broadcast_grad":
        return torch.ones((), device=out.device, dtype=dtype).expand(out.shape)
    return torch.randn_like(out).to(dtype)


# The Hopper weight gradient's cases (stride 1 along the width): P 130 and C 67
# (two prototype and channel tiles), widths that are not multiples of 4 (g and x copied for TMA)
# and rows of more than 32 pixels (a partial last chunk), 4 and 5 taps (a partial group of three),
# stride and dilation along the height, dilation along the width, one image row, many K steps.
HOPPER_WEIGHT_GRAD_SHAPES = [
    (3, 67, 9, 37, 130, 3, 3, 1, 1, 1),
    (2, 5, 6, 70, 7, 2, 2, (2, 1), (0, 1), (1, 3)),
    (1, 3, 1, 40, 5, 1, 5, 1, (0, 2), 1),
    (1, 64, 12, 56, 128, 3, 3, 1, 1, 1),
    (37, 2, 8, 8, 16, 3, 3, 1, 1, 1),
]


@pytest.mark.parametrize("dtype,precision", HOPPER_DTYPES, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "broadcast_grad"])
@pytest.mark.parametrize("shape", HOPPER_WEIGHT_GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("choice", ["cuda", "auto"])
def test_hopper_weight_gradient(choice, shape, layout, dtype, precision):
    """The weight gradient on CUDA's Hopper kernel where it applies, on the CUDA backend and under
    `auto` (which gives it the Hopper kernel whatever runs the rest), against float64; x in either
    memory format, and the broadcast gradient that out.sum() passes back (TMA reads neither as it
    lies: the kernel reads copies); "tf32x3" as split products, 2 taps a block."""
    if not HAS_GPU or not protokernels.available_backends()["cuda"].available:
        pytest.skip("needs a GPU and the CUDA extension")
    x, w, geometry = make(shape, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = truth(xr, wr, **geometry)
    g = incoming_gradient(ref, layout, dtype)
    ref.backward(g.double())
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with protokernels.use_backend(choice):
        out = protokernels.kp_conv2d(xg, wg, precision=precision, **geometry)
        kernels = cuda_kernels_run(lambda: out.backward(g))
    assert wg.grad.dtype == dtype and xg.grad.dtype == dtype
    assert relative_error(wg.grad, wr.grad) <= tolerance(dtype, precision)
    assert relative_error(xg.grad, xr.grad) <= tolerance(dtype, precision)
    assert_ran(kernels, "hopper_weight_grad_kernel", hopper_build())


# The Hopper forward's cases (stride 1 along the width, kernels up to 4 wide,
# at least 32 channels): P 130 (two prototype tiles), C 67 and 37 (partial 32-channel steps),
# odd output heights (a consumer's row past the end), rows of more than 64 pixels (two column
# tiles), widths that are not multiples of 4 (x copied for TMA), stride and dilation along the
# height, dilation 3 along the width, a 4-wide kernel, the spec's geometry; and C 5, which the
# tile kernel takes (fewer channels than a step).
HOPPER_FORWARD_SHAPES = [
    (3, 67, 9, 37, 130, 3, 3, 1, 1, 1),
    (2, 37, 7, 70, 7, 2, 2, (2, 1), (0, 1), (1, 3)),
    (1, 32, 1, 40, 5, 1, 4, 1, (0, 2), 1),
    (2, 64, 12, 56, 128, 3, 3, 1, 1, 1),
    (2, 5, 7, 70, 7, 2, 2, (2, 1), (0, 1), (1, 3)),
]


@pytest.mark.parametrize("dtype,precision", HOPPER_DTYPES, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", HOPPER_FORWARD_SHAPES, ids=str)
def test_hopper_forward(shape, layout, dtype, precision):
    """CUDA's Hopper forward where it applies, against float64 (the bound of
    test_matches_float64), in either memory format, and that it ran (not below 32 channels, nor
    at "tf32x3" for a 4-wide kernel)."""
    if not HAS_GPU or not protokernels.available_backends()["cuda"].available:
        pytest.skip("needs a GPU and the CUDA extension")
    x, w, geometry = make(shape, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with protokernels.use_backend("cuda"):
        kernels = cuda_kernels_run(lambda: protokernels.kp_conv2d(x, w, precision=precision,
                                                                  **geometry))
        out = protokernels.kp_conv2d(x, w, precision=precision, **geometry)
    ref = truth(x, w, **geometry)
    bound = tolerance(dtype, precision)
    assert out.dtype == dtype
    assert (out.double() - ref).norm() / (term_scale(x, w, **geometry) + ref).norm() <= bound
    assert relative_error(out, ref) <= bound and (out >= 0).all()
    assert_ran(kernels, "hopper_conv_kernel",
               hopper_build() and shape[1] >= 32 and hopper_conv_runs(shape, precision))
    assert_ran(kernels, "reorder_prototypes_kernel<true,", False)  # not the grad input's


# The Hopper grad input's cases (stride 1, padding within the kernel's reach,
# kernels up to 4 wide, at least 32 prototypes): C 67 and 5 (partial "prototype" tiles of w'), P
# 130 and 37 (partial 32-prototype K steps), x 70 wide (two column tiles of gx), dilation 3 along
# the width with padding 1 (w''s padding 2), a 1x4 kernel on one image row, the spec's geometry;
# then what the tile kernel takes: stride 2, padding past the kernel's reach, P 16.
HOPPER_GRAD_INPUT_SHAPES = [
    ((3, 67, 9, 37, 130, 3, 3, 1, 1, 1), True),
    ((2, 5, 7, 70, 37, 2, 2, 1, (0, 1), (1, 3)), True),
    ((1, 3, 1, 40, 32, 1, 4, 1, (0, 2), 1), True),
    ((2, 64, 12, 56, 128, 3, 3, 1, 1, 1), True),
    ((2, 8, 9, 9, 40, 3, 3, 2, 1, 1), False),
    ((1, 4, 6, 6, 33, 3, 3, 1, 3, 1), False),
    ((2, 8, 9, 9, 16, 3, 3, 1, 1, 1), False),
]


@pytest.mark.parametrize("dtype,precision", HOPPER_DTYPES, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "broadcast_grad"])
@pytest.mark.parametrize("shape,hopper", HOPPER_GRAD_INPUT_SHAPES, ids=str)
@pytest.mark.parametrize("choice", ["cuda", "auto"])
def test_hopper_grad_input(choice, shape, hopper, layout, dtype, precision):
    """The grad input on CUDA's Hopper kernel where it applies (the forward's kernel run on g with
    w's taps flipped), on the CUDA backend and under `auto`, against float64; x in either memory
    format (gx follows it) and the broadcast gradient of out.sum() (TMA reads a copy)."""
    if not HAS_GPU or not protokernels.available_backends()["cuda"].available:
        pytest.skip("needs a GPU and the CUDA extension")
    x, w, geometry = make(shape, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xr = x.double().requires_grad_()
    ref = truth(xr, w.double(), **geometry)
    g = incoming_gradient(ref, layout, dtype)
    ref.backward(g.double())
    xg = x.clone().requires_grad_()
    with protokernels.use_backend(choice):
        out = protokernels.kp_conv2d(xg, w, precision=precision, **geometry)
        kernels = cuda_kernels_run(lambda: out.backward(g))
    assert xg.grad.dtype == dtype
    assert relative_error(xg.grad, xr.grad) <= tolerance(dtype, precision)
    assert xg.grad.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert_ran(kernels, "reorder_prototypes_kernel<true,",
               hopper_build() and hopper and hopper_conv_runs(shape, precision))


def test_hopper_weight_gradient_keeps_nonfinite_x_local():
    """A row's last 32-pixel chunk reaches past the row's end, where g reads as 0 but x may hold an
    inf that no true product meets: out_w 34 (kernel width 3), inf at x's last column, which only
    tap 2 meets (at ow 33). The kernel zeroes those pixels of x, so taps 0 and 1 stay finite."""
    if not hopper_build():
        pytest.skip("needs CUDA's Hopper kernels")
    x, w = randn(1, 2, 1, 36), randn(3, 2, 1, 3)
    x[0, 1, 0, 35] = float("inf")
    g = torch.randn(1, 3, 1, 34, device=DEVICE)
    wg = w.clone().requires_grad_()
    with protokernels.use_backend("cuda"):
        protokernels.kp_conv2d(x, wg, precision="tf32").backward(g)
    assert wg.grad[:, 1, 0, :2].isfinite().all() and wg.grad[:, 0].isfinite().all()
    assert not wg.grad[:, 1, 0, 2].isfinite().any()


def test_opcheck(backend):
    x, w = randn(2, 3, 6, 7), randn(4, 3, 2, 3)
    geometry = ([2, 1], [1, 0], [1, 2])
    g = torch.ops.protokernels.kp_conv2d(x, w, *geometry, "ieee", backend, backend, backend)
    torch.library.opcheck(torch.ops.protokernels.kp_conv2d.default,
                          (x.requires_grad_(), w.requires_grad_(), *geometry, "ieee", backend,
                           backend, backend))
    for op in (torch.ops.protokernels.kp_conv2d_grad_input,
               torch.ops.protokernels.kp_conv2d_grad_weight):
        torch.library.opcheck(op.default, (randn(*g.shape), x.detach(), w.detach(), *geometry,
                                           "ieee", backend))


def test_compile_fullgraph(backend):
    def model(x, w):
        return protokernels.kp_conv2d(x * 2, w, padding=1).neg().softmax(1)

    x, w = randn(2, 3, 7, 6), randn(5, 3, 3, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(x, w), model(x, w)) <= 1e-5


def test_reference_stays_correct_when_chunked(monkeypatch):
    """A tiny scratch budget forces one image and one prototype per chunk."""
    monkeypatch.setenv("PROTOKERNELS_REFERENCE_SCRATCH_MB", "0.001")
    x, w, geometry = make(SHAPES[3])
    x.requires_grad_(), w.requires_grad_()
    with protokernels.use_backend("reference"):
        out = protokernels.kp_conv2d(x, w, precision="ieee", **geometry)
        out.backward(torch.ones_like(out))
    assert relative_error(out, truth(x, w, **geometry)) <= 1e-5
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth(xr, wr, **geometry).sum().backward()
    assert relative_error(x.grad, xr.grad) <= 1e-5
    assert relative_error(w.grad, wr.grad) <= 1e-5


BAD_INPUTS = [
    (lambda: (randn(3, 5), randn(4, 3, 2, 2)), {}, ValueError, "'x' must be 4-D"),
    (lambda: (randn(1, 2, 3, 5, 5), randn(4, 3, 2, 2)), {}, ValueError, "'x' must be 4-D"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2)), {}, ValueError, "'w' must be 4-D"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 2, 2, 2)), {}, ValueError, "as many channels"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 6, 2)), {}, ValueError, "larger than the padded"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 3, 3)), dict(dilation=3), ValueError,
     "larger than the padded"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 0, 2)), {}, ValueError, "kernel size of 'w'"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2)), dict(stride=0), ValueError, "'stride'"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2)), dict(stride=(1, -2)), ValueError, "'stride'"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2)), dict(dilation=0), ValueError, "'dilation'"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2)), dict(padding=-1), ValueError, "'padding'"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2)), dict(padding=(1, 1, 1)), ValueError,
     "'padding'"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2)), dict(stride=1.5), TypeError, "'stride'"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2)), dict(padding="same"), TypeError,
     "'padding'"),
    (lambda: (torch.ones(2, 3, 5, 5, dtype=torch.int64), randn(4, 3, 2, 2)), {}, TypeError,
     "'x' must be a floating"),
    (lambda: (randn(2, 3, 5, 5), torch.ones(4, 3, 2, 2, dtype=torch.int32)), {}, TypeError,
     "'w' must be a floating"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2, dtype=torch.float64)), {}, TypeError,
     "same dtype"),
    (lambda: (randn(2, 3, 5, 5), randn(4, 3, 2, 2).to("meta")), {}, ValueError, "same device"),
]


@pytest.mark.parametrize("make_inputs,kwargs,error,message", BAD_INPUTS,
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(make_inputs, kwargs, error, message):
    x, w = make_inputs()
    with pytest.raises(error, match=message):
        protokernels.kp_conv2d(x, w, **kwargs)


def test_bad_input_conv1d():
    with pytest.raises(ValueError, match="'x' must be 3-D"):
        protokernels.kp_conv1d(randn(2, 3, 5, 5), randn(4, 3, 2))
    with pytest.raises(ValueError, match="larger than the padded"):
        protokernels.kp_conv1d(randn(2, 3, 5), randn(4, 3, 7), padding=(0,))


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    x, w = randn(2, 16, 20, 20), randn(8, 16, 3, 3)
    protokernels.kp_conv2d(x, w, padding=1)  # warm up (compiles the Triton kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = protokernels.kp_conv2d(x, w, padding=1, precision="ieee")
    x.copy_(randn(2, 16, 20, 20))
    graph.replay()
    assert relative_error(out, truth(x, w, padding=1)) <= 1e-5


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_more_than_2_to_the_31_pixels(backend):
    """x, the output, gx and the pixel index all pass 2**31 elements (4.3 GB each in float16)."""
    images = 2**31 // (128 * 128) + 1
    x = randn(images, 1, 128, 128, dtype=torch.float16).requires_grad_()
    w = randn(2, 1, 1, 1, dtype=torch.float16).requires_grad_()
    out = protokernels.kp_conv2d(x, w)
    tail = slice(images - 2, images)
    assert relative_error(out[tail], truth(x[tail], w)) <= 1e-2
    del out
    x.grad, = torch.autograd.grad(protokernels.kp_conv2d(x, w[:1]).sum(), x)
    xt, wt = x[tail].detach().double().requires_grad_(), w[:1].detach().double()
    truth(xt, wt).sum().backward()
    assert relative_error(x.grad[tail], xt.grad) <= 1e-2
