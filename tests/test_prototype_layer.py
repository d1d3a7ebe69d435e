"""protokernels.prototype_layer (distances, R1 and R2 from one distance kernel), nn.PrototypeLayer
(also R1/R2 from one nearest_both pass) and nn.CaseBasedLoss (eq. 7): every backend against
float64 formulas (values and gradients together), awkward sizes, ties, edge cases, registration,
bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import protokernels
from conftest import DEVICE, HAS_GPU, relative_error, skip_unless_capable, tolerance
from protokernels.nn import CaseBasedLoss, PrototypeLayer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_distances_and_regularizers(backend, dtype):
    skip_unless_capable(backend, "nearest_both", dtype)
    torch.manual_seed(0)
    layer = PrototypeLayer(6, 9).to(DEVICE, dtype)
    z = torch.randn(25, 6, device=DEVICE, dtype=dtype)
    d = torch.cdist(z.double(), layer.prototypes.double()).square()
    assert relative_error(layer(z), d) <= (1e-10 if dtype == torch.float64 else 1e-5)
    r1, r2 = layer.regularizers(z)
    assert relative_error(r1, d.min(0).values.mean()) <= 1e-5  # eq. 5: prototypes near inputs
    assert relative_error(r2, d.min(1).values.mean()) <= 1e-5  # eq. 6: inputs near prototypes
    if dtype == torch.float64:
        zs = z[:7].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a: torch.stack(layer.regularizers(a)), (zs,))
        r1, r2 = layer.regularizers(z)
        (r1 + 2 * r2).backward()
        p = layer.prototypes.detach().clone().requires_grad_()
        d = (z[:, None] - p[None]).square().sum(-1)
        (d.min(0).values.mean() + 2 * d.min(1).values.mean()).backward()
        assert relative_error(layer.prototypes.grad, p.grad) <= 1e-10


def test_with_regularizers_is_forward_and_regularizers(backend):
    torch.manual_seed(0)
    layer = PrototypeLayer(6, 9).to(DEVICE)
    z = torch.randn(30, 6, device=DEVICE)
    dist, r1, r2 = layer.with_regularizers(z)
    assert relative_error(dist, layer(z)) <= 1e-5
    assert all(relative_error(a, b) <= 1e-5 for a, b in zip((r1, r2), layer.regularizers(z)))


def test_case_based_loss_is_eq_7():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    x, reconstruction = torch.rand(8, 1, 5, 5), torch.rand(8, 1, 5, 5)
    r1, r2 = torch.tensor(0.7), torch.tensor(1.3)
    loss = CaseBasedLoss(0.1, 0.2, 0.3)(logits, labels, reconstruction, x, r1, r2)
    expected = (F.cross_entropy(logits, labels) + 0.1 * (reconstruction - x).square().sum((1, 2, 3))
                .mean() + 0.2 * r1 + 0.3 * r2)
    assert relative_error(loss, expected) <= 1e-6


def test_empty_batch_gives_zero_regularizers():
    layer = PrototypeLayer(3, 2).to(DEVICE)
    r1, r2 = layer.regularizers(torch.randn(0, 3, device=DEVICE))
    assert r1.item() == 0 and r2.item() == 0


@pytest.mark.parametrize("call,error,message", [
    (lambda: PrototypeLayer(0, 3), ValueError, "'dim' must be a positive int"),
    (lambda: PrototypeLayer(3, 2)(torch.randn(4, 5)), ValueError, "'z' must have 3 features"),
    (lambda: PrototypeLayer(3, 2)(torch.ones(4, 3, dtype=torch.int64)), TypeError,
     "'z' must be a 2-D floating-point"),
    (lambda: CaseBasedLoss(lambda_r1=-1), ValueError, "'lambda_r1' must be"),
    (lambda: CaseBasedLoss()(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64),
                             torch.randn(2, 4), torch.randn(2, 5), 0, 0), ValueError,
     "'reconstruction' must have x's shape"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# -- the op ------------------------------------------------------------------------------------

def data(n, m, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype),
            torch.randn(m, d, generator=g, dtype=torch.float64).to(DEVICE, dtype))


def definition(z, p):
    dist = (z[:, None] - p[None]).square().sum(-1)
    return dist, dist.min(0).values.mean(), dist.min(1).values.mean()


def check(z, p, bound=None):
    """Values, and the gradients of a mix of all three outputs, against float64."""
    bound = bound or tolerance(z.dtype)
    zs, ps = z.clone().requires_grad_(), p.clone().requires_grad_()
    ours = protokernels.prototype_layer(zs, ps, precision="ieee")
    assert all(t.dtype == z.dtype for t in ours)
    mix = torch.randn(ours[0].shape, device=DEVICE, dtype=torch.float64)
    (ours[1] * 0.7 + ours[2] * 1.3 + (ours[0] * mix.to(z.dtype)).sum() * 0.01).backward()
    z64, p64 = z.double().requires_grad_(), p.double().requires_grad_()
    want = definition(z64, p64)
    (want[1] * 0.7 + want[2] * 1.3 + (want[0] * mix).sum() * 0.01).backward()
    for got, expected in zip(ours, want):
        assert relative_error(got, expected) <= bound
    assert relative_error(zs.grad, z64.grad) <= 10 * bound
    assert relative_error(ps.grad, p64.grad) <= 10 * bound


# (N, M, D): one input and prototype; primes; M past sqdist's tiles; N past them; wide features.
SHAPES = [(1, 1, 1), (7, 3, 2), (37, 13, 5), (20, 300, 8), (1100, 5, 4), (12, 9, 700)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, shape):
    check(*data(*shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    # half types: every output and gradient comes back in the inputs' dtype
    check(*data(40, 9, 12, dtype=dtype), bound=1e-2 if dtype != torch.float64 else None)


def test_ties_send_the_gradient_to_one_minimum(backend):
    z, p = data(6, 4, 3)
    p[2] = p[0]  # two equal prototypes: each input's R2 gradient goes to one of them
    ps = p.clone().requires_grad_()
    protokernels.prototype_layer(z, ps, precision="ieee")[2].backward()
    p64 = p.double().requires_grad_()
    definition(z.double(), p64)[2].backward()
    got, want = ps.grad.double().clone(), p64.grad.clone()
    for g in (got, want):  # the two copies' gradients together
        g[0] += g[2]
        g[2] = 0
    assert relative_error(got, want) <= 1e-5


def test_empty_batch_and_nan(backend):
    z, p = data(0, 4, 3)
    zs, ps = z.clone().requires_grad_(), p.clone().requires_grad_()
    dist, r1, r2 = protokernels.prototype_layer(zs, ps)
    (r1 + r2 + dist.sum()).backward()
    assert dist.shape == (0, 4) and r1.item() == 0 and r2.item() == 0 and (ps.grad == 0).all()
    z, p = data(8, 4, 3)
    z[5, 2] = math.nan
    _, r1, r2 = protokernels.prototype_layer(z, p)
    assert r1.isnan() and r2.isnan()


def test_opcheck(backend):
    z, p = data(24, 6, 5)
    torch.library.opcheck(torch.ops.protokernels.prototype_layer.default,
                          (z.clone().requires_grad_(), p.clone().requires_grad_(), "ieee",
                           backend))


def test_compile_fullgraph(backend):
    z, p = data(64, 10, 8)

    def step(a, b):
        dist, r1, r2 = protokernels.prototype_layer(a * 2, b, precision="ieee")
        return r1 + r2 + dist.sum()

    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(z, p), step(z, p)) <= 1e-5


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    z, p = data(1000, 50, 32)
    protokernels.prototype_layer(z, p)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, r1, r2 = protokernels.prototype_layer(z, p, precision="ieee")
    z.copy_(data(1000, 50, 32, seed=1)[0])
    graph.replay()
    _, want_r1, want_r2 = definition(z.double(), p.double())
    assert relative_error(r1, want_r1) <= 1e-5 and relative_error(r2, want_r2) <= 1e-5


@pytest.mark.parametrize("changes,error,message", [
    (dict(z=torch.ones(6, 3, dtype=torch.int64)), TypeError, "'z' must be a floating-point"),
    (dict(z=torch.ones(6)), ValueError, "'z' must be 2-D"),
    (dict(prototypes=torch.randn(4, 5)), ValueError, "same feature size"),
    (dict(prototypes=torch.randn(0, 3)), ValueError, "'prototypes' has no rows"),
])
def test_op_bad_input(changes, error, message):
    z, p = data(6, 4, 3)
    args = dict(z=z, prototypes=p)
    args.update({name: t.to(DEVICE) for name, t in changes.items()})
    with pytest.raises(error, match=message):
        protokernels.prototype_layer(*args.values())
