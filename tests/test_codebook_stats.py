"""codebook_stats in every backend against float64 (atomic and deterministic), reproducibility,
the gradient of the sums, registration, bad input."""
import pytest
import torch

import protokernels
from conftest import DEVICE, relative_error, tolerance
from test_codebook_lookup import codes
from test_nearest import _on_device, dtype_ids, randn


def truth(x, idx, size):
    """float64 counts and sums by index_add_ on the CPU."""
    groups = idx.shape[-1]
    depth = x.shape[-1] // groups
    flat = (idx.cpu() + torch.arange(groups) * size).flatten()
    counts = torch.zeros(groups * size, dtype=torch.int64).index_add_(
        0, flat, torch.ones_like(flat))
    sums = torch.zeros(groups * size, depth, dtype=torch.float64).index_add_(
        0, flat, x.cpu().double().reshape(-1, depth))
    return counts.view(groups, size), sums.view(groups, size, depth)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=dtype_ids)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (37, 3, 13, 7), (300, 2, 5, 129),
                                   (5, 1, 3, 1025)], ids=str)  # (N, G, K, Dg)
def test_stats_match_float64(backend, shape, dtype, deterministic):
    n, groups, size, depth = shape
    x, idx = randn(n, groups * depth, dtype=dtype), codes(n, groups, size)
    counts, sums = protokernels.codebook_stats(x, idx, size, deterministic=deterministic)
    ref_counts, ref_sums = truth(x, idx, size)
    assert counts.dtype == torch.int64 and torch.equal(counts.cpu(), ref_counts)
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_error(sums, ref_sums) <= tolerance(torch.float32 if dtype.itemsize == 2 else dtype)


def test_batch_dimensions_strided_x_and_unused_codes(backend):
    x = randn(2, 24, 5).transpose(1, 2)  # (2, 5, 24), non-contiguous
    idx = torch.randint(0, 3, (2, 5, 4), device=DEVICE, dtype=torch.int16)  # codes 3..9 unused
    counts, sums = protokernels.codebook_stats(x, idx, 10)
    ref_counts, ref_sums = truth(x.reshape(10, 24), idx.reshape(10, 4).long(), 10)
    assert torch.equal(counts.cpu(), ref_counts) and (counts[:, 3:] == 0).all()
    assert relative_error(sums, ref_sums) <= 1e-6 and (sums[:, 3:] == 0).all()


def test_deterministic_is_bitwise_reproducible(backend):
    x, idx = randn(5000, 2 * 33), codes(5000, 2, 4)
    idx[:, 1] = 2  # one code takes every row of group 1
    runs = [protokernels.codebook_stats(x, idx, 4, deterministic=True)[1] for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)


def test_zero_features_counts_only(backend):
    counts, sums = protokernels.codebook_stats(randn(6, 0), codes(6, 3, 2), 2)
    assert counts.sum() == 18 and sums.shape == (3, 2, 0)


def test_empty(backend):
    counts, sums = protokernels.codebook_stats(randn(0, 12), codes(0, 3, 5), 5)
    assert counts.shape == (3, 5) and sums.shape == (3, 5, 4)
    assert (counts == 0).all() and (sums == 0).all()


def test_gradcheck_float64(backend):
    x = randn(7, 2 * 3, dtype=torch.float64).requires_grad_()
    idx = codes(7, 2, 4)
    assert torch.autograd.gradcheck(lambda x: protokernels.codebook_stats(x, idx, 4)[1], (x,))


def test_opcheck(backend):
    x = randn(9, 12).requires_grad_()
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.protokernels.codebook_stats.default,
                              (x, codes(9, 3, 7), 7, deterministic, backend))


BAD_INPUTS = [
    (lambda: dict(x=randn(4, 12), idx=torch.zeros(4, 3, dtype=torch.int64), size=0), ValueError,
     r"'size' \(K, the number of codes\) must be positive, got 0"),
    (lambda: dict(x=randn(4, 12), idx=torch.zeros(4, 3, dtype=torch.int64), size=2.0), TypeError,
     "'size' .* must be an int"),
    (lambda: dict(x=randn(4, 12), idx=torch.tensor([[0, 1, 2]] * 4), size=2), ValueError,
     r"'idx' must hold code indices in \[0, 2\)"),
    (lambda: dict(x=randn(4, 12), idx=torch.zeros(4, 3), size=2), TypeError,
     "'idx' must be an integer tensor"),
    (lambda: dict(x=torch.ones(4, 12, dtype=torch.int64), idx=torch.zeros(4, 3, dtype=torch.int64),
                  size=2), TypeError, "'x' must be a floating"),
    (lambda: dict(x=randn(4, 12), idx=torch.zeros(4, 5, dtype=torch.int64), size=2), ValueError,
     "must split into G = 5 equal groups"),
    (lambda: dict(x=randn(4, 12), idx=torch.zeros(5, 3, dtype=torch.int64), size=2), ValueError,
     "same leading dimensions"),
    (lambda: dict(x=randn(4, 12), idx=torch.zeros(4, 3, dtype=torch.int64, device="meta"),
                  size=2), ValueError, "'idx' must be on the same device as 'x'"),
]


@pytest.mark.parametrize("make,error,message", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        protokernels.codebook_stats(**_on_device(make()))
