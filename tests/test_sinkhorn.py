"""sinkhorn (SwAV codes) and sinkhorn_plan (entropic OT) against float64 log-domain references:
awkward sizes, dtypes, strided input, extreme scores/eps where the naive exp overflows, tol and
return_info, gradcheck (unrolled), opcheck, compile, bad input, and 2 gloo ranks."""
import math

import pytest
import torch

import protokernels
from _distributed import run_ranks
from conftest import DEVICE, HAS_GPU, log_domain, relative_error, tolerance
from protokernels.benchmarks.sinkhorn import swav_sinkhorn

SHAPES = [(1, 1), (1, 7), (7, 1), (37, 130), (211, 97), (64, 1031)]


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def swav_code(out, eps, n_iters):
    """SwAV's distributed_sinkhorn (one process), in float64."""
    return swav_sinkhorn(out.double(), eps, n_iters)


def swav_reference(scores, eps, n_iters):
    b, k = scores.shape
    s = scores.double() / eps
    return log_domain(s, torch.zeros(b, dtype=s.dtype, device=s.device),
                      torch.full((k,), math.log(b / k), dtype=s.dtype, device=s.device), n_iters)


def plan_reference(cost, r, c, eps, n_iters):
    b, k = cost.shape
    log_r = r.double().log() if r is not None else torch.full((b,), -math.log(b)).to(cost.device)
    log_c = c.double().log() if c is not None else torch.full((k,), -math.log(k)).to(cost.device)
    return log_domain(-cost.double() / eps, log_r.double(), log_c.double(), n_iters)


def marginal(n, dtype=torch.float32, zero_at=None):
    m = torch.rand(n, device=DEVICE, dtype=torch.float64) + 0.1
    if zero_at is not None:
        m[zero_at] = 0
    return (m / m.sum()).to(dtype)


def test_log_domain_reference_is_swav_code():
    scores = torch.randn(37, 13, dtype=torch.float64)
    assert relative_error(swav_reference(scores, 0.3, 4), swav_code(scores, 0.3, 4)) <= 1e-12


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_sinkhorn_matches_float64(backend, shape, dtype):
    scores = randn(*shape, dtype=dtype)
    codes = protokernels.sinkhorn(scores, eps=0.1, n_iters=4)
    assert codes.dtype == dtype and codes.shape == shape
    ref = swav_reference(scores, 0.1, 4)
    assert relative_error(codes, ref) <= tolerance(dtype)
    assert relative_error(codes.double().sum(1), torch.ones(shape[0])) <= tolerance(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=lambda d: str(d)[6:])
def test_plan_matches_float64(backend, shape, dtype):
    cost = torch.rand(*shape, device=DEVICE, dtype=dtype)
    r, c = marginal(shape[0], dtype), marginal(shape[1], dtype)
    plan = protokernels.sinkhorn_plan(cost, r, c, eps=0.05, n_iters=30)
    assert plan.dtype == dtype and plan.shape == shape
    assert relative_error(plan, plan_reference(cost, r, c, 0.05, 30)) <= tolerance(dtype)
    assert relative_error(plan.double().sum(1), r) <= tolerance(dtype)  # the rows are exact


def test_uniform_marginals_and_zero_mass(backend):
    cost = torch.rand(9, 11, device=DEVICE)
    plan = protokernels.sinkhorn_plan(cost, eps=0.1, n_iters=20)
    assert relative_error(plan, plan_reference(cost, None, None, 0.1, 20)) <= 1e-5
    r, c = marginal(9, zero_at=2), marginal(11, zero_at=[0, 5])
    plan = protokernels.sinkhorn_plan(cost, r, c, eps=0.1, n_iters=20)
    assert (plan[2] == 0).all() and (plan[:, [0, 5]] == 0).all()
    assert relative_error(plan, plan_reference(cost, r, c, 0.1, 20)) <= 1e-5


def test_extreme_scores_do_not_overflow(backend):
    """eps = 1e-3 and |scores| up to 10: scores/eps reaches 1e4, where exp overflows at 88."""
    scores = (torch.rand(53, 37, device=DEVICE) * 20 - 10).double()
    scores[0, 0], scores[1, 1] = 10, -10
    assert not torch.isfinite(swav_code(scores, 1e-3, 3)).all()  # the naive form breaks here
    ref = swav_reference(scores, 1e-3, 3)
    for dtype in (torch.float32, torch.float64):
        codes = protokernels.sinkhorn(scores.to(dtype), eps=1e-3, n_iters=3)
        assert torch.isfinite(codes).all()
        # float32: a s of 1e4 carries an absolute rounding error of ~1e-3, so exp(a s) 1e-3
        assert relative_error(codes, ref) <= (1e-3 if dtype == torch.float32 else 1e-10)
    cost = scores.float().abs()
    plan = protokernels.sinkhorn_plan(cost, eps=1e-3, n_iters=50)
    assert torch.isfinite(plan).all()
    assert relative_error(plan, plan_reference(cost, None, None, 1e-3, 50)) <= 1e-3


def test_strided_and_expanded_input(backend):
    scores = randn(40, 23).t()  # (23, 40), row stride 1
    ref = swav_reference(scores, 0.2, 3)
    assert relative_error(protokernels.sinkhorn(scores, eps=0.2, n_iters=3), ref) <= 1e-5
    cost = randn(1, 17).expand(12, 17)
    plan = protokernels.sinkhorn_plan(cost, eps=0.5, n_iters=5)
    assert relative_error(plan, plan_reference(cost, None, None, 0.5, 5)) <= 1e-5


def test_chunked_rows(backend, monkeypatch):
    """Rows wider than a Triton program holds in registers go through the chunked path (here
    made narrow: 64 columns at most held, chunks of 32)."""
    if backend != "triton":
        pytest.skip("the chunked path is Triton's")
    kernels = pytest.importorskip("protokernels.triton_kernels.sinkhorn")
    monkeypatch.setattr(kernels, "_RESIDENT_COLUMNS", 64)
    monkeypatch.setattr(kernels, "_CHUNK_COLUMNS", 32)
    scores = randn(13, 101)
    ref = swav_reference(scores, 0.1, 3)
    assert relative_error(protokernels.sinkhorn(scores, eps=0.1, n_iters=3), ref) <= 1e-5
    cost, r = torch.rand(13, 101, device=DEVICE), marginal(13)
    plan = protokernels.sinkhorn_plan(cost, r, eps=0.05, n_iters=12)
    assert relative_error(plan, plan_reference(cost, r, None, 0.05, 12)) <= 1e-5


# Sizes for each layout of CUDA's whole-iteration kernel (16 columns a thread in 16, 8, 4, 2 or 1
# groups of rows, 24 in 4 groups up to K 3072; in float64 8 columns, 12 in 2 groups up to 3072),
# with groups that have no rows (B 5, 2, 40), for its two ways through the shared-memory rings (a
# group's rows resident in its ring, or streamed through it: the last four on 132 SMs, where
# groups hold more rows than their stages; rows copied in runs or, at odd K, element by element)
# and for its sweep-by-sweep fallback beyond 8192 columns (4096 in float64); every backend runs
# them.
WIDE_SHAPES = [(2300, 20), (700, 300), (5, 700), (2, 1500), (300, 2500), (40, 3500), (3, 4097),
               (3, 8193), (13000, 20), (9000, 2000), (2500, 3000), (6400, 801)]


@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_whole_iteration_sizes(backend, shape, dtype):
    if backend == "triton" and not HAS_GPU and shape[0] > 1000:
        pytest.skip("25 s in Triton's interpreter; the shape is for CUDA's blocks of 16 rows")
    scores = randn(*shape, dtype=dtype)
    codes = protokernels.sinkhorn(scores, eps=0.1, n_iters=3)
    assert relative_error(codes, swav_reference(scores, 0.1, 3)) <= tolerance(dtype)
    # sinkhorn_plan with the potentials kept for the backward: its gradient is formed from them
    cost = torch.rand(*shape, device=DEVICE, dtype=dtype)
    r, grad = marginal(shape[0], dtype), torch.randn(shape, device=DEVICE, dtype=dtype)
    grads = []
    for name in (backend, "reference"):
        leaf = cost.clone().requires_grad_()
        with protokernels.use_backend(name):
            plan = protokernels.sinkhorn_plan(leaf, r, eps=0.05, n_iters=4)
        plan.backward(grad)
        grads.append(leaf.grad)
        assert relative_error(plan, plan_reference(cost, r, None, 0.05, 4)) <= tolerance(dtype)
    # The unrolled gradient amplifies the plans' last-bit differences (1e-6 measured in float64
    # on the H100); wrong potentials would be off by far more.
    assert relative_error(grads[0], grads[1]) <= 1e-4


# Half-type scores through CUDA's rings, with groups of rows that hold more rows than stages (8
# on 132 SMs): copied in runs of 8 elements (16 bytes), or element by element (odd K 801; K 20,
# not a multiple of a run).
HALF_SHAPES = [(5000, 3000), (2200, 3504), (9000, 801), (17000, 20)]


@pytest.mark.parametrize("shape", HALF_SHAPES, ids=str)
def test_whole_iteration_half_types(backend, shape):
    if backend == "triton" and not HAS_GPU:
        pytest.skip("minutes in Triton's interpreter; the shapes are for CUDA's ring")
    scores = randn(*shape, dtype=torch.bfloat16)
    codes = protokernels.sinkhorn(scores, eps=0.1, n_iters=3)
    assert codes.dtype == torch.bfloat16
    assert relative_error(codes, swav_reference(scores, 0.1, 3)) <= tolerance(torch.bfloat16)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_cuda_graph_capture(backend):
    """CUDA's whole iteration is one cooperative launch: it must capture and replay too."""
    scores = randn(300, 2500)
    protokernels.sinkhorn(scores, eps=0.1, n_iters=3)  # warm up (compiles the Triton kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes = protokernels.sinkhorn(scores, eps=0.1, n_iters=3)
    scores.copy_(randn(300, 2500))
    graph.replay()
    assert relative_error(codes, swav_reference(scores, 0.1, 3)) <= 1e-5


def test_nan_in_nan_out(backend):
    scores = randn(6, 5)
    scores[2, 3] = math.nan
    assert torch.isnan(protokernels.sinkhorn(scores)).any()


def test_empty(backend):
    for shape in [(0, 5), (4, 0), (0, 0)]:
        assert protokernels.sinkhorn(randn(*shape)).shape == shape
        cost = randn(*shape).requires_grad_()
        plan = protokernels.sinkhorn_plan(cost, eps=0.1)
        assert plan.shape == shape
        plan.sum().backward()
        assert cost.grad.shape == shape


def test_tol_and_info(backend):
    cost = torch.rand(30, 20, device=DEVICE)
    plan, iterations, error = protokernels.sinkhorn_plan(cost, eps=0.1, n_iters=1000, tol=1e-6,
                                                         return_info=True)
    assert 11 <= iterations < 1000 and iterations % 10 == 1  # checked after 1, 11, 21, ...
    measured = (plan.double().sum(0) - 1 / 20).norm().item()  # L2, as POT's stopping criterion
    assert error <= 1e-6 and abs(measured - error) <= 1e-6
    assert relative_error(plan, plan_reference(cost, None, None, 0.1, iterations)) <= 1e-5
    _, iterations, error = protokernels.sinkhorn_plan(cost, eps=0.1, n_iters=3, return_info=True)
    assert iterations == 3 and error > 1e-6


def test_sinkhorn_has_no_grad_fn(backend):
    scores = randn(8, 5).requires_grad_()
    codes = protokernels.sinkhorn(scores)
    assert codes.grad_fn is None and not codes.requires_grad


@pytest.mark.parametrize("shape,n_iters,tol", [((4, 3), 5, None), ((1, 5), 2, None),
                                                ((5, 4), 40, 1e-12)], ids=str)
def test_plan_gradcheck(backend, shape, n_iters, tol):
    cost = torch.rand(*shape, device=DEVICE, dtype=torch.float64, requires_grad=True)
    r = marginal(shape[0], torch.float64, zero_at=0 if shape[0] > 1 else None)
    torch.autograd.gradcheck(
        lambda cost: protokernels.sinkhorn_plan(cost, r, None, eps=0.3, n_iters=n_iters, tol=tol),
        (cost,))


def test_opcheck(backend):
    scores = randn(9, 6)
    torch.library.opcheck(torch.ops.protokernels.sinkhorn.default, (scores, 0.1, 3, backend))
    cost = torch.rand(7, 5, device=DEVICE, requires_grad=True)
    r, c = marginal(7), marginal(5)
    for args in [(cost, r, c, 0.2, 4, None, True), (cost, None, None, 0.2, 20, 1e-3, True)]:
        torch.library.opcheck(torch.ops.protokernels.sinkhorn_plan.default, args + (backend,))


def test_compile_fullgraph(backend):
    def model(scores, cost):
        codes = protokernels.sinkhorn(scores * 2, eps=0.1)
        return codes, protokernels.sinkhorn_plan(cost + 1, eps=0.2, n_iters=7).square().sum()

    scores, cost = randn(19, 8), torch.rand(6, 9, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_GPU else "inductor")
    for out, ref in zip(compiled(scores, cost), model(scores, cost)):
        assert relative_error(out, ref) <= 1e-6


BAD_INPUTS = [
    ("sinkhorn", lambda: dict(scores=randn(2, 3, 4)), ValueError, "'scores' must be 2-D"),
    ("sinkhorn", lambda: dict(scores=randn(5)), ValueError, "'scores' must be 2-D"),
    ("sinkhorn", lambda: dict(scores=torch.ones(3, 4, dtype=torch.int64)), TypeError,
     "'scores' must be a floating"),
    ("sinkhorn", lambda: dict(scores=randn(3, 4), eps=0.0), ValueError, "'eps' must be a finite "
     r"number > 0, got 0.0"),
    ("sinkhorn", lambda: dict(scores=randn(3, 4), eps=-1), ValueError, "'eps' must be"),
    ("sinkhorn", lambda: dict(scores=randn(3, 4), eps="0.1"), TypeError, "'eps' must be a number"),
    ("sinkhorn", lambda: dict(scores=randn(3, 4), n_iters=0), ValueError, "'n_iters' must be >= 1"),
    ("sinkhorn", lambda: dict(scores=randn(3, 4), n_iters=2.0), TypeError, "'n_iters' must be an int"),
    ("sinkhorn", lambda: dict(scores=randn(3, 4), process_group=object()), ValueError,
     "torch.distributed is not initialized"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3), eps=0.1), ValueError, "'cost' must be 2-D"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4)), TypeError, "eps"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), eps=0), ValueError, "'eps' must be"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), eps=0.1, n_iters=-2), ValueError,
     "'n_iters' must be >= 1"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), r=marginal(4), eps=0.1), ValueError,
     r"'r' must have shape \(3,\)"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), c=marginal(4)[None], eps=0.1), ValueError,
     r"'c' must have shape \(4,\)"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), r=torch.tensor([0.5, 0.7, -0.2], device=DEVICE),
                                      eps=0.1),
     ValueError, "'r' must not have negative entries"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), r=marginal(3) * 2, eps=0.1), ValueError,
     "must have the same total mass"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), r=marginal(3), c=marginal(4) * 0.5, eps=0.1),
     ValueError, "must have the same total mass"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), r=torch.ones(3, dtype=torch.int64), eps=0.1),
     TypeError, "'r' must be a floating-point tensor"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), r=torch.ones(3, device="meta") / 3, eps=0.1),
     ValueError, "'r' must be on the same device"),
    ("sinkhorn_plan", lambda: dict(cost=randn(3, 4), eps=0.1, tol=-1.0), ValueError, "'tol'"),
    ("sinkhorn_plan", lambda: dict(cost=randn(4, 5), r=torch.zeros(4, device=DEVICE),
                                   c=torch.zeros(5, device=DEVICE), eps=0.1),
     ValueError, "'r' and 'c' must have a positive total mass, got 0.0"),
]


@pytest.mark.parametrize("op,make,error,message", BAD_INPUTS,
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(op, make, error, message):
    with pytest.raises(error, match=message):
        getattr(protokernels, op)(**make())


# -- two gloo ranks ---------------------------------------------------------------------------

def _rank_codes(rank, rows, backend):
    torch.manual_seed(0)
    scores = torch.randn(sum(rows), 33)
    start = sum(rows[:rank])
    with protokernels.use_backend(backend):
        import torch.distributed as dist
        return protokernels.sinkhorn(scores[start:start + rows[rank]], eps=0.1, n_iters=5,
                                     process_group=dist.group.WORLD)


@pytest.mark.parametrize("rows", [(40, 25), (30, 0)], ids=["uneven", "one-empty"])
@pytest.mark.parametrize("ranks_backend", ["reference", "triton"])
def test_two_gloo_ranks_equal_one_process(rows, ranks_backend):
    if ranks_backend == "triton" and HAS_GPU:
        pytest.skip("gloo ranks run on CPU tensors; the GPU run uses NCCL (benchmarks/sinkhorn.py)")
    codes = torch.cat(run_ranks(_rank_codes, 2, rows, ranks_backend))
    torch.manual_seed(0)
    scores = torch.randn(sum(rows), 33)
    assert relative_error(codes, swav_reference(scores, 0.1, 5)) <= 1e-5
    with protokernels.use_backend("reference"):
        single = protokernels.sinkhorn(scores, eps=0.1, n_iters=5)
    assert relative_error(codes, single) <= 1e-6


# Issue 15: no silent NaN from a zero marginal at a small eps, or from an infinite score; the
# README's POT line matches POT.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zero_marginal_at_small_eps(backend, dtype):
    """Column 1 gets all its mass from row 0, where it is e^-200 below column 0: exact log-sums
    of the columns, where float sums underflowed to 0 and made every entry NaN."""
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype, device=DEVICE)
    r = torch.tensor([1.0, 0.0], dtype=dtype, device=DEVICE)
    plan = protokernels.sinkhorn_plan(cost, r, eps=0.005, n_iters=2)
    expected = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    assert (plan.double().cpu() - expected).abs().max() <= 1e-6


def test_an_infinite_score_is_an_overwhelming_one(backend):
    scores = torch.tensor([[math.inf, 0.0], [0.0, 1.0], [1.0, 0.0]], device=DEVICE)
    codes = protokernels.sinkhorn(scores)
    assert torch.isfinite(codes).all()
    assert torch.allclose(codes.sum(1), torch.ones(3, device=DEVICE), atol=1e-6)
    assert codes[0, 0] > 0.999  # the infinitely preferred column takes that row's mass
    cost = torch.tensor([[math.inf, 0.0], [0.0, 1.0]], device=DEVICE)
    plan = protokernels.sinkhorn_plan(cost, eps=0.1)
    assert torch.isfinite(plan).all() and plan[0, 0] < 1e-6


def test_pot_migration_line_matches_pot(backend):
    """README: ot.sinkhorn(a, b, M, reg) is sinkhorn_plan(M, a, b, eps=reg, n_iters=1000,
    tol=1e-9): on POT's own kind of input (its test_sinkhorn: Gaussian points, uniform and
    random histograms), the same iterations and the same plan to float64 rounding."""
    ot = pytest.importorskip("ot")
    import numpy as np
    rng = np.random.RandomState(0)
    for n, m, reg in [(50, 50, 1.0), (40, 30, 0.1)]:
        x, y = rng.randn(n, 2), rng.randn(m, 2)
        a, b = ot.utils.unif(n), rng.rand(m)
        b /= b.sum()
        M = ot.dist(x, y)
        G, log = ot.sinkhorn(a, b, M, reg, log=True)
        to = lambda v: torch.tensor(v, dtype=torch.float64, device=DEVICE)  # noqa: E731
        plan, iterations, _ = protokernels.sinkhorn_plan(to(M), to(a), to(b), eps=reg,
                                                         n_iters=1000, tol=1e-9, return_info=True)
        assert iterations == log["niter"] + 1
        assert np.abs(plan.cpu().numpy() - G).max() <= 1e-12
