"""nearest, nearest_k, nearest_by_label, nearest_both in every backend against float64 ground
truth: winners judged by their true distance, exact distances, gradients, registration, bad input."""
import os
import subprocess
import sys

import pytest
import torch

import protokernels
from conftest import (DEVICE, HAS_GPU, assert_ran, cuda_kernels_run, hopper_build, hopper_fits,
                      relative_error, skip_unless_capable, tolerance)

INF = float("inf")


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


def truth(x, y):
    """float64 ||x_i - y_j||^2 by explicit differences (no expansion, no cancellation)."""
    return (x.double().unsqueeze(-2) - y.double().unsqueeze(-3)).square().sum(-1)


def term_scale(x, y):
    """||x_i||^2 + ||y_j||^2 per pair: what the expanded formula's rounding is relative to."""
    x, y = x.double(), y.double()
    return x.square().sum(-1).unsqueeze(-1) + y.square().sum(-1).unsqueeze(-2)


def assert_winners(x, y, dist, idx, allowed=None, k=1, dtype=torch.float32, precision="ieee"):
    """idx (..., N, k) holds allowed, distinct columns whose true distances are the k smallest up
    to the ranking precision (near-ties are legal), ascending; dist is their exact distance."""
    true = truth(x, y)
    allowed = torch.ones_like(true, dtype=torch.bool) if allowed is None else allowed
    if dist.dim() == true.dim() - 1:
        dist, idx = dist[..., None], idx[..., None]
    assert dist.shape == idx.shape == true.shape[:-1] + (k,)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert idx.dtype == torch.int64
    # Slack for near-ties: the candidates were ranked by the expanded formula at `precision`.
    slack = tolerance(dtype, precision) * term_scale(x, y).amax(-1, keepdim=True)
    ranked = true.masked_fill(~allowed, INF).sort(-1).values[..., :k]
    found = idx >= 0
    chosen = true.gather(-1, idx.clamp_min(0)).masked_fill(~found, INF)
    assert (allowed.gather(-1, idx.clamp_min(0)) | ~found).all(), "a forbidden column won"
    assert torch.equal(found, ranked < INF), "a row with candidates got none, or vice versa"
    assert (chosen[found] - ranked[found]).abs().le(slack.expand_as(chosen)[found]).all()
    if k > 1:
        s = idx.sort(-1).values
        assert ((s[..., 1:] != s[..., :-1]) | (s[..., 1:] < 0)).all(), "a column chosen twice"
        assert (dist[..., 1:] >= dist[..., :-1]).all(), "not ascending"
    # Exact distances of the chosen pairs (computed from the inputs as given).
    assert relative_error(dist.masked_fill(~found, 0), chosen.masked_fill(~found, 0)) <= 1e-5
    assert (dist[~found] == INF).all()


# D a multiple of the 16-byte chunk (64, 40) sends CUDA's tensor-core search down its cp.async
# path, with a partial last chunk in half precision (36); the others down its element loads.
SHAPES = [(1, 1, 1, 1), (1, 17, 13, 1), (2, 31, 37, 7), (1, 65, 129, 33), (1, 130, 5, 129),
          (1, 3, 40, 1025), (2, 300, 700, 64), (1, 129, 260, 36), (1, 40, 300, 40)]
DTYPES = [(torch.float32, "ieee"), (torch.float32, "tf32x3"), (torch.float32, "tf32"),
          (torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float64, "ieee")]
dtype_ids = lambda v: str(v).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("dtype,precision", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nearest_matches_float64(backend, shape, dtype, precision):
    skip_unless_capable(backend, "nearest", dtype)
    batch, n, m, d = shape
    x, y = randn(batch, n, d, dtype=dtype), randn(batch, m, d, dtype=dtype)
    dist, idx = protokernels.nearest(x, y, precision=precision)
    assert_winners(x, y, dist, idx, dtype=dtype, precision=precision)


@pytest.mark.parametrize("dtype,precision", DTYPES[:1] + DTYPES[2:4], ids=dtype_ids)
@pytest.mark.parametrize("k", [1, 2, 3, 20])
def test_nearest_k_matches_float64(backend, k, dtype, precision):
    x, y = randn(2, 33, 19, dtype=dtype), randn(2, 150, 19, dtype=dtype)
    dist, idx = protokernels.nearest_k(x, y, k, precision=precision)
    assert_winners(x, y, dist, idx, k=k, dtype=dtype, precision=precision)


def test_nearest_k_of_all_columns_with_exclusion(backend):
    """k = M with one column excluded: the last slot stays empty (idx -1, dist inf)."""
    x, y = randn(7, 5), randn(6, 5)
    exclude = torch.randint(0, 6, (7,), device=DEVICE)
    dist, idx = protokernels.nearest_k(x, y, 6, exclude=exclude)
    allowed = torch.arange(6, device=DEVICE) != exclude[:, None]
    assert_winners(x, y, dist, idx, allowed=allowed, k=6)
    assert (idx[:, -1] == -1).all() and (dist[:, -1] == INF).all()


@pytest.mark.parametrize("k", [1, 4])
def test_exclude(backend, k):
    x, y = randn(3, 40, 6), randn(3, 70, 6)
    true_best = truth(x, y).argmin(-1)  # exclude the winner: the rival must be found instead
    exclude = true_best.clone()
    exclude[:, ::3] = torch.randint(0, 70, exclude[:, ::3].shape, device=DEVICE)
    if k == 1:
        dist, idx = protokernels.nearest(x, y, exclude=exclude)
    else:
        dist, idx = protokernels.nearest_k(x, y, k, exclude=exclude)
    allowed = torch.arange(70, device=DEVICE) != exclude[..., None]
    assert_winners(x, y, dist, idx, allowed=allowed, k=k)


def test_exclude_the_only_candidate(backend):
    x, y = randn(4, 3), randn(1, 3)
    dist, idx = protokernels.nearest(x, y, exclude=torch.zeros(4, dtype=torch.int64, device=DEVICE))
    assert (idx == -1).all() and (dist == INF).all()


def test_exclude_broadcasts_over_batch(backend):
    x, y = randn(2, 9, 4), randn(3, 1, 11, 4)
    exclude = torch.randint(0, 11, (9,), device=DEVICE)
    dist, idx = protokernels.nearest(x, y, exclude=exclude.to(torch.int32))
    assert idx.shape == (3, 2, 9)
    allowed = torch.arange(11, device=DEVICE) != exclude[:, None]
    assert_winners(x, y, dist, idx, allowed=allowed.expand(3, 2, 9, 11))


@pytest.mark.parametrize("dtype,precision", DTYPES[:1] + DTYPES[2:4] + DTYPES[5:], ids=dtype_ids)
def test_nearest_by_label(backend, dtype, precision):
    skip_unless_capable(backend, "nearest_by_label", dtype)
    x, y = randn(2, 45, 9, dtype=dtype), randn(2, 37, 9, dtype=dtype)
    # Labels 0..4 for x but only 0..3 on the prototypes: class 4 has none (d_same = inf), and
    # in batch 1 every prototype is class 2, so class-2 samples have no rival (d_other = inf).
    x_labels = torch.randint(0, 5, (2, 45), device=DEVICE)
    y_labels = torch.randint(0, 4, (2, 37), device=DEVICE)
    y_labels[1] = 2
    d_same, i_same, d_other, i_other = protokernels.nearest_by_label(x, x_labels, y, y_labels,
                                                                     precision=precision)
    same = x_labels[..., None] == y_labels[..., None, :]
    assert_winners(x, y, d_same, i_same, allowed=same, dtype=dtype, precision=precision)
    assert_winners(x, y, d_other, i_other, allowed=~same, dtype=dtype, precision=precision)
    assert (i_same[x_labels == 4] == -1).all() and (d_same[x_labels == 4] == INF).all()
    assert (i_other[1][x_labels[1] == 2] == -1).all()


@pytest.mark.parametrize("dtype,precision", DTYPES[:1] + DTYPES[2:4] + DTYPES[5:], ids=dtype_ids)
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 70, 131, 17), (1, 200, 3, 40)], ids=str)
def test_nearest_both(backend, shape, dtype, precision):
    skip_unless_capable(backend, "nearest_both", dtype)
    batch, n, m, d = shape
    x, y = randn(batch, n, d, dtype=dtype), randn(batch, m, d, dtype=dtype)
    row_dist, row_idx, col_dist, col_idx = protokernels.nearest_both(x, y, precision=precision)
    assert_winners(x, y, row_dist, row_idx, dtype=dtype, precision=precision)
    assert_winners(y, x, col_dist, col_idx, dtype=dtype, precision=precision)


def test_ties_go_to_the_smallest_index(backend):
    # Small integers: every product and sum is exact in float32 and TF32, so equal distances are
    # equal bit for bit in any summation order. (With random floats, identical rows may round
    # differently by position: NumPy's matmul under Triton's interpreter broke such a tie once.)
    y = torch.randint(-4, 5, (700, 8), device=DEVICE).float()
    y[[300, 650]] = y[3].clone()  # three identical prototypes, in different tiles of every kernel
    x = y[[3, 3, 3]] + 0.0
    for precision in ("ieee", "tf32x3", "tf32"):
        dist, idx = protokernels.nearest(x, y, precision=precision)
        assert (idx == 3).all() and (dist == 0).all()
        dist, idx = protokernels.nearest_k(x, y, 3, precision=precision)
        assert (idx == torch.tensor([3, 300, 650], device=DEVICE)).all()
        _, _, col_dist, col_idx = protokernels.nearest_both(x, y, precision=precision)
        assert (col_idx[[3, 300, 650]] == 0).all()


def test_nan_row_gives_nan_distance(backend):
    x, y = randn(6, 5), randn(9, 5)
    x[2, 1] = float("nan")
    dist, idx = protokernels.nearest(x, y)
    assert dist[2].isnan() and not dist[[0, 1, 3, 4, 5]].isnan().any()
    assert_winners(x[[0, 1, 3, 4, 5]], y, dist[[0, 1, 3, 4, 5]], idx[[0, 1, 3, 4, 5]])
    dist, _ = protokernels.nearest_k(x, y, 3)
    assert dist[2].isnan().all() and not dist[[0, 1, 3, 4, 5]].isnan().any()
    row_dist, _, col_dist, _ = protokernels.nearest_both(x, y)
    assert row_dist[2].isnan() and col_dist.isnan().all()  # every column sees the NaN row first


def test_nan_prototype_wins_like_argmin(backend):
    """A NaN distance ranks first (torch.argmin propagates NaN): never a clean-looking winner
    that hides a NaN prototype."""
    x, y = randn(4, 5), randn(700, 5)
    y[650, 0] = float("nan")  # in a later column tile than the first
    y[660, 0] = float("nan")
    dist, idx = protokernels.nearest(x, y)
    assert (idx == 650).all() and dist.isnan().all()


@pytest.mark.parametrize("x_shape,y_shape", [((0, 4), (5, 4)), ((2, 0, 4), (2, 5, 4)),
                                             ((0, 3, 4), (0, 5, 4))], ids=str)
def test_empty_rows(backend, x_shape, y_shape):
    x, y = randn(*x_shape).requires_grad_(), randn(*y_shape).requires_grad_()
    dist, idx = protokernels.nearest(x, y)
    assert dist.shape == idx.shape == x_shape[:-1]
    dist.sum().backward()
    assert (x.grad == 0).all() and (y.grad == 0).all()
    dist, idx = protokernels.nearest_k(x.detach(), y.detach(), 2)
    assert dist.shape == x_shape[:-1] + (2,)


def test_zero_features_all_distances_zero(backend):
    dist, idx = protokernels.nearest(randn(3, 0), randn(4, 0))
    assert (dist == 0).all() and (idx == 0).all()


def test_broadcast_and_non_contiguous_inputs(backend):
    x = randn(2, 1, 40, 33).transpose(-1, -2)[..., ::2, :]  # (2, 1, 17, 40), strided
    y = randn(40, 3, 23).permute(1, 2, 0)  # (3, 23, 40), non-contiguous
    dist, idx = protokernels.nearest(x, y, precision="ieee")
    assert idx.shape == (2, 3, 17)
    assert_winners(x, y, dist, idx)


GRADCHECK_OPS = {
    "nearest": lambda x, y: protokernels.nearest(x, y)[0],
    "nearest_k": lambda x, y: protokernels.nearest_k(x, y, 2)[0],
    "exclude": lambda x, y: protokernels.nearest(
        x, y, exclude=torch.tensor([0, 1, 2, 0], device=DEVICE))[0],
    "by_label": lambda x, y: torch.stack(protokernels.nearest_by_label(
        x, torch.tensor([0, 1, 1, 2], device=DEVICE), y,
        torch.tensor([1, 0, 1, 1, 0], device=DEVICE))[::2]).clamp_max(1e6),
    "both": lambda x, y: torch.cat([protokernels.nearest_both(x, y)[0],
                                    protokernels.nearest_both(x, y)[2]]),
}


@pytest.mark.parametrize("op", GRADCHECK_OPS)
def test_gradcheck_float64(backend, op):
    skip_unless_capable(backend, "nearest", torch.float64)
    # y rows 1 and 4 are the winners of several x rows: the scatter-add must sum them.
    x = randn(4, 3, dtype=torch.float64).requires_grad_()
    y = randn(5, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(GRADCHECK_OPS[op], (x, y))


class _PairDistances(torch.autograd.Function):
    """dist = ||a_r - b_idx||^2 in float64 by torch, its backward by `backend`'s gradient kernel
    (gather_sqdist_grad): gradcheck of the kernel itself, whatever backend ranks float64."""

    @staticmethod
    def forward(ctx, a, b, idx, backend):
        ctx.save_for_backward(a, b, idx)
        ctx.backend = backend
        rows = b.gather(1, idx.clamp_min(0).flatten(1)[..., None].expand(-1, -1, a.shape[-1]))
        diff = a[:, :, None] - rows.view(idx.shape + (a.shape[-1],))
        return diff.square().sum(-1).masked_fill(idx < 0, 0)

    @staticmethod
    def backward(ctx, grad):
        a, b, idx = ctx.saved_tensors
        ga, gb = torch.ops.protokernels.gather_sqdist_grad(grad.contiguous(), a, b, idx,
                                                           ctx.backend)
        return ga, gb, None, None


def test_gradient_kernel_gradcheck_float64(backend):
    a = randn(2, 6, 5, dtype=torch.float64).requires_grad_()
    b = randn(2, 4, 5, dtype=torch.float64).requires_grad_()
    idx = torch.tensor([[[0, 1], [1, -1], [3, 3], [1, 0], [2, 1], [0, 0]]] * 2, device=DEVICE)
    assert torch.autograd.gradcheck(lambda a, b: _PairDistances.apply(a, b, idx, backend), (a, b))


@pytest.mark.parametrize("op", ["nearest", "nearest_k", "nearest_by_label", "nearest_both",
                                "dw_nearest"])
def test_float64_is_ranked_in_float64(op):
    """Candidates 1e-9 apart: float32 keys would tie them. auto ranks float64 in float64 (the
    reference), an explicit backend that ranks in float32 refuses with the reason."""
    x = torch.zeros(1, 1, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([[1.0], [1 - 1e-9]], dtype=torch.float64, device=DEVICE)
    calls = {"nearest": lambda: protokernels.nearest(x, y)[1],
             "nearest_k": lambda: protokernels.nearest_k(x, y, 1)[1][..., 0],
             "nearest_by_label": lambda: protokernels.nearest_by_label(
                 x, torch.zeros(1, dtype=torch.int64, device=DEVICE), y,
                 torch.zeros(2, dtype=torch.int64, device=DEVICE))[1],
             "nearest_both": lambda: protokernels.nearest_both(x, y)[1],
             "dw_nearest": lambda: protokernels.dw_nearest(x, y[None])[1]}
    assert calls[op]().item() == 1
    for name, status in protokernels.available_backends().items():
        if name == "reference" or not status.available or (name == "cuda" and not HAS_GPU):
            continue
        with protokernels.use_backend(name), pytest.raises(
                protokernels.BackendUnavailableError, match=f"backend '{name}' cannot take.*"
                "dtype float64 is not supported"):
            calls[op]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_ids)
def test_gradients_match_float64(backend, dtype):
    x, y = randn(2, 90, 21, dtype=dtype), randn(2, 13, 21, dtype=dtype)  # many rows per winner
    g = randn(2, 90)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    dist, idx = protokernels.nearest(xg, yg)
    dist.backward(g)
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    truth(xr, yr).gather(-1, idx[..., None])[..., 0].backward(g.double())
    assert xg.grad.dtype == dtype and yg.grad.dtype == dtype
    assert relative_error(xg.grad, xr.grad) <= tolerance(dtype)
    assert relative_error(yg.grad, yr.grad) <= tolerance(dtype)


def test_opcheck(backend):
    x, y = randn(2, 9, 6).requires_grad_(), randn(2, 11, 6).requires_grad_()
    exclude = torch.randint(0, 11, (2, 9), device=DEVICE)
    labels_x = torch.randint(0, 3, (2, 9), device=DEVICE)
    labels_y = torch.randint(0, 3, (2, 11), device=DEVICE)
    ops = torch.ops.protokernels
    torch.library.opcheck(ops.nearest.default, (x, y, exclude, 3, "ieee", backend))
    torch.library.opcheck(ops.nearest.default, (x, y, None, 1, "ieee", backend))
    torch.library.opcheck(ops.nearest_by_label.default,
                          (x, y, labels_x, labels_y, "ieee", backend))
    torch.library.opcheck(ops.nearest_both.default, (x, y, "ieee", backend))
    idx = torch.randint(-1, 11, (2, 9, 2), device=DEVICE)
    torch.library.opcheck(ops.gather_sqdist_grad.default,
                          (randn(2, 9, 2), x.detach(), y.detach(), idx, backend))


def test_compile_fullgraph(backend):
    def model(x, y, labels_x, labels_y):
        dist, _ = protokernels.nearest(x * 2, y)
        d_same, _, d_other, _ = protokernels.nearest_by_label(x, labels_x, y, labels_y)
        return dist.sum() + ((d_same - d_other) / (d_same + d_other)).sum()

    x, y = randn(3, 21, 6), randn(3, 10, 6)
    labels_x, labels_y = torch.randint(0, 2, (3, 21), device=DEVICE), torch.arange(10, device=DEVICE) % 2
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(x, y, labels_x, labels_y), model(x, y, labels_x, labels_y)) <= 1e-6


def test_reference_stays_correct_when_tiled(monkeypatch):
    monkeypatch.setenv("PROTOKERNELS_REFERENCE_SCRATCH_MB", "0.004")  # a few rows/columns a tile
    x, y = randn(2, 50, 8), randn(2, 70, 8)
    with protokernels.use_backend("reference"):
        dist, idx = protokernels.nearest_k(x, y, 4)
        assert_winners(x, y, dist, idx, k=4)
        row_dist, row_idx, col_dist, col_idx = protokernels.nearest_both(x, y)
        assert_winners(x, y, row_dist, row_idx)
        assert_winners(y, x, col_dist, col_idx)


@pytest.mark.slow
def test_reference_memory_stays_bounded_on_cpu():
    """nearest of 100 000 x 20 000 rows at D 64 on the CPU peaks under 2.5 GB RSS (the distance
    matrix alone would take 8 GB)."""
    script = (
        "import resource, torch, protokernels\n"
        "torch.manual_seed(0)\n"
        "x, y = torch.randn(100_000, 64), torch.randn(20_000, 64)\n"
        "with protokernels.use_backend('reference'):\n"
        "    dist, idx = protokernels.nearest(x, y)\n"
        "rows = torch.arange(0, 100_000, 9_999)\n"
        "true = torch.cdist(x[rows].double(), y.double()).square()\n"
        "assert (true.gather(1, idx[rows, None])[:, 0] - true.min(1).values).abs().max() < 1e-3\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_kib = int(out.stdout.split()[-1])
    assert peak_kib < 2.5 * 2**20, f"peak RSS {peak_kib / 2**20:.2f} GiB"


@pytest.mark.slow
def test_reference_top_k_memory_stays_within_its_budget():
    """nearest_k of 100 000 x 3000 rows at D 128, k 64, on the CPU at a 256 MiB scratch budget:
    RSS grows by at most the budget, the outputs (77 MiB) and 64 MiB of slack (it grew by 680
    MiB before the top-k merge and the exact-distance gather counted their temporaries)."""
    script = (
        "import resource, torch, protokernels\n"
        "torch.manual_seed(0)\n"
        "x, y = torch.randn(100_000, 128), torch.randn(3000, 128)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with protokernels.use_backend('reference'):\n"
        "    dist, idx = protokernels.nearest_k(x, y, 64)\n"
        "rows = torch.arange(0, 100_000, 9_999)\n"
        "true = torch.cdist(x[rows].double(), y.double()).square()\n"
        "best = true.topk(64, largest=False).values\n"
        "assert (true.gather(1, idx[rows]) - best).abs().max() < 1e-3\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    env = {**os.environ, "PROTOKERNELS_REFERENCE_SCRATCH_MB": "256"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=env)
    growth_mib = int(out.stdout.split()[-1]) / 1024
    assert growth_mib < 256 + 77 + 64, f"RSS grew by {growth_mib:.0f} MiB"


BAD_INPUTS = [
    (lambda: dict(x=randn(4, 3), y=randn(5, 4)), ValueError, "feature size D"),
    (lambda: dict(x=randn(4), y=randn(5, 4)), ValueError, "'x' must have at least 2 dimensions"),
    (lambda: dict(x=torch.ones(4, 3, dtype=torch.int64), y=randn(5, 3)), TypeError,
     "'x' must be a floating"),
    (lambda: dict(x=randn(4, 3), y=torch.ones(5, 3, dtype=torch.complex64)), TypeError,
     "'y' must be a floating"),
    (lambda: dict(x=randn(4, 3).to("meta"), y=randn(5, 3)), ValueError, "same device"),
    (lambda: dict(x=randn(4, 3), y=randn(0, 3)), ValueError, "M = 0"),
    (lambda: dict(x=randn(4, 3), y=randn(5, 3), exclude=torch.tensor([0, 1, 5, 2])), ValueError,
     r"'exclude' must hold row indices of 'y' in \[0, 5\), got values from 0 to 5"),
    (lambda: dict(x=randn(4, 3), y=randn(5, 3), exclude=torch.tensor([0, -1, 1, 2])), ValueError,
     "'exclude' must hold"),
    (lambda: dict(x=randn(4, 3), y=randn(5, 3), exclude=torch.zeros(3, dtype=torch.int64)),
     ValueError, "'exclude' must have shape"),
    (lambda: dict(x=randn(4, 3), y=randn(5, 3), exclude=torch.zeros(4)), TypeError,
     "'exclude' must be an integer tensor"),
    (lambda: dict(x=randn(4, 3), y=randn(5, 3), exclude=[0, 1, 2, 3]), TypeError,
     "'exclude' must be a torch.Tensor"),
]


def _on_device(kwargs):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
            for k, v in kwargs.items()}


@pytest.mark.parametrize("make,error,message", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(make, error, message):
    kwargs = _on_device(make())
    with pytest.raises(error, match=message):
        protokernels.nearest(**kwargs)


@pytest.mark.parametrize("k,error,message", [
    (0, ValueError, r"'k' must be in \[1, M\] = \[1, 70\], got 0"),
    (71, ValueError, r"'k' must be in \[1, M\]"),
    (65, ValueError, "above the fused kernel's limit of 64.*topk"),
    (2.0, TypeError, "'k' must be an int"),
])
def test_bad_k(k, error, message):
    with pytest.raises(error, match=message):
        protokernels.nearest_k(randn(4, 3), randn(70, 3), k)


@pytest.mark.parametrize("labels,error,message", [
    (lambda: (torch.zeros(4, 2, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)),
     ValueError, "'x_labels' must have shape"),
    (lambda: (torch.zeros(4, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)),
     ValueError, r"'y_labels' must have shape \(\.\.\., M\) with last dimension 5"),
    (lambda: (torch.zeros(4), torch.zeros(5, dtype=torch.int64)), TypeError,
     "'x_labels' must be an integer tensor"),
    (lambda: (torch.zeros(4, dtype=torch.int64), torch.zeros(5, dtype=torch.bool)), TypeError,
     "'y_labels' must be an integer tensor"),
    (lambda: (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)),
     ValueError, "batch dimensions of 'x_labels' must broadcast"),
    (lambda: (torch.zeros(4, dtype=torch.int64, device="meta"), torch.zeros(5, dtype=torch.int64)),
     ValueError, "'x_labels' must be on the same device"),
])
def test_bad_labels(labels, error, message):
    x_labels, y_labels = labels()
    x_labels = x_labels if x_labels.device.type == "meta" else x_labels.to(DEVICE)
    with pytest.raises(error, match=message):
        protokernels.nearest_by_label(randn(4, 3), x_labels, randn(5, 3), y_labels.to(DEVICE))


def test_nearest_both_needs_rows_on_both_sides():
    with pytest.raises(ValueError, match="N = 0"):
        protokernels.nearest_both(randn(0, 3), randn(5, 3))
    with pytest.raises(ValueError, match="M = 0"):
        protokernels.nearest_both(randn(4, 3), randn(0, 3))


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])  # CUDA: the FFMA and the Hopper search
def test_cuda_graph_capture(backend, precision):
    x, y = randn(2, 300, 64), randn(2, 200, 64)
    exclude = torch.randint(0, 200, (2, 300), device=DEVICE)
    protokernels.nearest(x, y, exclude=exclude, precision=precision)  # warm up (Triton compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist, idx = protokernels.nearest(x, y, exclude=exclude, precision=precision)
    x.copy_(randn(2, 300, 64))
    graph.replay()
    allowed = torch.arange(200, device=DEVICE) != exclude[..., None]
    assert_winners(x, y, dist, idx, allowed=allowed, precision=precision)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_more_than_2_to_the_31_pairs(backend):
    n, m = 70_000, 31_000  # N*M = 2.17e9: the (never written) distance matrix passes 2**31
    x, y = randn(n, 8, dtype=torch.float16), randn(m, 8, dtype=torch.float16)
    y[-1] = x[n // 2]  # the last prototype is an exact match for one row
    dist, idx = protokernels.nearest(x, y)
    assert idx[n // 2] == m - 1 and dist[n // 2] == 0
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=DEVICE)
    assert_winners(x[rows], y, dist[rows], idx[rows], dtype=torch.float16)



# CUDA's two tensor-core searches: the Hopper one (sm_90a: TMA, wgmma, x's 128 rows kept in shared
# memory, two consumer warpgroups taking the column tiles in turn, each with a ring of its own)
# and the portable one (mma.sync), which PROTOKERNELS_CUDA_PORTABLE=1 forces on a Hopper GPU. The
# shapes: several column tiles per consumer with rings that wrap (N 12801: 101 row blocks, 2
# column splits of 4 tiles; float32 D 256: 8 boxes of 128 bytes through 3 stages a ring), batches
# with a partial last tile, the deepest x that fits beside two 2-stage rings (float32 D 320, 10
# boxes) and one box more (D 352: the portable search in float32, Hopper's in the half types),
# depth tails inside a box (36, 360), column splits over few row blocks (N 130, M 3000), rows TMA
# cannot read (half D 36: 72 bytes, not a multiple of 16). float32 also at "tf32x3" (split TF32
# products): there the deepest x that fits is D 256 (two low boxes take the room of two of x's),
# and D 288 and deeper take the portable search. Several waves of row blocks (more than a GPU has
# SMs): 471 blocks of 3 column tiles, and 313 of 18.
HOPPER_SHAPES = [(1, 12801, 1000, 256), (3, 257, 650, 256), (1, 300, 400, 288), (1, 300, 400, 320),
                 (1, 300, 400, 352), (1, 300, 400, 360), (1, 130, 3000, 36), (3, 20000, 300, 40),
                 (1, 40000, 2200, 32)]
TENSOR_CORE_DTYPES = [(torch.float32, "tf32"), (torch.float32, "tf32x3"), (torch.float16, "tf32"),
                      (torch.bfloat16, "tf32")]


@pytest.mark.parametrize("dtype,precision", TENSOR_CORE_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=str)
def test_cuda_tensor_core_searches(shape, dtype, precision, portable):
    batch, n, m, d = shape
    x, y = randn(batch, n, d, dtype=dtype), randn(batch, m, d, dtype=dtype)
    exclude = torch.randint(0, m, (batch, n), device=DEVICE)
    with protokernels.use_backend("cuda"):
        dist, idx = protokernels.nearest(x, y, exclude=exclude, precision=precision)
        kernels = cuda_kernels_run(lambda: protokernels.nearest(x, y, precision=precision))
    allowed = torch.arange(m, device=DEVICE) != exclude[..., None]
    rows = torch.arange(0, n, max(1, n // 300), device=DEVICE)  # a float64 truth of 300 rows
    assert_winners(x[:, rows], y, dist[:, rows], idx[:, rows], allowed=allowed[:, rows],
                   dtype=dtype, precision=precision)
    hopper = hopper_build() and not portable and hopper_fits(x, "nearest", precision)
    assert_ran(kernels, "hopper_search_kernel", hopper)
    assert_ran(kernels, "tensor_search_kernel", not hopper)


@pytest.mark.parametrize("n", [257, 6000])
def test_cuda_hopper_search_shares_prototypes_across_batches(n, portable):
    """x (B, N, D) against one y (M, D) broadcast over the batches (a 0 batch stride): the Hopper
    search takes it as one batch of B N rows (csrc/hopper.cuh, fold_shared_batch). N 257: 7 row
    blocks, the columns split over blocks; N 6000: 141 row blocks, one split, whose blocks write
    the winners of the folded rows themselves."""
    x, y = randn(3, n, 64), randn(650, 64)
    with protokernels.use_backend("cuda"):
        dist, idx = protokernels.nearest(x, y, precision="tf32")
        kernels = cuda_kernels_run(lambda: protokernels.nearest(x, y, precision="tf32"))
    rows = torch.arange(0, n, max(1, n // 300), device=DEVICE)
    assert_winners(x[:, rows], y.expand(3, -1, -1), dist[:, rows], idx[:, rows],
                   precision="tf32")
    assert_ran(kernels, "hopper_search_kernel", hopper_build() and not portable)


@pytest.mark.parametrize("dtype,precision", TENSOR_CORE_DTYPES, ids=dtype_ids)
def test_cuda_hopper_search_writes_winners(dtype, precision, portable):
    """Where the Hopper search runs as one column split (y of one column tile here, or row blocks
    enough to fill the GPU) its blocks write each row's exact distance and index themselves
    (csrc/nearest.cu, write_winners), and no kernel reads x again; columns split over blocks meet
    in keys that a last kernel turns into the results. Rows of 6 elements at a stride of 8 end
    inside a 16-byte chunk."""
    hopper = hopper_build() and not portable
    for (n, m, d, stride), one_split in [((700, 100, 6, 8), True), ((300, 650, 64, 64), False)]:
        x, y = randn(2, n, stride, dtype=dtype)[..., :d], randn(2, m, stride, dtype=dtype)[..., :d]
        with protokernels.use_backend("cuda"):
            dist, idx = protokernels.nearest(x, y, precision=precision)
            kernels = cuda_kernels_run(lambda: protokernels.nearest(x, y, precision=precision))
        assert_winners(x, y, dist, idx, dtype=dtype, precision=precision)
        assert_ran(kernels, "hopper_search_kernel", hopper)
        assert_ran(kernels, "pair_distance_kernel", not (hopper and one_split))


@pytest.mark.parametrize("dtype,precision", TENSOR_CORE_DTYPES, ids=dtype_ids)
def test_cuda_tensor_core_searches_tie_at_zero(dtype, precision, portable):
    """x at a prototype that y holds three times (in three column tiles, and twice more inside the
    first tile's columns of one thread): their computed distances are the same rounding noise
    around 0, negative for some rows, where the Hopper search's packed keys rank without a clamp
    (csrc/nearest.cu); the smallest index wins, at the exact distance 0."""
    y = randn(700, 64, dtype=dtype)
    y[[8, 16, 300, 650]] = y[0].clone()  # 0, 8 and 16: the same thread's columns of tile 0
    x = y[torch.arange(0, 700, 7, device=DEVICE)].clone()
    x[::2] = y[0]
    with protokernels.use_backend("cuda"):
        dist, idx = protokernels.nearest(x, y, precision=precision)
    assert (idx[::2] == 0).all() and (dist[::2] == 0).all()
    assert_winners(x[1::2], y, dist[1::2], idx[1::2], dtype=dtype, precision=precision)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_cuda_tensor_core_searches_non_finite(precision, portable):
    """The Hopper search's folds: finite norms in whole tiles take the packed-key fold, a NaN or
    infinite row or column the general one (split products: always the general one); both rank
    as every backend does."""
    x, y = randn(1, 300, 64), randn(1, 700, 64)
    x[0, 7, 5], x[0, 9, 3], y[0, 400, 0] = float("nan"), INF, INF

    def both(x, y):
        with protokernels.use_backend("cuda"):
            found = protokernels.nearest(x, y, precision=precision)
        with protokernels.use_backend("reference"):
            return found, protokernels.nearest(x, y, precision=precision)

    (dist, idx), (ref_dist, ref_idx) = both(x, y)
    assert idx[0, [7, 9]].tolist() == ref_idx[0, [7, 9]].tolist() == [0, 0]
    assert dist[0, 7].isnan() and dist[0, 9] == INF
    finite = torch.ones(300, dtype=torch.bool, device=DEVICE)
    finite[[7, 9]] = False
    allowed = (torch.arange(700, device=DEVICE) != 400).expand(1, 298, 700)
    assert_winners(x[:, finite], y, dist[:, finite], idx[:, finite], allowed=allowed,
                   precision=precision)
    y[0, 500, 1] = float("nan")  # a NaN prototype wins every row with finite values
    (dist, idx), (ref_dist, ref_idx) = both(x, y)
    assert torch.equal(idx, ref_idx) and (idx[0, finite] == 500).all()


# Non-finite inputs (issue 15): every backend ranks a pair with a NaN row first, a pair with an
# infinite row after every finite distance, never lets padding win, and never returns an index
# outside [-1, M).

def test_nan_row_whose_only_candidate_is_excluded_gets_none(backend):
    x = torch.tensor([[float("nan"), 1.0]], device=DEVICE)
    y = torch.tensor([[1.0, 0.0]], device=DEVICE)
    dist, idx = protokernels.nearest(x, y, exclude=torch.tensor([0], device=DEVICE))
    assert idx.item() == -1 and dist.item() == INF
    dist, idx = protokernels.nearest_k(torch.cat([x, x]), torch.cat([y, y + 1]), 2,
                                       exclude=torch.tensor([0, 1], device=DEVICE))
    assert ((idx >= -1) & (idx < 2)).all()
    assert (idx[:, 1] == -1).all() and (idx[:, 0] == torch.tensor([1, 0], device=DEVICE)).all()
    d_same, i_same, d_other, i_other = protokernels.nearest_by_label(
        x, torch.tensor([0], device=DEVICE), y, torch.tensor([0], device=DEVICE))
    assert i_same.item() == 0 and d_same.isnan().item()
    assert i_other.item() == -1 and d_other.item() == INF


def test_an_infinitely_far_candidate_is_still_a_candidate(backend):
    x = torch.tensor([[-1.0, 0.0]], device=DEVICE)
    y = torch.tensor([[float("inf"), 0.0]], device=DEVICE)
    for precision in ("ieee", "tf32x3", "tf32"):
        dist, idx = protokernels.nearest(x, y, precision=precision)
        assert idx.item() == 0 and dist.item() == INF
    dist, idx = protokernels.dw_nearest(x[0], y.view(1, 1, 2))
    assert idx.item() == 0 and dist.item() == INF


def test_an_infinite_prototype_ranks_after_every_finite_one(backend):
    x = torch.tensor([[1.0, 0.0], [2.0, 3.0]], device=DEVICE)
    y = torch.tensor([[float("inf"), 0.0], [5.0, 0.0], [-float("inf"), 1.0]], device=DEVICE)
    dist, idx = protokernels.nearest(x, y)
    assert idx.tolist() == [1, 1] and dist.tolist() == [16.0, 18.0]
    dist, idx = protokernels.nearest_k(x, y, 3)
    assert idx[:, 0].tolist() == [1, 1] and (dist[:, 1:] == INF).all()
    assert sorted(idx[0, 1:].tolist()) == [0, 2]
    _, i_same, _, i_other = protokernels.nearest_by_label(
        x, torch.tensor([0, 1], device=DEVICE), y, torch.tensor([0, 0, 1], device=DEVICE))
    assert i_same.tolist() == [1, 2] and i_other.tolist() == [2, 1]
    row_dist, row_idx, col_dist, col_idx = protokernels.nearest_both(x, y)
    assert row_idx.tolist() == [1, 1] and col_idx[1].item() == 0 and col_dist[0] == INF
    _, idx = protokernels.dw_nearest(x, y[None])
    assert idx[:, 0].tolist() == [1, 1]


def test_empty_search_needs_no_k_in_range(backend):
    dist, idx = protokernels.nearest(randn(0, 4), randn(0, 4))
    assert dist.shape == idx.shape == (0,)
    dist, idx = protokernels.nearest_k(randn(2, 0, 4), randn(2, 0, 4), 3)
    assert dist.shape == idx.shape == (2, 0, 3)
