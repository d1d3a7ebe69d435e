"""dpnp_loss in every backend against eq. 10 written out in float64 (values and gradients, awkward
sizes, several programs of the epilogue's sum, ties between rivals), its edge cases (one
prototype, no samples, zero features, NaN), determinism, registration and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import protokernels
from conftest import (DEVICE, HAS_GPU, check_loss, relative_error, skip_unless_capable,
                      tolerance)

LAMBDAS = dict(lambda_pos=0.3, lambda_neg_sample=0.2, lambda_neg_class=0.1)


def data(n, m, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    c = torch.randn(m, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return h, torch.randint(0, max(m, 1), (n,), generator=g).to(DEVICE), c


def eq_10(h, labels, c, lambda_pos, lambda_neg_sample, lambda_neg_class, eps=1e-8):
    """DPNP's loss by its definition (float64 cdist, argmin's lowest index among equals)."""
    n, m = max(h.shape[0], 1), c.shape[0]
    loss = (F.cross_entropy(h @ c.t(), labels, reduction="sum") / n
            + lambda_pos / (2 * n) * (h - c[labels]).square().sum())
    if m > 1:
        half = lambda v: (torch.sqrt(v.abs() + eps) - math.sqrt(eps)).sum()  # noqa: E731
        rival = torch.cdist(h, c).square().scatter(1, labels[:, None], math.inf).argmin(1)
        neighbour = torch.cdist(c, c).square().fill_diagonal_(math.inf).argmin(1)
        loss = (loss - lambda_neg_sample / (2 * n) * half(h - c[rival])
                - lambda_neg_class / (2 * m) * half(c - c[neighbour]))
    return loss


def truth(h, labels, c, grad):
    h = h.detach().double().requires_grad_()
    c = c.detach().double().requires_grad_()
    loss = eq_10(h, labels, c, **LAMBDAS)
    loss.backward(grad.double())
    return loss.detach(), h.grad, c.grad


def check(backend, h, labels, c, dtype=torch.float32, bound=None):
    skip_unless_capable(backend, "dpnp_loss", dtype)
    check_loss(lambda hs, cs: protokernels.dpnp_loss(hs, labels, cs, **LAMBDAS),
               lambda grad: truth(h, labels, c, grad), (h, c), bound or tolerance(dtype))


# (N, M, D): one sample and prototype; one prototype (no rival); no samples (the prototypes' term
# alone); primes; M over one block of the row loops (1024 columns); N + M over one block of the
# sum's partials (1024 programs); wide features.
SHAPES = [(1, 1, 1), (6, 1, 3), (0, 4, 3), (7, 3, 2), (17, 13, 5), (40, 1500, 4), (1100, 5, 3),
          (20, 11, 1100)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, shape):
    check(backend, *data(*shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    # half types: the op computes in float32 from the rounded inputs, as the truth does in float64;
    # the gradients come back rounded to the inputs' dtype (2^-9 relative in bfloat16)
    check(backend, *data(60, 9, 12, dtype=dtype), dtype=dtype,
          bound=1e-3 if dtype != torch.float64 else None)


def test_ties_go_to_the_lowest_index(backend):
    h, labels, c = data(30, 6, 4)
    c[3] = c[1]  # rows 1 and 3 are the same prototype: every rival among them is row 1
    c[5] = c[2]
    check(backend, h, labels, c)


def test_strided_and_expanded_inputs(backend):
    skip_unless_capable(backend, "dpnp_loss", torch.float32)
    h, labels, c = data(13, 6, 20)
    # strided columns; one row expanded to all (stride 0)
    for hv, cv in ((h[:, ::4], c[:, 1::4]), (h[:1, :7].expand(13, 7), c[:, :7])):
        want = eq_10(hv.double(), labels, cv.double(), **LAMBDAS)
        assert relative_error(protokernels.dpnp_loss(hv, labels, cv, **LAMBDAS), want) <= 1e-5


def test_gradcheck_float64(backend):
    h, labels, c = data(9, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: protokernels.dpnp_loss(a, labels, b, **LAMBDAS),
                                    (h.clone().requires_grad_(), c.clone().requires_grad_()))


def test_zero_features_and_nan(backend):
    h, labels, c = data(8, 4, 0)
    hs, cs = h.clone().requires_grad_(), c.clone().requires_grad_()
    loss = protokernels.dpnp_loss(hs, labels, cs)
    loss.backward()
    assert relative_error(loss, torch.tensor(math.log(4), device=DEVICE)) <= 1e-6
    h, labels, c = data(8, 4, 3)
    h[2, 1] = math.nan
    assert protokernels.dpnp_loss(h, labels, c).isnan()


def test_sum_is_deterministic(backend):
    h, labels, c = data(3000 if HAS_GPU else 100, 16, 8)
    first = protokernels.dpnp_loss(h, labels, c)
    assert all(torch.equal(first, protokernels.dpnp_loss(h, labels, c)) for _ in range(3))


def test_opcheck(backend):
    h, labels, c = data(30, 7, 5)
    torch.library.opcheck(torch.ops.protokernels.dpnp_loss.default,
                          (h.clone().requires_grad_(), c.clone().requires_grad_(), labels, 0.3,
                           0.2, 0.1, 1e-8, backend))


def test_compile_fullgraph(backend):
    h, labels, c = data(64, 10, 8)

    def step(a, b):
        return protokernels.dpnp_loss(a * 2, labels, b) + a.sum()

    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(h, c), step(h, c)) <= 1e-6


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    h, labels, c = data(2000, 40, 32)
    protokernels.dpnp_loss(h, labels, c)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = protokernels.dpnp_loss(h, labels, c, **LAMBDAS)
    h.copy_(data(2000, 40, 32, seed=1)[0])
    graph.replay()
    assert relative_error(loss, eq_10(h.double(), labels, c.double(), **LAMBDAS)) <= 1e-5


@pytest.mark.parametrize("changes,error,message", [
    (dict(lambda_pos=-1.0), ValueError, "'lambda_pos' must be a finite number >= 0"),
    (dict(eps=0.0), ValueError, "'eps' must be a finite number > 0"),
    (dict(h=torch.ones(6, 3, dtype=torch.int64)), TypeError, "'h' must be a 2-D floating"),
    (dict(labels=torch.zeros(6)), TypeError, "'labels' must be a 1-D integer"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "'labels' must have 6 entries"),
    (dict(labels=torch.full((6,), 4)), ValueError,
     r"'labels' must hold class indices .* in \[0, 4\)"),
    (dict(prototypes=torch.randn(4, 5)), ValueError, "same feature size"),
    (dict(prototypes=torch.randn(0, 3)), ValueError, "'prototypes' has no rows"),
])
def test_bad_input(changes, error, message):
    h, labels, c = data(6, 4, 3)
    args = dict(h=h, labels=labels, prototypes=c)
    options = {k: changes.pop(k) for k in ("lambda_pos", "eps") if k in changes}
    args.update({name: t.to(DEVICE) for name, t in changes.items()})
    with pytest.raises(error, match=message):
        protokernels.dpnp_loss(*args.values(), **options)
