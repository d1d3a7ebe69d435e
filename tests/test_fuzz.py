"""Standing fuzz test: random valid inputs of every op in every backend against a float64 ground
truth written here, with NaN and infinity injected, and one-argument-at-a-time invalid inputs that
must raise ValueError/TypeError naming the argument.

Deterministic by seed. PROTOKERNELS_FUZZ_CASES sets the cases per op (default 12: the short CI
run on the reference and Triton's interpreter; scripts/gpu_check.sh runs 200 on every backend).
Shapes include 0, 1, primes, broadcast batches and strided views; dtypes every float type and
float32 precision.
"""
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import protokernels
from conftest import DEVICE, log_domain, relative_error, tolerance

CASES = int(os.environ.get("PROTOKERNELS_FUZZ_CASES", "12"))
SIZES = [0, 1, 2, 3, 5, 7, 13, 17, 31, 37]
DTYPES = [(torch.float32, "ieee"), (torch.float32, "tf32x3"), (torch.float32, "tf32"),
          (torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float64, "ieee")]


def _runnable(op, dtype):
    """The backends that run here and take this dtype (their capabilities)."""
    names = []
    for name, status in protokernels.available_backends().items():
        if not status.available or (name == "cuda" and DEVICE.type != "cuda"):
            continue
        if not protokernels._backend.capabilities(op, name).not_supported_reasons(dtype):
            names.append(name)
    return names


def _tensor(rng, shape, dtype, strided):
    """Random values; `strided`: a non-contiguous view with the same shape."""
    if strided and len(shape) >= 1 and all(shape):
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=rng, dtype=torch.float64)
        t = base[..., ::2]
    else:
        t = torch.randn(*shape, generator=rng, dtype=torch.float64)
    return t.to(DEVICE).to(dtype)


def _inject(rng_py, t, what):
    """Put a NaN or an infinity at a random place (in place; no-op for an empty tensor)."""
    if t.numel() and what:
        index = tuple(rng_py.randrange(n) for n in t.shape)
        t[index] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[what]
    return t


def _cases(op):
    rng = torch.Generator().manual_seed(hash(op) % 2**31)
    rng_py = random.Random(op)
    for case in range(CASES):
        dtype, precision = DTYPES[case % len(DTYPES)]
        yield case, rng, rng_py, dtype, precision


def _truth_sqdist(x, y):
    return (x.double().unsqueeze(-2) - y.double().unsqueeze(-3)).square().sum(-1)


def test_fuzz_sqdist():
    for case, rng, rng_py, dtype, precision in _cases("sqdist"):
        n, m, d = (rng_py.choice(SIZES) for _ in range(3))
        batch = rng_py.choice([(), (2,), (3, 1)])
        x = _tensor(rng, batch + (n, d), dtype, rng_py.random() < 0.3)
        y = _tensor(rng, (m, d), dtype, rng_py.random() < 0.3)  # broadcast over x's batch
        nan = rng_py.random() < 0.3 and x.numel() > 0
        if nan:
            x = x.clone()
            _inject(rng_py, x, "nan")
        truth = _truth_sqdist(x, y)
        for backend in _runnable("sqdist", dtype):
            with protokernels.use_backend(backend):
                out = protokernels.sqdist(x, y, precision=precision)
            where = f"case {case} {backend} {dtype} {precision} x {tuple(x.shape)} y {tuple(y.shape)}"
            assert out.shape == truth.shape and out.dtype == dtype, where
            # NaN in, NaN out: every truly NaN distance is NaN; the rest finite and close.
            assert out.isnan()[truth.isnan()].all(), where
            keep = ~truth.isnan().any(-1, keepdim=True).expand_as(truth)
            scale = (x.double().square().sum(-1, keepdim=True)
                     + y.double().square().sum(-1).unsqueeze(-2))
            error = (out.double() - truth).abs()[keep]
            bound = tolerance(dtype, precision) * 4 * scale.expand_as(truth)[keep] + 1e-30
            assert (error <= bound).all(), where


def _check_winners(x, y, dist, idx, allowed, where):
    """idx in [-1, M), allowed, the best finite distance (or a NaN / infinite pair as ranked),
    dist exact for it."""
    m = y.shape[-2]
    truth = _truth_sqdist(x, y)
    assert ((idx >= -1) & (idx < m)).all(), where
    x_nan = x.double().isnan().any(-1, keepdim=True)
    y_nan = y.double().isnan().any(-1).unsqueeze(-2)
    x_inf = x.double().isinf().any(-1, keepdim=True)
    y_inf = y.double().isinf().any(-1).unsqueeze(-2)
    rank = torch.where(x_nan | y_nan, -math.inf, torch.where(x_inf | y_inf, 1e300, truth))
    rank = rank.masked_fill(~allowed, math.inf)
    best = rank.min(-1).values
    found = idx >= 0
    assert torch.equal(found, best < math.inf), where
    chosen = rank.gather(-1, idx.clamp_min(0)[..., None])[..., 0]
    norms = lambda t: torch.nan_to_num(t.double().square().sum(-1), nan=0.0, posinf=0.0)  # noqa
    slack = 1e-2 * (norms(x) + norms(y).amax(-1, keepdim=True))
    finite = found & torch.isfinite(best) & (best < 1e300)
    assert ((chosen - best).abs()[finite] <= slack.expand_as(best)[finite] + 1e-6).all(), where
    assert (chosen[found & (best == -math.inf)] == -math.inf).all(), where  # NaN ranks first
    exact = truth.gather(-1, idx.clamp_min(0)[..., None])[..., 0]
    finite_exact = found & torch.isfinite(exact)
    assert relative_error(dist[finite_exact], exact[finite_exact]) <= 1e-5, where
    assert (dist[~found] == math.inf).all(), where
    assert dist[found & x_nan[..., 0].expand_as(found)].isnan().all(), where


@pytest.mark.parametrize("op", ["nearest", "nearest_k", "nearest_by_label", "nearest_both",
                                "dw_nearest"])
def test_fuzz_nearest_family(op):
    for case, rng, rng_py, dtype, precision in _cases(op):
        n, m = rng_py.choice(SIZES[1:]), rng_py.choice(SIZES[1:])
        d = rng_py.choice([1, 2, 7, 33])
        x = _tensor(rng, (n, d), dtype, rng_py.random() < 0.3).clone()
        y = _tensor(rng, (m, d), dtype, rng_py.random() < 0.3).clone()
        for t in (x, y):
            _inject(rng_py, t, rng_py.choice([None, None, "nan", "inf", "-inf"]))
        exclude = torch.randint(0, m, (n,), generator=rng).to(DEVICE)
        k = rng_py.randint(1, min(m, 5))
        x_labels = torch.randint(0, 3, (n,), generator=rng).to(DEVICE)
        y_labels = torch.randint(0, 3, (m,), generator=rng).to(DEVICE)
        for backend in _runnable(op, dtype):
            where = f"case {case} {op} {backend} {dtype} {precision} n {n} m {m} d {d}"
            with protokernels.use_backend(backend):
                if op == "nearest":
                    dist, idx = protokernels.nearest(x, y, exclude=exclude, precision=precision)
                    allowed = torch.arange(m, device=DEVICE) != exclude[:, None]
                    _check_winners(x, y, dist, idx, allowed, where)
                elif op == "nearest_k":
                    dist, idx = protokernels.nearest_k(x, y, k, precision=precision)
                    assert ((idx >= -1) & (idx < m)).all(), where
                    allowed = torch.ones(n, m, dtype=torch.bool, device=DEVICE)
                    _check_winners(x, y, dist[:, 0], idx[:, 0], allowed, where)
                elif op == "nearest_by_label":
                    d_same, i_same, d_other, i_other = protokernels.nearest_by_label(
                        x, x_labels, y, y_labels, precision=precision)
                    same = x_labels[:, None] == y_labels[None, :]
                    _check_winners(x, y, d_same, i_same, same, where)
                    _check_winners(x, y, d_other, i_other, ~same, where)
                elif op == "nearest_both":
                    row_dist, row_idx, col_dist, col_idx = protokernels.nearest_both(
                        x, y, precision=precision)
                    everything = torch.ones(n, m, dtype=torch.bool, device=DEVICE)
                    _check_winners(x, y, row_dist, row_idx, everything, where)
                    _check_winners(y, x, col_dist, col_idx, everything.t(), where)
                else:  # dw_nearest, one group: nearest of x against its codebook
                    dist, idx = protokernels.dw_nearest(x, y[None], precision=precision)
                    allowed = torch.ones(n, m, dtype=torch.bool, device=DEVICE)
                    _check_winners(x, y, dist[:, 0], idx[:, 0], allowed, where)


def test_fuzz_codebook_ops():
    for case, rng, rng_py, dtype, _ in _cases("codebook"):
        n, groups, size, depth = (rng_py.choice(SIZES[:6]) for _ in range(4))
        size = max(size, 1)
        books = _tensor(rng, (groups, size, depth), dtype, False)
        idx = torch.randint(0, size, (n, groups), generator=rng).to(DEVICE)
        x = _tensor(rng, (n, groups * depth), dtype, rng_py.random() < 0.3)
        for backend in _runnable("codebook_lookup", dtype):
            where = f"case {case} {backend} {dtype} n {n} G {groups} K {size} Dg {depth}"
            with protokernels.use_backend(backend):
                out = protokernels.codebook_lookup(idx, books)
                counts, sums = protokernels.codebook_stats(x, idx, size)
            expected = books[torch.arange(groups, device=DEVICE), idx].reshape(n, groups * depth)
            assert torch.equal(out, expected), where
            # With G = 0 groups x has no features, so the depth it implies is 0 too.
            x_depth = depth if groups else 0
            truth_sums = torch.zeros(groups, size, x_depth, dtype=torch.float64, device=DEVICE)
            truth_counts = torch.zeros(groups, size, dtype=torch.long, device=DEVICE)
            grouped = x.double().view(n, groups, x_depth)
            for g in range(groups):
                truth_sums[g].index_add_(0, idx[:, g], grouped[:, g])
                truth_counts[g] = torch.bincount(idx[:, g], minlength=size)
            assert torch.equal(counts, truth_counts), where
            assert relative_error(sums, truth_sums) <= tolerance(dtype), where


def test_fuzz_sinkhorn():
    for case, rng, rng_py, dtype, _ in _cases("sinkhorn"):
        if dtype == torch.float16:
            continue  # scores / eps of 20 overflow no float16 kernel; covered by test_sinkhorn
        b, k = rng_py.choice(SIZES[1:]), rng_py.choice(SIZES[1:])
        eps = rng_py.choice([0.05, 0.5, 1e-3])
        iters = rng_py.randint(1, 6)
        scores = _tensor(rng, (b, k), dtype, rng_py.random() < 0.3).clone()
        nan = rng_py.random() < 0.2
        if nan:
            _inject(rng_py, scores, "nan")
        s = scores.double() / eps
        truth = log_domain(s, torch.zeros(b, dtype=torch.float64, device=DEVICE),
                            torch.full((k,), math.log(b / k), dtype=torch.float64, device=DEVICE),
                            iters)
        truth = truth / truth.sum(1, keepdim=True)
        for backend in _runnable("sinkhorn", dtype):
            where = f"case {case} {backend} {dtype} b {b} k {k} eps {eps} iters {iters}"
            with protokernels.use_backend(backend):
                codes = protokernels.sinkhorn(scores, eps=eps, n_iters=iters)
            if nan:
                assert codes.isnan().any(), where  # NaN in, NaN out
            else:
                assert torch.isfinite(codes).all(), where
                assert relative_error(codes, truth) <= max(tolerance(dtype), 1e-4), where


def test_fuzz_kp_conv():
    for case, rng, rng_py, dtype, precision in _cases("kp_conv"):
        b, c, p = rng_py.choice([1, 2]), rng_py.choice([1, 3, 5]), rng_py.choice([1, 2, 7])
        h, w = rng_py.choice([1, 4, 7]), rng_py.choice([1, 5, 8])
        kh, kw = rng_py.randint(1, h), rng_py.randint(1, w)
        padding = rng_py.choice([0, 1])
        x = _tensor(rng, (b, c, h, w), dtype, rng_py.random() < 0.3)
        weight = _tensor(rng, (p, c, kh, kw), dtype, False)
        cols = F.unfold(x.double(), (kh, kw), padding=padding)
        truth = (cols.unsqueeze(1) - weight.double().flatten(1).unsqueeze(-1)).square().sum(2)
        truth = truth.view(b, p, h + 2 * padding - kh + 1, w + 2 * padding - kw + 1)
        for backend in _runnable("kp_conv2d", dtype):
            where = f"case {case} {backend} {dtype} {precision} x {tuple(x.shape)} w {(p, c, kh, kw)}"
            with protokernels.use_backend(backend):
                out = protokernels.kp_conv2d(x, weight, padding=padding, precision=precision)
            scale = truth.abs().amax() + 1.0
            assert (out.double() - truth).abs().max() <= 8 * tolerance(dtype, precision) * scale, \
                where


# One argument at a time wrong: the error is a ValueError/TypeError naming that argument.
def _valid():
    x, y = torch.randn(5, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    books = torch.randn(2, 4, 3, device=DEVICE)
    return {
        "sqdist": (protokernels.sqdist, dict(x=x, y=y)),
        "nearest": (protokernels.nearest, dict(x=x, y=y)),
        "nearest_k": (protokernels.nearest_k, dict(x=x, y=y, k=2)),
        "dw_nearest": (protokernels.dw_nearest, dict(x=torch.randn(5, 6, device=DEVICE),
                                                     codebooks=books)),
        "codebook_lookup": (protokernels.codebook_lookup,
                            dict(idx=torch.zeros(5, 2, dtype=torch.int64, device=DEVICE),
                                 codebooks=books)),
        "kp_conv2d": (protokernels.kp_conv2d, dict(x=torch.randn(1, 2, 5, 5, device=DEVICE),
                                                   w=torch.randn(3, 2, 3, 3, device=DEVICE))),
        "sinkhorn": (protokernels.sinkhorn, dict(scores=torch.randn(5, 4, device=DEVICE))),
        "sinkhorn_plan": (protokernels.sinkhorn_plan, dict(cost=torch.rand(5, 4, device=DEVICE),
                                                           eps=0.1)),
    }


_MUTATIONS = [
    ("an int tensor", lambda v: v.to(torch.int32) if v.is_floating_point() else v.float()),
    ("a complex tensor", lambda v: v.to(torch.complex64) if v.is_floating_point() else None),
    ("flattened to 1-D", lambda v: v.flatten() if v.dim() >= 2 else None),
    ("a list", lambda v: v.tolist()),
    ("on the meta device", lambda v: v.to("meta")),
    ("a bad number", lambda v: -1),
]


@pytest.mark.parametrize("op", list(_valid()))
def test_fuzz_invalid_arguments_are_named(op):
    function, valid = _valid()[op]
    tensors = sum(isinstance(v, torch.Tensor) for v in valid.values())
    for name, value in valid.items():
        for label, mutate in _MUTATIONS:
            if label == "on the meta device" and tensors < 2:
                continue  # a lone tensor may live on any device
            if isinstance(value, torch.Tensor):
                if label == "a bad number":
                    continue
                bad = mutate(value)
            elif label == "a bad number":
                bad = -1 if isinstance(value, (int, float)) else None
            else:
                continue
            if bad is None:
                continue
            with pytest.raises((ValueError, TypeError)) as error:
                function(**{**valid, name: bad})
            assert f"'{name}'" in str(error.value), (op, name, label, str(error.value))
