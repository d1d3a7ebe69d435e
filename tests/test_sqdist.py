"""sqdist in every backend against float64 ground truth: values, gradients, op registration, bad input."""
import pytest
import torch

import protokernels
from conftest import (DEVICE, HAS_GPU, assert_ran, cuda_kernels_run, hopper_build, hopper_fits,
                      relative_error, tolerance)

INF = float("inf")


def truth(x, y):
    """float64 ||x_i - y_j||^2 by explicit differences (no expansion, no cancellation)."""
    return (x.double().unsqueeze(-2) - y.double().unsqueeze(-3)).square().sum(-1)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


# (batch, N, M, D): 1, primes, non-multiples of every tile (16/32/64/128), D from 1 to 1025.
SHAPES = [(1, 1, 1, 1), (1, 17, 13, 1), (2, 31, 37, 7), (1, 65, 129, 33), (3, 5, 130, 129),
          (1, 129, 3, 1025)]
DTYPES = [(torch.float32, "ieee"), (torch.float32, "tf32x3"), (torch.float32, "tf32"),
          (torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float64, "ieee")]


def term_scale(x, y):
    """||x_i||^2 + ||y_j||^2: the size of the terms the expanded formula adds before cancelling."""
    x, y = x.double(), y.double()
    return x.square().sum(-1).unsqueeze(-1) + y.square().sum(-1).unsqueeze(-2)


@pytest.mark.parametrize("dtype,precision", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, shape, dtype, precision):
    batch, n, m, d = shape
    x, y = randn(batch, n, d, dtype=dtype), randn(batch, m, d, dtype=dtype)
    out = protokernels.sqdist(x, y, precision=precision)
    assert out.dtype == dtype and out.shape == (batch, n, m)
    ref = truth(x, y)
    # The expanded formula rounds relative to the terms it adds, ||x||^2 + ||y||^2; where they
    # cancel, only that bound holds (seen on the H100 at D = 1: 0.025 - 0.021 came out 0.5% off in
    # tf32, and 2e-5 off in plain float32 cuBLAS). Without heavy cancellation (D > 1, random data)
    # the spec's ||out - ref|| / ||ref|| holds as well.
    assert (out.double() - ref).norm() / term_scale(x, y).norm() <= tolerance(dtype, precision)
    if d > 1:
        assert relative_error(out, ref) <= tolerance(dtype, precision)
    assert (out >= 0).all()


def test_batch_dimensions_broadcast_like_matmul(backend):
    x, y = randn(2, 1, 19, 5), randn(3, 23, 5)
    out = protokernels.sqdist(x, y, precision="ieee")
    assert out.shape == (2, 3, 19, 23)
    assert relative_error(out, truth(x, y)) <= 1e-5
    # Unbatched against batched.
    out = protokernels.sqdist(x[0, 0], y, precision="ieee")
    assert out.shape == (3, 19, 23)
    assert relative_error(out, truth(x[0, 0], y)) <= 1e-5


def test_non_contiguous_and_expanded_inputs(backend):
    x = randn(40, 33).t()[::2]  # (17, 40) with strides (2, 33)
    y = randn(1, 40).expand(9, 40)  # every row the same, row stride 0
    out = protokernels.sqdist(x, y, precision="ieee")
    assert relative_error(out, truth(x, y)) <= 1e-5
    g = randn(9, 17).t()  # non-contiguous incoming gradient
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    truth(xr, yr).backward(g.double())
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    protokernels.sqdist(xg, yg, precision="ieee").backward(g)
    assert relative_error(xg.grad, xr.grad) <= 1e-5
    assert relative_error(yg.grad, yr.grad) <= 1e-5


@pytest.mark.parametrize("x_shape,y_shape,expected", [
    ((0, 4), (5, 4), (0, 5)),            # N = 0
    ((3, 4), (0, 4), (3, 0)),            # M = 0
    ((0, 3, 4), (0, 5, 4), (0, 3, 5)),   # empty batch
    ((2, 3, 0), (2, 5, 0), (2, 3, 5)),   # D = 0: every distance is 0
], ids=str)
def test_empty_inputs(backend, x_shape, y_shape, expected):
    x, y = randn(*x_shape).requires_grad_(), randn(*y_shape).requires_grad_()
    out = protokernels.sqdist(x, y)
    assert out.shape == expected and (out == 0).all()
    out.sum().backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()
    assert y.grad.shape == y.shape and (y.grad == 0).all()


def test_nan_propagates(backend):
    x, y = randn(5, 8), randn(7, 8)
    x[2, 3] = float("nan")
    out = protokernels.sqdist(x, y)
    assert out[2].isnan().all()
    assert not out[[0, 1, 3, 4]].isnan().any()


def test_gradcheck_float64(backend):
    x = randn(2, 7, 5, dtype=torch.float64).requires_grad_()
    y = randn(1, 11, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(protokernels.sqdist, (x, y))
    assert torch.autograd.gradgradcheck(protokernels.sqdist, (x, y))


@pytest.mark.parametrize("dtype,precision", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_gradients_match_float64(backend, dtype, precision):
    x, y = randn(2, 37, 67, dtype=dtype), randn(2, 41, 67, dtype=dtype)
    g = randn(2, 37, 41, dtype=dtype)
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    truth(xr, yr).backward(g.double())
    xg, yg = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    protokernels.sqdist(xg, yg, precision=precision).backward(g)
    assert xg.grad.dtype == dtype
    assert relative_error(xg.grad, xr.grad) <= tolerance(dtype, precision)
    assert relative_error(yg.grad, yr.grad) <= tolerance(dtype, precision)


def test_only_requested_gradients(backend):
    x, y = randn(4, 3).requires_grad_(), randn(6, 3)
    protokernels.sqdist(x, y).sum().backward()
    assert x.grad is not None and y.grad is None


def test_opcheck(backend):
    x, y, g = randn(2, 9, 6), randn(2, 11, 6), randn(2, 9, 11)
    torch.library.opcheck(torch.ops.protokernels.sqdist.default,
                          (x.requires_grad_(), y.requires_grad_(), "ieee", backend))
    torch.library.opcheck(torch.ops.protokernels.sqdist_grad.default,
                          (g, y, x, True, "ieee", backend))


def test_compile_fullgraph(backend):
    def model(x, y):  # precision=None: the matmul-precision default must not break the graph
        return protokernels.sqdist(x * 2, y).sqrt().sum(-1)

    x, y = randn(3, 21, 6), randn(3, 10, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(x, y), model(x, y)) <= 1e-6


@pytest.mark.parametrize("matmul_precision,expected", [("highest", "tf32x3"), ("high", "tf32"),
                                                       ("medium", "tf32")])
def test_precision_follows_matmul_precision(matmul_precision, expected):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        assert protokernels._backend.resolve_precision("sqdist", None, torch.float32) == expected
        assert protokernels._backend.resolve_precision("sqdist", "ieee", torch.float32) == "ieee"
        assert protokernels._backend.resolve_precision("sqdist", None, torch.float16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_reference_stays_correct_when_tiled(monkeypatch):
    """A tiny scratch budget forces many tiles in every dimension; results must not change."""
    from protokernels.reference import _scratch
    monkeypatch.setenv("PROTOKERNELS_REFERENCE_SCRATCH_MB", "0.002")  # 2 KiB
    tile = _scratch.tile_sizes({"b": 3, "n": 50, "m": 70}, lambda b, n, m: 4 * b * (n + m) * 9)
    assert 4 * tile["b"] * (tile["n"] + tile["m"]) * 9 <= 2048 and tile["n"] < 50 and tile["m"] < 70
    x, y = randn(3, 50, 8).requires_grad_(), randn(3, 70, 8).requires_grad_()
    with protokernels.use_backend("reference"):
        out = protokernels.sqdist(x, y, precision="ieee")
        out.backward(torch.ones_like(out))
    assert relative_error(out, truth(x, y)) <= 1e-5
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    truth(xr, yr).sum().backward()
    assert relative_error(x.grad, xr.grad) <= 1e-5
    assert relative_error(y.grad, yr.grad) <= 1e-5


BAD_INPUTS = [
    (lambda: (randn(4, 3), randn(5, 4)), ValueError, "feature size D"),
    (lambda: (randn(4), randn(5, 4)), ValueError, "'x' must have at least 2 dimensions"),
    (lambda: (randn(4, 3), randn(3)), ValueError, "'y' must have at least 2 dimensions"),
    (lambda: (torch.ones(4, 3, dtype=torch.int64), randn(5, 3)), TypeError, "'x' must be a floating"),
    (lambda: (randn(4, 3), torch.ones(5, 3, dtype=torch.complex64)), TypeError, "'y' must be a floating"),
    (lambda: (randn(4, 3), randn(5, 3, dtype=torch.float64)), TypeError, "same dtype"),
    (lambda: (randn(2, 4, 3), randn(3, 5, 3)), ValueError, "must broadcast"),
    (lambda: (randn(4, 3).tolist(), randn(5, 3)), TypeError, "'x' must be a torch.Tensor"),
    (lambda: (randn(4, 3).to("meta"), randn(5, 3)), ValueError, "same device"),
]


@pytest.mark.parametrize("make,error,message", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(make, error, message):
    x, y = make()
    with pytest.raises(error, match=message):
        protokernels.sqdist(x, y)


def test_bad_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        protokernels.sqdist(randn(4, 3), randn(5, 3), precision="fp8")


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    x, y = randn(2, 300, 64), randn(2, 200, 64)
    protokernels.sqdist(x, y)  # warm up (compiles the Triton kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = protokernels.sqdist(x, y, precision="ieee")
    x.copy_(randn(2, 300, 64))
    graph.replay()
    assert relative_error(out, truth(x, y)) <= 1e-5


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_more_than_2_to_the_31_outputs(backend):
    if backend == "reference":
        pytest.skip("the reference is checked on the same path by the tiling test")
    n, m = 47_000, 46_000  # 2.16e9 outputs (4.3 GB as float16): 64-bit offsets needed
    x, y = randn(n, 8, dtype=torch.float16), randn(m, 8, dtype=torch.float16)
    out = protokernels.sqdist(x, y)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=DEVICE)
    assert relative_error(out[rows], truth(x[rows], y)) <= 1e-2
    assert relative_error(out[:, -3:], truth(x, y[-3:])) <= 1e-2


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_transposed_input_with_strides_past_2_to_the_31(backend):
    if backend == "reference":
        pytest.skip("torch indexing is 64-bit throughout")
    n = 17_000_000  # x's feature stride is n: column 127 sits 2.16e9 elements in (4.4 GB)
    x = randn(128, n, dtype=torch.float16).t()
    y = randn(16, 128, dtype=torch.float16)
    out = protokernels.sqdist(x, y)
    rows = torch.tensor([0, 1, n // 2, n - 1], device=DEVICE)
    assert relative_error(out[rows], truth(x[rows], y)) <= 1e-2
    # gx reads x through the same strides. (gy would reduce over all 17M rows: the tensor cores'
    # single float32 accumulator per tile then drifts ~1.4% in both backends on the H100; that is
    # a split-K matter, not indexing.)
    g = randn(n, 16, dtype=torch.float16)
    grad_x = torch.ops.protokernels.sqdist_grad(g[None], x[None], y[None], False, "ieee", backend)
    gr, xr = g[rows].double(), x[rows].double()
    ref_x = 2 * (gr.sum(1, keepdim=True) * xr - gr @ y.double())
    assert relative_error(grad_x[0, rows], ref_x) <= 1e-2


# CUDA's Hopper distance (sm_90a: x's 128 rows kept in shared memory, y's column tiles streamed by
# TMA to two consumer warpgroups that store one tile while multiplying the next) and the portable
# one that PROTOKERNELS_CUDA_PORTABLE=1 forces on a Hopper GPU. The shapes: many column tiles per
# consumer with rings that wrap (D 256: 8 boxes of 128 bytes), batches with partial last tiles
# and an odd M (single-column stores), the deepest x that fits (float32 D 288) and deeper (D 320:
# the portable kernel in float32), depth tails inside a box (36, 360), M a multiple of 2 but not
# of 8 (pairs, no staged chunks in the half types), column splits over few row blocks (N 130,
# M 3000), rows TMA cannot read (half D 36: 72 bytes), one pair, and y shared by every batch.
# float32 also at "tf32x3" (split TF32 products): there the deepest x that fits is D 224 (each
# consumer keeps a box of y's low parts), and D 256 and 288 take the portable kernel. Several
# waves of row blocks (more than a GPU has SMs): 471 blocks of 3 column tiles.
HOPPER_SHAPES = [(1, 1000, 1500, 256), (3, 257, 651, 128), (1, 300, 400, 288), (1, 300, 400, 320),
                 (1, 300, 401, 360), (1, 130, 3000, 36), (2, 200, 258, 64), (1, 1, 1, 16),
                 (1, 300, 700, 224), (3, 20000, 300, 40)]
TENSOR_CORE_DTYPES = [(torch.float32, "tf32"), (torch.float32, "tf32x3"), (torch.float16, "tf32"),
                      (torch.bfloat16, "tf32")]


@pytest.mark.parametrize("dtype,precision", TENSOR_CORE_DTYPES,
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=str)
@pytest.mark.parametrize("shared_y", [False, True], ids=["batched_y", "shared_y"])
def test_cuda_tensor_core_distances(shape, dtype, precision, shared_y, portable):
    batch, n, m, d = shape
    x = randn(batch, n, d, dtype=dtype)
    y = randn(m, d, dtype=dtype) if shared_y else randn(batch, m, d, dtype=dtype)
    found = []
    with protokernels.use_backend("cuda"):
        kernels = cuda_kernels_run(
            lambda: found.append(protokernels.sqdist(x, y, precision=precision)))
    out, ref = found[0], truth(x, y)
    assert out.shape == (batch, n, m) and (out >= 0).all()
    assert relative_error(out, ref) <= tolerance(dtype, precision)
    hopper = hopper_build() and not portable and hopper_fits(x, "sqdist", precision)
    assert_ran(kernels, "hopper_distance_kernel", hopper)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_cuda_tensor_core_distances_non_finite(precision, portable):
    """The Hopper distance's norms come from the boxes in shared memory: NaN and infinite rows
    and columns give what every backend gives (at "tf32x3", an infinite element's pairs are not
    finite: inf or NaN, as its split products, inf times a low part of 0, make them)."""
    x, y = randn(1, 300, 64), randn(1, 700, 64)
    x[0, 7, 5], x[0, 9, 3], y[0, 400, 0] = float("nan"), INF, INF
    with protokernels.use_backend("cuda"):
        out = protokernels.sqdist(x, y, precision=precision)
    with protokernels.use_backend("reference"):
        ref = protokernels.sqdist(x, y, precision=precision)
    if precision == "tf32":
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    else:
        assert torch.equal(out.isfinite(), ref.isfinite()) and out[0, 7].isnan().all()
    finite = ref.isfinite()
    assert relative_error(out[finite], ref[finite]) <= tolerance(torch.float32, precision)


# CUDA's Hopper gradient (float32 at "tf32" and "tf32x3", the half types on the same TF32 MMAs): 2
# (rowsum(G) a - G b) with G's boxes read by TMA into wgmma's register layout, as grad (gx) or
# grad^T (gy). The shapes: rows that leave a block's 256 and a consumer's 128 partly empty (300,
# 257, 1), D over one 128-column tile (130, 256) and odd (7, 33: single-element stores), sums (M
# for gx, N for gy) that are not multiples of the step (32 float32 or 64 half elements: 136, 40,
# 4104, 300, 257), a ring that wraps many times (4104), and M 37: grad's rows are not 16-byte
# aligned, so TMA cannot read them (the portable kernel).
HOPPER_GRAD_SHAPES = [(1, 300, 712, 64), (2, 257, 136, 130), (1, 1, 8, 1), (3, 513, 40, 7),
                      (1, 1000, 1504, 256), (1, 64, 4104, 33), (2, 40, 37, 16)]


def gradients_float64(x, y, g):
    """gx = 2 (rowsum(g) x - g y), gy = 2 (colsum(g) y - g^T x) in float64."""
    x, y, g = x.double(), y.double(), g.double()
    return (2 * (g.sum(-1, keepdim=True) * x - g @ y),
            2 * (g.sum(-2).unsqueeze(-1) * y - g.mT @ x))


def assert_gradient_close(got, ref, terms, dtype, precision, inner):
    """got within the dtype's and precision's tolerance of ref, relative to the size of the terms
    that cancel in it (`terms`: the same sums of absolute values): a short sum can cancel to near
    0, where a bound relative to the result judges TF32's rounding of the terms (N1 M4 D1 failed
    so, 2.2e-3, on random data). Over sums of 1024 terms or more also relative to the result,
    where the tensor cores' accumulation drifted (RESULTS.md "The Hopper gradient")."""
    bound = tolerance(dtype, precision)
    assert (got.double() - ref).norm() <= bound * terms.norm()
    if inner >= 1024:
        assert relative_error(got, ref) <= bound


@pytest.mark.parametrize("dtype,precision", TENSOR_CORE_DTYPES,
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", HOPPER_GRAD_SHAPES, ids=str)
def test_cuda_tensor_core_gradients(shape, dtype, precision, portable):
    batch, n, m, d = shape
    x, y, g = (randn(batch, n, d, dtype=dtype), randn(batch, m, d, dtype=dtype),
               randn(batch, n, m, dtype=dtype))
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    with protokernels.use_backend("cuda"):
        out = protokernels.sqdist(xg, yg, precision=precision)
        kernels = cuda_kernels_run(lambda: out.backward(g))
    assert xg.grad.dtype == dtype and yg.grad.dtype == dtype
    gx_ref, gy_ref = gradients_float64(x, y, g)
    # 2 (rowsum(|g|) |x| + |g| |y|) and its gy counterpart: gradients_float64 of -|x|, |y|, |g|
    gx_terms, gy_terms = (t.abs() for t in gradients_float64(-x.abs(), y.abs(), g.abs()))
    assert_gradient_close(xg.grad, gx_ref, gx_terms, dtype, precision, inner=m)
    assert_gradient_close(yg.grad, gy_ref, gy_terms, dtype, precision, inner=n)
    aligned = m * g.element_size() % 16 == 0  # grad's rows, as TMA reads them
    assert_ran(kernels, "hopper_grad_kernel", hopper_build() and not portable and aligned)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_cuda_tensor_core_gradients_shared_y_and_strided_grad(precision, portable):
    """The Hopper gradient with y shared by every batch (the op sees it expanded: a 0 batch
    stride in the copy of b^T and in gy's epilogue operand), and the values for a grad that TMA
    cannot read where autograd passes it on as it is (a transposed view: its columns are not
    unit-stride, so the tile kernel takes it; which kernel ran is not checked there, since that
    is autograd's choice of layout)."""
    x, y = randn(3, 300, 64), randn(700, 64)
    for g, hopper in ((randn(3, 300, 700), True), (randn(3, 700, 300).mT, None)):
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        with protokernels.use_backend("cuda"):
            out = protokernels.sqdist(xg, yg, precision=precision)
            kernels = cuda_kernels_run(lambda: out.backward(g))
        gx_ref, gy_ref = gradients_float64(x, y.expand(3, 700, 64), g)
        assert relative_error(xg.grad, gx_ref) <= tolerance(torch.float32, precision)
        assert relative_error(yg.grad, gy_ref.sum(0)) <= tolerance(torch.float32, precision)
        if hopper is not None:
            assert_ran(kernels, "hopper_grad_kernel", hopper_build() and not portable)


def test_triton_operand_copies_keep_broadcast_dimensions():
    """The 3xTF32 split and the K-major gradient operand copy each distinct element once: a
    broadcast batch stays a 0 stride instead of becoming B copies of the input."""
    kit = pytest.importorskip("protokernels.triton_kernels._common")
    x = randn(1, 33, 7).expand(1000, 33, 7)
    _, _, (hi, lo), _ = kit.split_operands(x, x, "tf32x3")
    assert hi.stride(0) == 0 and lo.stride(0) == 0
    assert torch.equal(hi + lo, x)
    assert ((hi.view(torch.int32) & 8191) == 0).all()  # hi has TF32's 10 mantissa bits
    assert lo.abs().max() <= x.abs().max() * 2.0**-10
    (copy,) = kit.per_distinct_element(lambda u: (u.mT.contiguous().mT,), x)
    assert copy.stride(0) == 0 and copy.stride(1) == 1 and torch.equal(copy, x)
