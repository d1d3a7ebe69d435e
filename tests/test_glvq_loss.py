"""glvq_loss in every backend against float64 ground truth (values and gradients of every
transfer and reduction, awkward sizes, several blocks of the epilogue), its edge cases (samples
left out, no rival, d+ = d- = 0, NaN, empty), determinism, registration and bad input."""
import math

import pytest
import torch

import protokernels
from conftest import (DEVICE, HAS_GPU, check_loss, labelled_data as data, relative_error,
                      skip_unless_capable, tolerance)

TRANSFERS = ["identity", "sigmoid", "swish"]
REDUCTIONS = ["none", "sum", "mean"]


def truth(x, labels, protos, plabels, transfer, beta, reduction, grad):
    """float64 loss and (x, protos) gradients of the loss contracted with `grad`."""
    x = x.detach().double().requires_grad_()
    protos = protos.detach().double().requires_grad_()
    d = (x[:, None] - protos[None]).square().sum(-1)
    same = labels[:, None] == plabels[None]
    counted, rival = same.any(1), (~same).any(1)
    d_plus = torch.where(counted, d.masked_fill(~same, math.inf).min(1).values, 0.0)
    d_minus = torch.where(rival, d.masked_fill(same, math.inf).min(1).values, 0.0)
    mu = torch.where(rival, (d_plus - d_minus) / (d_plus + d_minus), -1.0)
    if transfer == "sigmoid":
        mu = torch.sigmoid(beta * mu)
    elif transfer == "swish":
        mu = mu * torch.sigmoid(beta * mu)
    values = torch.where(counted, mu, 0.0)
    loss = {"none": values, "sum": values.sum(),
            "mean": values.sum() / counted.sum().clamp_min(1)}[reduction]
    loss.backward(grad.double())
    return loss.detach(), x.grad, protos.grad


def check(backend, x, labels, protos, plabels, transfer="sigmoid", beta=3.0, reduction="mean",
          dtype=torch.float32):
    skip_unless_capable(backend, "glvq_loss", dtype)
    check_loss(lambda xs, ps: protokernels.glvq_loss(xs, labels, ps, plabels, transfer=transfer,
                                                     beta=beta, reduction=reduction,
                                                     precision="ieee"),
               lambda grad: truth(x, labels, protos, plabels, transfer, beta, reduction, grad),
               (x, protos), tolerance(dtype))


@pytest.mark.parametrize("transfer", TRANSFERS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64(backend, transfer, reduction):
    check(backend, *data(300, 23, 9, 4), transfer=transfer, reduction=reduction)


# (N, M, D, classes): one sample; one class (no rival); primes; more rows than one block of the
# epilogue (1024) so that the partial sums of several blocks meet; wide features.
SHAPES = [(1, 1, 1, 1), (7, 3, 2, 1), (17, 13, 5, 3), (1025, 37, 33, 4), (2300, 11, 3, 2),
          (40, 29, 1100, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sizes(backend, shape, reduction):
    check(backend, *data(*shape), transfer="swish", reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    check(backend, *data(200, 17, 12, 3, dtype=dtype), dtype=dtype)


def test_gradcheck_float64():
    x, labels, protos, plabels = data(12, 7, 4, 3, dtype=torch.float64)
    for transfer in TRANSFERS:
        assert torch.autograd.gradcheck(
            lambda a, b: protokernels.glvq_loss(a, labels, b, plabels, transfer=transfer,
                                                beta=2.0),
            (x.clone().requires_grad_(), protos.clone().requires_grad_()))


def test_left_out_no_rival_and_coincident(backend):
    x, labels, protos, plabels = data(40, 9, 6, 3)
    labels[:5] = 7  # no prototype of class 7: left out, value 0, no gradient
    xs = x.clone().requires_grad_()
    values = protokernels.glvq_loss(xs, labels, protos, plabels, reduction="none")
    values.sum().backward()
    assert torch.isfinite(values).all() and (values[:5] == 0).all()
    assert (xs.grad[:5] == 0).all() and xs.grad[5:].abs().sum() > 0
    mean = protokernels.glvq_loss(x, labels, protos, plabels)
    assert relative_error(mean, values[labels < 3].mean()) <= 1e-6
    # one class only: no rival, mu = -1 and no gradient
    xs = x.clone().requires_grad_()
    one = protokernels.glvq_loss(xs, torch.zeros_like(labels), protos, torch.zeros_like(plabels),
                                 reduction="none")
    one.sum().backward()
    assert (one == -1).all() and (xs.grad == 0).all()
    # nothing counts: 0, not NaN
    assert protokernels.glvq_loss(x, torch.full_like(labels, 9), protos, plabels).item() == 0
    # d+ = d- = 0 (the sample on a prototype of each class): mu = 0, a finite gradient
    xs = torch.zeros(1, 3, device=DEVICE, requires_grad=True)
    value = protokernels.glvq_loss(xs, torch.zeros(1, dtype=torch.int64, device=DEVICE),
                                   torch.zeros(2, 3, device=DEVICE),
                                   torch.arange(2, device=DEVICE), transfer="sigmoid")
    value.backward()
    assert value.item() == 0.5 and torch.isfinite(xs.grad).all()


def test_nan_in_gives_nan_out(backend):
    x, labels, protos, plabels = data(50, 9, 6, 2)
    labels[3] = 0
    x[3, 2] = math.nan
    values = protokernels.glvq_loss(x, labels, protos, plabels, reduction="none")
    assert values[3].isnan() and torch.isfinite(values[torch.arange(50) != 3]).all()
    assert protokernels.glvq_loss(x, labels, protos, plabels).isnan()


def test_empty_batch(backend):
    x, labels, protos, plabels = data(0, 5, 4, 2)
    xs, ps = x.clone().requires_grad_(), protos.clone().requires_grad_()
    loss = protokernels.glvq_loss(xs, labels, ps, plabels)
    loss.backward()
    assert loss.item() == 0 and (ps.grad == 0).all()
    assert protokernels.glvq_loss(x, labels, protos, plabels, reduction="none").shape == (0,)


def test_sum_is_deterministic(backend):
    x, labels, protos, plabels = data(3000, 16, 8, 5)
    first = protokernels.glvq_loss(x, labels, protos, plabels, reduction="sum")
    assert all(torch.equal(first, protokernels.glvq_loss(x, labels, protos, plabels,
                                                         reduction="sum")) for _ in range(3))


def test_opcheck(backend):
    x, labels, protos, plabels = data(30, 7, 5, 3)
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.protokernels.glvq_loss.default,
                              (x.clone().requires_grad_(), protos.clone().requires_grad_(),
                               labels, plabels, "swish", 2.0, reduction, "ieee", backend))


def test_compile_fullgraph(backend):
    x, labels, protos, plabels = data(64, 10, 8, 3)

    def step(a, b):
        return protokernels.glvq_loss(a * 2, labels, b, plabels, transfer="sigmoid") + a.sum()

    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(x, protos), step(x, protos)) <= 1e-6


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    x, labels, protos, plabels = data(2000, 40, 32, 4)
    protokernels.glvq_loss(x, labels, protos, plabels)  # warm up (compiles the Triton kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = protokernels.glvq_loss(x, labels, protos, plabels, precision="ieee")
    x.copy_(data(2000, 40, 32, 4, seed=1)[0])
    graph.replay()
    want = truth(x, labels, protos, plabels, "identity", 10.0, "mean",
                 torch.ones((), device=DEVICE))[0]
    assert relative_error(loss, want) <= 1e-5


def _call(**changes):
    x, labels, protos, plabels = data(6, 4, 3, 2)
    args = dict(x=x, labels=labels, prototypes=protos, prototype_labels=plabels)
    options = {k: changes.pop(k) for k in ("transfer", "beta", "reduction") if k in changes}
    args.update({name: t.to(DEVICE) for name, t in changes.items()})
    return lambda: protokernels.glvq_loss(*args.values(), **options)


@pytest.mark.parametrize("call,error,message", [
    (_call(transfer="relu"), ValueError, "'transfer' must be one of"),
    (_call(reduction="avg"), ValueError, "'reduction' must be one of"),
    (_call(beta=0.0), ValueError, "'beta' must be a finite number > 0"),
    (_call(x=torch.ones(6, 3, dtype=torch.int64)), TypeError, "'x' must be a 2-D floating"),
    (_call(x=torch.ones(6, 3, dtype=torch.float64)), TypeError, "must have the same dtype"),
    (_call(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "'labels' must have 6"),
    (_call(prototype_labels=torch.zeros(4)), TypeError, "'prototype_labels' must be a 1-D int"),
    (_call(prototypes=torch.randn(4, 5)), ValueError, "same feature size"),
    (_call(prototypes=torch.randn(0, 3), prototype_labels=torch.zeros(0, dtype=torch.int64)),
     ValueError, "'prototypes' has no rows"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
