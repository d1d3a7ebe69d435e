"""sinkhorn_prototype_loss in every backend against its definition in float64 (normalize, product,
the sinkhorn op's codes, the codes' cross-entropy; gradients through the normalizations, also
from a second use of the scores), awkward sizes, edge cases, registration and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import protokernels
from conftest import DEVICE, HAS_GPU, relative_error, tolerance


def data(b, k, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64).to(DEVICE, dtype),
            torch.randn(k, d, generator=g, dtype=torch.float64).to(DEVICE, dtype))


def definition(z, p, codes, temperature, normalize):
    """(loss, scores) by the formulas, with the codes as constants."""
    if normalize:
        z, p = F.normalize(z, dim=1), F.normalize(p, dim=1)
    scores = z @ p.t()
    loss = -(codes * F.log_softmax(scores / temperature, dim=1)).sum(1).mean()
    return loss, scores


def check(z, p, temperature=0.1, eps=0.05, n_iters=3, normalize=True, bound=None):
    """Values and gradients (of the loss plus a second use of the scores) against float64."""
    bound = bound or tolerance(z.dtype)
    zs, ps = z.clone().requires_grad_(), p.clone().requires_grad_()
    loss, codes, scores = protokernels.sinkhorn_prototype_loss(
        zs, ps, temperature=temperature, eps=eps, n_iters=n_iters, normalize=normalize)
    assert loss.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert codes.dtype == scores.dtype == z.dtype and codes.grad_fn is None
    mix = torch.randn(scores.shape, device=DEVICE, dtype=torch.float64)
    (loss + (scores * mix.to(scores.dtype)).sum() * 0.01).backward()
    z64, p64 = z.double().requires_grad_(), p.double().requires_grad_()
    want_loss, want_scores = definition(z64, p64, codes.double(), temperature, normalize)
    (want_loss + (want_scores * mix).sum() * 0.01).backward()
    assert relative_error(scores, want_scores) <= bound
    assert relative_error(codes, protokernels.sinkhorn(want_scores.detach().to(z.dtype), eps=eps,
                                                       n_iters=n_iters)) <= 10 * bound
    assert relative_error(loss, want_loss) <= bound
    for ours, want in ((zs.grad, z64.grad), (ps.grad, p64.grad)):
        if want.norm() < 1e-12:  # normalized 1-D rows are constant (+-1): no gradient
            assert ours.norm() < 1e-6
        else:
            assert relative_error(ours, want) <= 10 * bound


# (B, K, D): one sample and prototype; primes; K over one block of the row kernel (1024); B over
# one block of the sum's partials (1024 rows); one feature; wide features.
SHAPES = [(1, 1, 3), (7, 3, 2), (37, 13, 5), (20, 1500, 8), (1100, 5, 4), (30, 7, 1),
          (12, 9, 700)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64(backend, shape, normalize):
    check(*data(*shape), normalize=normalize, temperature=0.1 if normalize else 3.0,
          eps=0.05 if normalize else 5.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    # half types: scores, codes and gradients come back in the inputs' dtype (2^-9 relative in
    # bfloat16), and the temperature scales the scores' rounding by 10
    check(*data(64, 10, 16, dtype=dtype), bound=5e-2 if dtype != torch.float64 else None)


def test_zero_rows_follow_f_normalize(backend):
    z, p = data(9, 4, 5, dtype=torch.float64)
    z[3] = 0
    p[1] = 0
    check(z, p)


def test_empty(backend):
    for b, k in ((0, 4), (5, 0)):
        z, p = data(b, k, 3)
        zs, ps = z.clone().requires_grad_(), p.clone().requires_grad_()
        loss, codes, scores = protokernels.sinkhorn_prototype_loss(zs, ps)
        loss.backward()
        assert loss.item() == 0 and codes.shape == scores.shape == (b, k)
        assert (zs.grad == 0).all() and (ps.grad == 0).all()


def test_nan_propagates(backend):
    z, p = data(16, 5, 4)
    z[2, 0] = math.nan
    assert protokernels.sinkhorn_prototype_loss(z, p)[0].isnan()


@pytest.mark.parametrize("layout", ["contiguous", "column_major"])
def test_opcheck(backend, layout):
    z, p = data(24, 6, 5)
    if layout == "column_major":  # the outputs' strides must still be the fake's
        z, p = z.t().contiguous().t(), p.t().contiguous().t()
    for normalize in (True, False):
        torch.library.opcheck(torch.ops.protokernels.sinkhorn_prototype_loss.default,
                              (z.clone().requires_grad_(), p.clone().requires_grad_(), 0.1, 0.05,
                               3, normalize, backend))
        # the backward's op: the products' and the normalizations' gradients
        _, _, scores, _, _, z_unit, p_unit, z_norm, p_norm = \
            torch.ops.protokernels.sinkhorn_prototype_loss.default(z, p, 0.1, 0.05, 3, normalize,
                                                                   backend)
        operands = (z_unit, p_unit) if normalize else (z, p)
        torch.library.opcheck(torch.ops.protokernels.sinkhorn_prototype_loss_grad.default,
                              (torch.randn_like(scores), *operands, z_norm, p_norm, normalize,
                               backend))


def test_unit_rows_of_strided_inputs_and_wide_rows(backend):
    """The normalizations' kernels read any strides and loop over rows wider than one block
    (1024 features in Triton, 32 lanes in CUDA); rows of zero norm get F.normalize's zeros."""
    z, p = data(9, 5, 1250)
    z[4] = 0
    z, p = z.t().contiguous().t(), p.t().contiguous().t()  # column-major (clone keeps it)
    assert z.stride() == (1, 9) and p.clone().stride() == (1, 5)
    check(z, p)


def test_compile_fullgraph(backend):
    z, p = data(64, 10, 8)

    def step(a, b):
        loss, _, scores = protokernels.sinkhorn_prototype_loss(a * 2, b)
        return loss + scores.sum()

    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(z, p), step(z, p)) <= 1e-5


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    z, p = data(512, 300, 32)
    protokernels.sinkhorn_prototype_loss(z, p)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, codes, _ = protokernels.sinkhorn_prototype_loss(z, p)
    z.copy_(data(512, 300, 32, seed=1)[0])
    graph.replay()
    want, _ = definition(z.double(), p.double(), codes.double(), 0.1, True)
    assert relative_error(loss, want) <= 1e-5


@pytest.mark.parametrize("changes,error,message", [
    (dict(temperature=0.0), ValueError, "'temperature' must be a finite number > 0"),
    (dict(eps=-1.0), ValueError, "'eps' must be a finite number > 0"),
    (dict(n_iters=0), ValueError, "'n_iters' must be a positive int"),
    (dict(normalize=1), TypeError, "'normalize' must be a bool"),
    (dict(z=torch.ones(6, 3, dtype=torch.int64)), TypeError, "'z' must be a floating-point"),
    (dict(z=torch.ones(6)), ValueError, "'z' must be 2-D"),
    (dict(prototypes=torch.randn(4, 5)), ValueError, "same feature size"),
])
def test_bad_input(changes, error, message):
    z, p = data(6, 4, 3)
    args = dict(z=z, prototypes=p)
    options = {k: changes.pop(k) for k in ("temperature", "eps", "n_iters", "normalize")
               if k in changes}
    args.update({name: t.to(DEVICE) for name, t in changes.items()})
    with pytest.raises(error, match=message):
        protokernels.sinkhorn_prototype_loss(*args.values(), **options)
