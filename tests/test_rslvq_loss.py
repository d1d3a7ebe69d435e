"""rslvq_loss in every backend against float64 ground truth (values and gradients of every
reduction, awkward sizes, several programs of the epilogue's sum, extreme sigma), its edge cases
(samples left out, NaN, empty), determinism, registration and bad input."""
import math

import pytest
import torch

import protokernels
from conftest import (DEVICE, HAS_GPU, check_loss, labelled_data as data, relative_error,
                      skip_unless_capable, tolerance)

REDUCTIONS = ["none", "sum", "mean"]


def truth(x, labels, protos, plabels, sigma, reduction, grad):
    """float64 loss and (x, protos) gradients of the loss contracted with `grad`."""
    x = x.detach().double().requires_grad_()
    protos = protos.detach().double().requires_grad_()
    logits = -(x[:, None] - protos[None]).square().sum(-1) / (2 * sigma ** 2)
    same = labels[:, None] == plabels[None]
    counted = same.any(1)
    correct = torch.logsumexp(logits.masked_fill(~same, -math.inf), 1)
    values = torch.where(counted, torch.logsumexp(logits, 1) - torch.where(counted, correct, 0),
                         0.0)
    loss = {"none": values, "sum": values.sum(),
            "mean": values.sum() / counted.sum().clamp_min(1)}[reduction]
    loss.backward(grad.double())
    return loss.detach(), x.grad, protos.grad


def check(backend, x, labels, protos, plabels, sigma=1.0, reduction="mean", dtype=torch.float32,
          bound=None):
    skip_unless_capable(backend, "rslvq_loss", dtype)
    check_loss(lambda xs, ps: protokernels.rslvq_loss(xs, labels, ps, plabels, sigma=sigma,
                                                      reduction=reduction, precision="ieee"),
               lambda grad: truth(x, labels, protos, plabels, sigma, reduction, grad),
               (x, protos), bound or tolerance(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sigma", [0.7, 3.0])
def test_matches_float64(backend, reduction, sigma):
    check(backend, *data(300, 23, 9, 4), sigma=sigma, reduction=reduction)


# (N, M, D, classes): one sample; one prototype; primes; M over one block of the epilogue
# (1024 columns); N over one block of the sum's partials (1024 programs); wide features.
SHAPES = [(1, 1, 1, 1), (7, 3, 2, 1), (17, 13, 5, 3), (5, 1500, 4, 7), (1100, 5, 3, 2),
          (20, 11, 1100, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sizes(backend, shape, reduction):
    check(backend, *data(*shape), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    # half types: the distances come back in the inputs' dtype (sqdist's), so their rounding
    # (~4e-3 relative in bfloat16) moves the likelihood ratio by about as much
    check(backend, *data(200, 17, 12, 3, dtype=dtype), sigma=3.0, dtype=dtype,
          bound=5e-2 if dtype in (torch.float16, torch.bfloat16) else None)


def test_extreme_sigma_stays_finite(backend):
    x, labels, protos, plabels = data(60, 9, 6, 3)
    for sigma in (0.02, 1e3):
        xs = x.clone().requires_grad_()
        loss = protokernels.rslvq_loss(xs, labels, protos, plabels, sigma=sigma)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xs.grad).all()


def test_gradcheck_float64():
    x, labels, protos, plabels = data(12, 7, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: protokernels.rslvq_loss(a, labels, b, plabels, sigma=1.5),
        (x.clone().requires_grad_(), protos.clone().requires_grad_()))


def test_left_out_and_nan(backend):
    x, labels, protos, plabels = data(40, 9, 6, 3)
    labels[:5] = 7
    xs = x.clone().requires_grad_()
    values = protokernels.rslvq_loss(xs, labels, protos, plabels, reduction="none")
    values.sum().backward()
    assert torch.isfinite(values).all() and (values[:5] == 0).all() and (xs.grad[:5] == 0).all()
    mean = protokernels.rslvq_loss(x, labels, protos, plabels)
    assert relative_error(mean, values[labels < 3].mean()) <= 1e-6
    assert protokernels.rslvq_loss(x, torch.full_like(labels, 9), protos, plabels).item() == 0
    labels[3] = 0
    x[3, 1] = math.nan
    values = protokernels.rslvq_loss(x, labels, protos, plabels, reduction="none")
    assert values[3].isnan() and torch.isfinite(values[torch.arange(40) != 3]).all()


@pytest.mark.parametrize("n,m,d", [(0, 5, 4), (6, 0, 4), (6, 5, 0)])
def test_empty(backend, n, m, d):
    x, labels, protos, plabels = data(n, m, d, 2)
    xs, ps = x.clone().requires_grad_(), protos.clone().requires_grad_()
    loss = protokernels.rslvq_loss(xs, labels, ps, plabels)
    loss.backward()
    assert torch.isfinite(loss) and (xs.grad == 0).all() and (ps.grad == 0).all()


def test_sum_is_deterministic(backend):
    # several blocks of partials on the GPU; Triton's CPU interpreter runs programs in turn
    x, labels, protos, plabels = data(3000 if HAS_GPU else 100, 16, 8, 5)
    first = protokernels.rslvq_loss(x, labels, protos, plabels, reduction="sum")
    assert all(torch.equal(first, protokernels.rslvq_loss(x, labels, protos, plabels,
                                                          reduction="sum")) for _ in range(3))


def test_opcheck(backend):
    x, labels, protos, plabels = data(30, 7, 5, 3)
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.protokernels.rslvq_loss.default,
                              (x.clone().requires_grad_(), protos.clone().requires_grad_(),
                               labels, plabels, 1.3, reduction, "ieee", backend))


def test_compile_fullgraph(backend):
    x, labels, protos, plabels = data(64, 10, 8, 3)

    def step(a, b):
        return protokernels.rslvq_loss(a * 2, labels, b, plabels, sigma=2.0) + a.sum()

    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(x, protos), step(x, protos)) <= 1e-6


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    x, labels, protos, plabels = data(2000, 40, 32, 4)
    protokernels.rslvq_loss(x, labels, protos, plabels, sigma=4.0)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = protokernels.rslvq_loss(x, labels, protos, plabels, sigma=4.0, precision="ieee")
    x.copy_(data(2000, 40, 32, 4, seed=1)[0])
    graph.replay()
    want = truth(x, labels, protos, plabels, 4.0, "mean", torch.ones((), device=DEVICE))[0]
    assert relative_error(loss, want) <= 1e-5


@pytest.mark.parametrize("changes,error,message", [
    (dict(reduction="avg"), ValueError, "'reduction' must be one of"),
    (dict(sigma=-1.0), ValueError, "'sigma' must be a finite number > 0"),
    (dict(x=torch.ones(6, 3, dtype=torch.int64)), TypeError, "'x' must be a 2-D floating"),
    (dict(labels=torch.zeros(6)), TypeError, "'labels' must be a 1-D integer"),
    (dict(prototypes=torch.randn(4, 5)), ValueError, "same feature size"),
])
def test_bad_input(changes, error, message):
    x, labels, protos, plabels = data(6, 4, 3, 2)
    args = dict(x=x, labels=labels, prototypes=protos, prototype_labels=plabels)
    options = {k: changes.pop(k) for k in ("sigma", "reduction") if k in changes}
    args.update({name: t.to(DEVICE) for name, t in changes.items()})
    with pytest.raises(error, match=message):
        protokernels.rslvq_loss(*args.values(), **options)
