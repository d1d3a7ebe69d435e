"""codebook_lookup in every backend: the gather against indexing, its scatter-add backward
(atomic and deterministic) against float64, double backward, registration, bad input."""
import pytest
import torch

import protokernels
from conftest import DEVICE, HAS_GPU, relative_error, tolerance
from test_nearest import _on_device, dtype_ids, randn


def codes(n, groups, size):
    return torch.randint(0, size, (n, groups), device=DEVICE)


def gathered(idx, codebooks):
    """Ground truth by advanced indexing: (..., G*Dg)."""
    groups = codebooks.shape[0]
    return codebooks[torch.arange(groups, device=DEVICE), idx].flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=dtype_ids)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (37, 3, 13, 7), (130, 2, 5, 129),
                                   (3, 1, 40, 1025)], ids=str)  # (N, G, K, Dg)
def test_lookup_gathers_the_codes(backend, shape, dtype):
    n, groups, size, depth = shape
    codebooks, idx = randn(groups, size, depth, dtype=dtype), codes(n, groups, size)
    out = protokernels.codebook_lookup(idx, codebooks)
    assert out.dtype == dtype and torch.equal(out, gathered(idx, codebooks))


def test_batch_dimensions_strided_codebooks_and_int32_indices(backend):
    codebooks = randn(4, 6, 11).transpose(1, 2)  # (4, 11, 6), non-contiguous
    idx = torch.randint(0, 11, (2, 5, 4), device=DEVICE, dtype=torch.int32)
    out = protokernels.codebook_lookup(idx.transpose(0, 1), codebooks)
    assert out.shape == (5, 2, 24)
    assert torch.equal(out, gathered(idx.transpose(0, 1).long(), codebooks))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_ids)
def test_backward_scatter_adds_into_the_codes(backend, dtype, deterministic):
    codebooks = randn(3, 7, 19, dtype=dtype).requires_grad_()
    idx = codes(300, 3, 7)  # ~43 rows per code: many adds into each
    idx[:, 2] = 4  # every row of group 2 chose code 4
    grad = randn(300, 3 * 19, dtype=dtype)
    protokernels.codebook_lookup(idx, codebooks, deterministic=deterministic).backward(grad)
    ref = torch.zeros(3 * 7, 19, dtype=torch.float64, device=DEVICE)
    flat = (idx + torch.arange(3, device=DEVICE) * 7).flatten()
    ref.index_add_(0, flat, grad.double().view(-1, 19))
    assert codebooks.grad.dtype == dtype
    assert relative_error(codebooks.grad, ref.view(3, 7, 19)) <= tolerance(dtype)


def test_deterministic_backward_is_bitwise_reproducible(backend):
    codebooks = randn(2, 5, 33).requires_grad_()
    idx, grad = codes(5000, 2, 5), randn(5000, 66)
    grads = []
    for _ in range(3):
        codebooks.grad = None
        protokernels.codebook_lookup(idx, codebooks, deterministic=True).backward(grad)
        grads.append(codebooks.grad.clone())
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_gradcheck_and_gradgradcheck_float64(backend):
    codebooks = randn(2, 3, 4, dtype=torch.float64).requires_grad_()
    idx = codes(7, 2, 3)
    lookup = lambda c: protokernels.codebook_lookup(idx, c)  # noqa: E731
    assert torch.autograd.gradcheck(lookup, (codebooks,))
    assert torch.autograd.gradgradcheck(lookup, (codebooks,))


def test_empty(backend):
    codebooks = randn(3, 5, 4).requires_grad_()
    out = protokernels.codebook_lookup(torch.zeros(0, 3, dtype=torch.int64, device=DEVICE),
                                       codebooks)
    assert out.shape == (0, 12)
    out.sum().backward()
    assert (codebooks.grad == 0).all()


def test_opcheck(backend):
    codebooks = randn(3, 7, 4).requires_grad_()
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.protokernels.codebook_lookup.default,
                              (codes(9, 3, 7), codebooks, deterministic, backend))


def test_compile_fullgraph(backend):
    def model(idx, codebooks):
        return protokernels.codebook_lookup(idx, codebooks * 2).square().sum()

    idx, codebooks = codes(21, 3, 10), randn(3, 10, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(idx, codebooks), model(idx, codebooks)) <= 1e-6


BAD_INPUTS = [
    (lambda: dict(idx=torch.tensor([[0, 5, 1]]), codebooks=randn(3, 5, 4)), ValueError,
     r"'idx' must hold code indices in \[0, 5\), got values from 0 to 5"),
    (lambda: dict(idx=torch.tensor([[0, -1, 1]]), codebooks=randn(3, 5, 4)), ValueError,
     "'idx' must hold code indices"),
    (lambda: dict(idx=torch.zeros(2, 3), codebooks=randn(3, 5, 4)), TypeError,
     "'idx' must be an integer tensor"),
    (lambda: dict(idx=torch.zeros(2, 4, dtype=torch.int64), codebooks=randn(3, 5, 4)),
     ValueError, r"'idx' must have shape \(\.\.\., G\) with G = 3"),
    (lambda: dict(idx=[[0, 1, 2]], codebooks=randn(3, 5, 4)), TypeError,
     "'idx' must be a torch.Tensor"),
    (lambda: dict(idx=torch.zeros(2, 3, dtype=torch.int64), codebooks=randn(15, 4)),
     ValueError, "'codebooks' must be 3-D"),
    (lambda: dict(idx=torch.zeros(2, 3, dtype=torch.int64), codebooks=randn(3, 0, 4)),
     ValueError, r"K = 0"),
    (lambda: dict(idx=torch.zeros(2, 3, dtype=torch.int64),
                  codebooks=torch.zeros(3, 5, 4, dtype=torch.int32)), TypeError,
     "'codebooks' must be a floating"),
    (lambda: dict(idx=torch.zeros(2, 3, dtype=torch.int64, device="meta"),
                  codebooks=randn(3, 5, 4)), ValueError, "'idx' must be on the same device"),
]


@pytest.mark.parametrize("make,error,message", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        protokernels.codebook_lookup(**_on_device(make()))


def test_no_groups_forward_and_backward(backend):
    codebooks = torch.randn(0, 1, 129, device=DEVICE, requires_grad=True)
    out = protokernels.codebook_lookup(torch.zeros(5, 0, dtype=torch.int64, device=DEVICE),
                                       codebooks)
    assert out.shape == (5, 0)
    out.sum().backward()
    assert codebooks.grad.shape == codebooks.shape


def test_indices_from_dw_nearest_need_no_range_check(backend):
    """dw_nearest's indices are known in range (no device sync to check them); modified in
    place, they are checked again."""
    x, codebooks = torch.randn(20, 6, device=DEVICE), torch.randn(2, 5, 3, device=DEVICE)
    _, idx = protokernels.dw_nearest(x, codebooks)
    assert protokernels._validate._known_in_range(idx, 5)
    assert not protokernels._validate._known_in_range(idx, 4)  # a smaller codebook: check
    out = protokernels.codebook_lookup(idx, codebooks)
    assert out.shape == (20, 6)
    idx[0, 0] = 7
    assert not protokernels._validate._known_in_range(idx, 5)
    with pytest.raises(ValueError, match="'idx' must hold code indices in"):
        protokernels.codebook_lookup(idx, codebooks)
