"""dw_nearest and dw_quantize in every backend against float64 ground truth: each group's winner
judged by its true distance, exact distances, the quantized vectors, gradients, registration, bad
input."""
import re
import subprocess
import sys

import pytest
import torch

import protokernels
from conftest import (DEVICE, HAS_GPU, assert_ran, cuda_kernels_run, hopper_build, relative_error,
                      skip_unless_capable, tolerance)
from test_nearest import (DTYPES, assert_winners, dtype_ids, randn,
                          truth)


def by_group(x, groups):
    """x (..., G*Dg) as (G, N, Dg): each group's rows, the batch layout assert_winners takes."""
    return x.reshape(-1, groups, x.shape[-1] // groups).transpose(0, 1)


def assert_groups(x, codebooks, dist, idx, dtype=torch.float32, precision="ieee"):
    groups = codebooks.shape[0]
    assert dist.shape == idx.shape == x.shape[:-1] + (groups,)
    assert_winners(by_group(x, groups), codebooks, dist.reshape(-1, groups).t(),
                   idx.reshape(-1, groups).t(), dtype=dtype, precision=precision)


SHAPES = [(1, 1, 1, 1), (17, 3, 13, 1), (31, 2, 37, 7), (65, 4, 129, 33), (130, 1, 5, 129),
          (3, 2, 40, 1025)]  # (N, G, K, Dg)
# N 3000 with K 700 at Dg 1100: Triton splits the columns (M*D >= 2**20), so its separate finish
# kernel writes the codes (the search kernel writes them when a program owns whole rows).
SHAPES += [(3000, 1, 700, 1100)] if HAS_GPU else []


@pytest.mark.parametrize("dtype,precision", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dw_nearest_and_dw_quantize_match_float64(backend, shape, dtype, precision):
    skip_unless_capable(backend, "dw_quantize", dtype)
    n, groups, size, depth = shape
    x, codebooks = randn(n, groups * depth, dtype=dtype), randn(groups, size, depth, dtype=dtype)
    quantized, idx, dist = protokernels.dw_quantize(x, codebooks, precision=precision)
    assert_quantized(x, codebooks, quantized, idx, dist, dtype=dtype, precision=precision)
    # The same search as dw_nearest's, so the same winners and distances, bit for bit.
    ref_dist, ref_idx = protokernels.dw_nearest(x, codebooks, precision=precision)
    assert torch.equal(idx, ref_idx) and torch.equal(dist.nan_to_num(), ref_dist.nan_to_num())


def test_one_group_is_nearest(backend):
    x, codebooks = randn(40, 9), randn(1, 23, 9)
    dist, idx = protokernels.dw_nearest(x, codebooks, precision="ieee")
    ref_dist, ref_idx = protokernels.nearest(x, codebooks[0], precision="ieee")
    assert torch.equal(idx[:, 0], ref_idx) and torch.equal(dist[:, 0], ref_dist)


def test_batch_dimensions_and_strided_inputs(backend):
    x = randn(2, 3, 24, 7).transpose(-1, -2)[:, ::2]  # (2, 2, 7, 24), non-contiguous
    codebooks = randn(4, 6, 11).transpose(1, 2)  # (4, 11, 6), non-contiguous
    dist, idx = protokernels.dw_nearest(x, codebooks)
    assert idx.shape == (2, 2, 7, 4)
    assert_groups(x, codebooks, dist, idx)
    expanded = randn(1, 24).expand(5, 24)
    dist, idx = protokernels.dw_nearest(expanded, codebooks)
    assert (idx == idx[:1]).all()
    dist, idx = protokernels.dw_nearest(randn(24), codebooks)  # one vector: (G,)
    assert idx.shape == (4,)


def test_ties_go_to_the_smallest_index(backend):
    codebooks = torch.randint(-4, 5, (2, 700, 8), device=DEVICE).float()
    codebooks[1, [300, 650]] = codebooks[1, 3].clone()  # three identical codes in group 1
    x = torch.cat([codebooks[0, 5], codebooks[1, 3]])[None].repeat(3, 1)
    for precision in ("ieee", "tf32x3", "tf32"):
        dist, idx = protokernels.dw_nearest(x, codebooks, precision=precision)
        assert (idx[:, 1] == 3).all() and (dist == 0).all()


def test_nan_slice_gives_nan_distance_in_its_group_only(backend):
    x, codebooks = randn(6, 3 * 5), randn(3, 9, 5)
    x[2, 7] = float("nan")  # group 1 of row 2
    dist, idx = protokernels.dw_nearest(x, codebooks)
    assert dist[2, 1].isnan()
    assert dist.isnan().sum() == 1


@pytest.mark.parametrize("x_shape,books_shape", [((0, 12), (3, 5, 4)), ((4, 0), (2, 5, 0)),
                                                 ((4, 0), (0, 5, 7))], ids=str)
def test_empty(backend, x_shape, books_shape):
    x, codebooks = randn(*x_shape).requires_grad_(), randn(*books_shape).requires_grad_()
    dist, idx = protokernels.dw_nearest(x, codebooks)
    assert dist.shape == idx.shape == (x_shape[0], books_shape[0])
    if books_shape[2] == 0 and books_shape[0] > 0:
        assert (dist == 0).all() and (idx == 0).all()
    dist.sum().backward()
    assert (codebooks.grad == 0).all()


def test_gradcheck_float64(backend):
    skip_unless_capable(backend, "dw_nearest", torch.float64)  # its gradient kernel: test_nearest
    # 6 rows against 3 codes per group: winners are shared, the scatter-add must sum them.
    x = randn(6, 2 * 3, dtype=torch.float64).requires_grad_()
    codebooks = randn(2, 3, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c: protokernels.dw_nearest(x, c)[0], (x, codebooks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_ids)
def test_gradients_match_float64(backend, dtype):
    x, codebooks = randn(90, 3 * 21, dtype=dtype), randn(3, 13, 21, dtype=dtype)
    g = randn(90, 3)
    xg, cg = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
    dist, idx = protokernels.dw_nearest(xg, cg)
    dist.backward(g)
    xr, cr = x.double().requires_grad_(), codebooks.double().requires_grad_()
    truth(by_group(xr, 3), cr).gather(-1, idx.t()[..., None])[..., 0].t().backward(g.double())
    assert relative_error(xg.grad, xr.grad) <= tolerance(dtype)
    assert relative_error(cg.grad, cr.grad) <= tolerance(dtype)


def test_opcheck(backend):
    x, codebooks = randn(9, 12).requires_grad_(), randn(3, 7, 4).requires_grad_()
    torch.library.opcheck(torch.ops.protokernels.dw_nearest.default,
                          (x, codebooks, "ieee", backend))


def test_compile_fullgraph(backend):
    def model(x, codebooks):
        dist, idx = protokernels.dw_nearest(x * 2, codebooks)
        return dist.sum() + idx.sum()

    x, codebooks = randn(21, 12), randn(3, 10, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(x, codebooks), model(x, codebooks)) <= 1e-6


BAD_INPUTS = [
    (lambda: dict(x=randn(4, 12), codebooks=randn(3, 5, 5)), ValueError,
     r"last dimension of 'x' must be G\*Dg = 3\*5 = 15"),
    (lambda: dict(x=randn(4, 12), codebooks=randn(12, 5)), ValueError,
     "'codebooks' must be 3-D"),
    (lambda: dict(x=randn(4, 12), codebooks=randn(3, 0, 4)), ValueError, r"no codes \(K = 0\)"),
    (lambda: dict(x=torch.ones(4, 12, dtype=torch.int64), codebooks=randn(3, 5, 4)), TypeError,
     "'x' must be a floating"),
    (lambda: dict(x=randn(4, 12), codebooks=randn(3, 5, 4).double()), TypeError,
     "same dtype"),
    (lambda: dict(x=randn(4, 12).to("meta"), codebooks=randn(3, 5, 4)), ValueError,
     "same device"),
    (lambda: dict(x=randn(4, 12), codebooks=randn(3, 5, 4), precision="fast"), ValueError,
     "precision must be one of"),
]


@pytest.mark.parametrize("op", ["dw_nearest", "dw_quantize"])
@pytest.mark.parametrize("make,error,message", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(op, make, error, message):
    with pytest.raises(error, match=message):
        getattr(protokernels, op)(**make())


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("op", ["dw_nearest", "dw_quantize"])
def test_cuda_graph_capture(backend, op):
    search = getattr(protokernels, op)
    x, codebooks = randn(300, 64), randn(4, 200, 16)
    search(x, codebooks)  # warm up (compiles the Triton kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = search(x, codebooks, precision="ieee")
    x.copy_(randn(300, 64))
    graph.replay()
    if op == "dw_quantize":
        quantized, idx, dist = out
        assert_quantized(x, codebooks, quantized, idx, dist)
    else:
        assert_groups(x, codebooks, *out)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_more_than_2_to_the_31_elements(backend):
    n, groups, depth = 4_200_000, 8, 64  # x holds 2.15e9 elements: offsets pass 2**31
    x = torch.randn(n, groups * depth, device=DEVICE, dtype=torch.float16)
    codebooks = randn(groups, 3, depth, dtype=torch.float16)
    x[-1, -depth:] = codebooks[-1, 2]  # the last slice of the last row is an exact code
    dist, idx = protokernels.dw_nearest(x, codebooks)
    assert idx[-1, -1] == 2 and dist[-1, -1] == 0
    rows = torch.tensor([0, 1, n // 2, n - 1], device=DEVICE)
    assert_groups(x[rows], codebooks, dist[rows], idx[rows], dtype=torch.float16)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_cuda_tensor_core_search_by_group(precision, portable):
    """CUDA's Hopper search reads the groups' slices of x through one TMA map (group stride Dg,
    row stride G*Dg), with split products at "tf32x3"; PROTOKERNELS_CUDA_PORTABLE=1 forces the
    portable search. 1256 row blocks (group, 128 rows) of 3 column tiles: several waves."""
    x, codebooks = randn(20000, 8 * 64), randn(8, 300, 64)
    with protokernels.use_backend("cuda"):
        quantized, idx, dist = protokernels.dw_quantize(x, codebooks, precision=precision)
        kernels = cuda_kernels_run(
            lambda: protokernels.dw_nearest(x, codebooks, precision=precision))
    assert_quantized(x, codebooks, quantized, idx, dist, precision=precision)
    assert_ran(kernels, "hopper_search_kernel", hopper_build() and not portable)


def test_cuda_hopper_search_writes_quantized_rows(portable):
    """The Hopper search of one column split writes the winning codes itself (csrc/nearest.cu,
    write_winners): one group of 6 elements at a stride of 8 (TMA reads 16-byte rows; the depth
    ends inside a 16-byte chunk), into quantized rows of 24 bytes (stored element by element)."""
    x, codebooks = randn(1000, 8)[:, :6], randn(1, 50, 8)[..., :6]
    with protokernels.use_backend("cuda"):
        quantized, idx, dist = protokernels.dw_quantize(x, codebooks, precision="tf32")
        kernels = cuda_kernels_run(
            lambda: protokernels.dw_quantize(x, codebooks, precision="tf32"))
    assert_quantized(x, codebooks, quantized, idx, dist, precision="tf32")
    hopper = hopper_build() and not portable
    assert_ran(kernels, "hopper_search_kernel", hopper)
    assert_ran(kernels, "pair_distance_kernel", not hopper)


# -- dw_quantize: dw_nearest + codebook_lookup in one call --------------------------------------

def assert_quantized(x, codebooks, quantized, idx, dist, dtype=torch.float32, precision="ieee"):
    """idx and dist judged as dw_nearest's, quantized exactly the chosen codes."""
    assert_groups(x, codebooks, dist, idx, dtype=dtype, precision=precision)
    groups = codebooks.shape[0]
    codes = codebooks[torch.arange(groups, device=idx.device), idx.reshape(-1, groups)]
    assert quantized.shape == x.shape and quantized.dtype == codebooks.dtype
    assert torch.equal(quantized.reshape(-1, groups, codebooks.shape[2]), codes)


def test_dw_quantize_batch_dimensions_and_strided_inputs(backend):
    x = randn(2, 3, 24, 7).transpose(-1, -2)[:, ::2]  # (2, 2, 7, 24), non-contiguous
    codebooks = randn(4, 6, 11).transpose(1, 2)  # (4, 11, 6), non-contiguous
    quantized, idx, dist = protokernels.dw_quantize(x, codebooks)
    assert idx.shape == (2, 2, 7, 4) and quantized.shape == x.shape
    assert_quantized(x, codebooks, quantized, idx, dist)
    quantized, idx, dist = protokernels.dw_quantize(randn(1, 24).expand(5, 24), codebooks)
    assert (quantized == quantized[:1]).all()
    quantized, idx, dist = protokernels.dw_quantize(randn(24), codebooks)  # one vector
    assert quantized.shape == (24,) and idx.shape == dist.shape == (4,)


def test_dw_quantize_nan_slice(backend):
    """A NaN slice ranks every code first (torch.argmin's rule): code 0 and a NaN distance, in
    its group only; the other groups are quantized as usual."""
    x, codebooks = randn(6, 3 * 5), randn(3, 9, 5)
    x[2, 7] = float("nan")  # group 1 of row 2
    quantized, idx, dist = protokernels.dw_quantize(x, codebooks)
    assert dist[2, 1].isnan() and dist.isnan().sum() == 1 and idx[2, 1] == 0
    assert torch.equal(quantized[2, 5:10], codebooks[1, 0]) and not quantized.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_ids)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("outputs", ["both", "quantized", "dist"])
def test_dw_quantize_gradients_match_float64(monkeypatch, backend, dtype, deterministic, outputs):
    """Each output's gradient as its two-call form's: dist's reaches x and the winning codes,
    quantized's is scatter-added into the chosen codes. An unused output runs no gradient op."""
    from protokernels.ops import dw_nearest as module
    if outputs == "dist":
        monkeypatch.setattr(module, "codes_gradient", None)  # calling it would raise
    if outputs == "quantized":
        monkeypatch.setattr(module, "pair_grads", None)
    x, codebooks = randn(90, 3 * 21, dtype=dtype), randn(3, 13, 21, dtype=dtype)
    g_quantized, g_dist = randn(90, 3 * 21), randn(90, 3)
    xg, cg = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
    quantized, idx, dist = protokernels.dw_quantize(xg, cg, deterministic=deterministic)
    use_q, use_d = outputs in ("both", "quantized"), outputs in ("both", "dist")
    torch.autograd.backward([t for t, use in ((quantized, use_q), (dist, use_d)) if use],
                            [g for g, use in ((g_quantized.to(dtype), use_q), (g_dist, use_d))
                             if use])
    xr, cr = x.double().requires_grad_(), codebooks.double().requires_grad_()
    loss = 0
    if use_d:
        ref_dist = truth(by_group(xr, 3), cr).gather(-1, idx.t()[..., None])[..., 0].t()
        loss = loss + (ref_dist * g_dist.double()).sum()
    if use_q:
        ref_q = cr[torch.arange(3, device=idx.device), idx].reshape(90, -1)
        loss = loss + (ref_q * g_quantized.to(dtype).double()).sum()
    loss.backward()
    if use_d:
        assert relative_error(xg.grad, xr.grad) <= tolerance(dtype)
    else:
        assert xg.grad is None
    assert relative_error(cg.grad, cr.grad) <= tolerance(dtype)


def test_dw_quantize_gradcheck_float64(backend):
    skip_unless_capable(backend, "dw_quantize", torch.float64)
    x = randn(6, 2 * 3, dtype=torch.float64).requires_grad_()
    codebooks = randn(2, 3, 3, dtype=torch.float64).requires_grad_()

    def both(x, c):
        quantized, _, dist = protokernels.dw_quantize(x, c)
        return quantized, dist
    assert torch.autograd.gradcheck(both, (x, codebooks))


def test_dw_quantize_opcheck(backend):
    x, codebooks = randn(9, 12).requires_grad_(), randn(3, 7, 4).requires_grad_()
    scatter = "reference" if backend == "reference" else "triton"
    torch.library.opcheck(torch.ops.protokernels.dw_quantize.default,
                          (x, codebooks, "ieee", False, backend, scatter))


@pytest.mark.parametrize("use", ["quantized", "dist"])
def test_dw_quantize_compile_fullgraph(backend, use):
    def model(x, codebooks):
        quantized, idx, dist = protokernels.dw_quantize(x * 2, codebooks)
        return (quantized.sum() if use == "quantized" else dist.sum()) + idx.sum()

    x, codebooks = randn(21, 12), randn(3, 10, 4).requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_GPU else "inductor")
    out = compiled(x, codebooks)
    out.backward()
    grad, codebooks.grad = codebooks.grad, None
    expected = model(x, codebooks)
    expected.backward()
    assert relative_error(out, expected) <= 1e-6
    assert relative_error(grad, codebooks.grad) <= 1e-6


@pytest.mark.parametrize("x_shape,books_shape", [((0, 12), (3, 5, 4)), ((4, 0), (2, 5, 0)),
                                                 ((4, 0), (0, 5, 7))], ids=str)
def test_dw_quantize_empty(backend, x_shape, books_shape):
    x, codebooks = randn(*x_shape).requires_grad_(), randn(*books_shape).requires_grad_()
    quantized, idx, dist = protokernels.dw_quantize(x, codebooks)
    assert quantized.shape == x.shape and idx.shape == (x_shape[0], books_shape[0])
    (quantized.sum() + dist.sum()).backward()
    assert (codebooks.grad == 0).all()


# Run in a child process, so that a crash fails this test alone: on the H100 machine an extension
# built by its default CC/CXX (a g++ wrapper in /opt/gcc) ended the process with a segmentation
# fault at any failing check; built with the system g++ it raises (RESULTS.md "One call for the
# VQ step").
@pytest.mark.skipif(not protokernels.available_backends()["cuda"].available,
                    reason="needs the CUDA extension and a GPU")
@pytest.mark.parametrize("call", [
    ("torch.ops.protokernels.dw_nearest_cuda(torch.randn(2, 3, 4, device='cuda'), "
     "torch.randn(1, 5, 4, device='cuda'), 'ieee', True)", r"dw_nearest_cuda: argument 'x' must be 2-D"),
    ("torch.ops.protokernels.dw_nearest_cuda(torch.randn(2, 7, device='cuda'), "
     "torch.randn(2, 5, 4, device='cuda'), 'ieee', True)", r"dw_nearest_cuda: x must be \(N, G\*Dg\)"),
], ids=["rank", "features"])
def test_cuda_op_checks_its_arguments(call):
    """A direct call of the CUDA operator with bad arguments raises an error naming the op and
    the argument."""
    code = ("import torch, protokernels\nprotokernels.available_backends()\ntry:\n    "
            f"{call[0]}\nexcept RuntimeError as error:\n    print('raised:', error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(call[1], done.stdout), done.stdout
