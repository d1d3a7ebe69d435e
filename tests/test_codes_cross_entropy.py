"""codes_cross_entropy in every backend against float64 ground truth (values and gradients of
every reduction, awkward sizes, several programs of the sum, extreme temperatures, dtypes), NaN,
empty input, determinism, registration and bad input."""
import math

import pytest
import torch

import protokernels
from conftest import DEVICE, HAS_GPU, check_loss, relative_error, tolerance

REDUCTIONS = ["none", "sum", "mean"]


def data(b, k, dtype=torch.float32, seed=0):
    """Scores and soft targets (rows summing to 1, as Sinkhorn's codes)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, k, generator=g, dtype=torch.float64)
    codes = torch.softmax(3 * torch.randn(b, k, generator=g, dtype=torch.float64), 1)
    return scores.to(DEVICE, dtype), codes.to(DEVICE, dtype)


def truth(scores, codes, temperature, reduction, grad):
    scores = scores.detach().double().requires_grad_()
    values = -(codes.double() * torch.log_softmax(scores / temperature, 1)).sum(1)
    loss = {"none": values, "sum": values.sum(), "mean": values.mean()}[reduction]
    loss.backward(grad.double())
    return loss.detach(), scores.grad


def check(scores, codes, temperature=0.1, reduction="mean", bound=None):
    check_loss(lambda s: protokernels.codes_cross_entropy(s, codes, temperature=temperature,
                                                          reduction=reduction),
               lambda grad: truth(scores, codes, temperature, reduction, grad), (scores,),
               bound or tolerance(scores.dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_matches_float64(backend, reduction, temperature):
    check(*data(70, 33), temperature, reduction)


# (B, K): one row and column; primes; K over one block of the row kernel (1024); B over one
# block of the sum's partials (1024 rows)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 3000), (1100, 5)], ids=str)
def test_sizes(backend, shape):
    check(*data(*shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    scores, codes = data(40, 30, dtype)
    check(scores, codes, 0.3)


def test_one_column_has_no_gradient(backend):
    # softmax of one column is 1: the gradient C - c is 0 exactly (it came out 5e-6 on the H200
    # while a kernel formed the exponent from a contracted product, RESULTS.md "DPNP in one op")
    scores = (torch.randn(9, 1, device=DEVICE) * 8).requires_grad_()
    codes = torch.ones(9, 1, device=DEVICE)
    protokernels.codes_cross_entropy(scores, codes, temperature=0.1).backward()
    assert (scores.grad == 0).all()


def test_strided_rows_and_extreme_temperatures(backend):
    scores, codes = data(20, 64)
    check(scores[::2, :40], codes[::2, :40])  # row strides of the full matrix
    s = (scores * 1e4).requires_grad_()  # scores / T up to ~1e5: max-shifted, finite
    loss = protokernels.codes_cross_entropy(s, codes, temperature=1e-2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_gradcheck_float64():
    scores, codes = data(6, 5, torch.float64)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda s: protokernels.codes_cross_entropy(s, codes, temperature=0.7,
                                                       reduction=reduction),
            (scores.clone().requires_grad_(),))


def test_nan_and_empty(backend):
    scores, codes = data(10, 6)
    scores[4, 2] = math.nan
    values = protokernels.codes_cross_entropy(scores, codes, reduction="none")
    assert values[4].isnan() and torch.isfinite(values[torch.arange(10) != 4]).all()
    empty = torch.zeros(0, 6, device=DEVICE, requires_grad=True)
    loss = protokernels.codes_cross_entropy(empty, torch.zeros(0, 6, device=DEVICE))
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == (0, 6)


def test_sum_is_deterministic(backend):
    scores, codes = data(3000 if HAS_GPU else 100, 50)
    first = protokernels.codes_cross_entropy(scores, codes, reduction="sum")
    assert all(torch.equal(first, protokernels.codes_cross_entropy(scores, codes, reduction="sum"))
               for _ in range(3))


def test_opcheck(backend):
    scores, codes = data(12, 9)
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.protokernels.codes_cross_entropy.default,
                              (scores.clone().requires_grad_(), codes, 0.2, reduction, backend))


def test_compile_fullgraph(backend):
    scores, codes = data(16, 12)

    def loss(s):
        return protokernels.codes_cross_entropy(s * 2, codes, temperature=0.5) + s.sum()

    compiled = torch.compile(loss, fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(scores), loss(scores)) <= 1e-6


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    scores, codes = data(512, 300)
    protokernels.codes_cross_entropy(scores, codes)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = protokernels.codes_cross_entropy(scores, codes)
    scores.copy_(data(512, 300, seed=1)[0])
    graph.replay()
    want = truth(scores, codes, 1.0, "mean", torch.ones((), device=DEVICE))[0]
    assert relative_error(loss, want) <= 1e-5


@pytest.mark.parametrize("make,error,message", [
    (lambda s, c: (s, c, dict(temperature=0.0)), ValueError, "'temperature' must be a finite"),
    (lambda s, c: (s, c, dict(reduction="avg")), ValueError, "'reduction' must be one of"),
    (lambda s, c: (s, c[:, :3], {}), ValueError, "'codes' of the same shape"),
    (lambda s, c: (s[0], c[0], {}), ValueError, "must be 2-D"),
    (lambda s, c: (s, c.long(), {}), TypeError, "'codes' must be a floating-point tensor"),
    (lambda s, c: (s, c.double(), {}), TypeError, "must have the same dtype"),
])
def test_bad_input(make, error, message):
    scores, codes, options = make(*data(4, 5))
    with pytest.raises(error, match=message):
        protokernels.codes_cross_entropy(scores, codes, **options)
