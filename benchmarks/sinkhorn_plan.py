"""sinkhorn_plan benchmark cases: the entropic OT plan against a log-domain loop (eager and under
torch.compile) and POT's ot.sinkhorn with its torch backend (scaling and log forms; the anchor, a
benchmark-only extra: `pip install protokernels[bench]`). Interface as benchmarks/sqdist.py.
Input: cost (B, K). POT runs all n iterations (stopThr=0)."""
from __future__ import annotations

import os
import warnings

import torch

import protokernels

OP = "sinkhorn_plan"
# Forward only here: the backward of 100 iterations at 4096 x 4096 takes the naive autograd 13 GB;
# scripts/profile_sinkhorn.py times the backward.
MODES = ("fwd",)
EPS = 0.05


def naive(sizes, cost):
    """Log-domain Sinkhorn with uniform marginals, columns then rows, n times."""
    b, k = cost.shape
    z = -cost / EPS
    log_r, log_c = -torch.log(torch.tensor(float(b))), -torch.log(torch.tensor(float(k)))
    u = torch.zeros(b, device=cost.device, dtype=cost.dtype)
    for _ in range(sizes["iters"]):
        v = log_c - torch.logsumexp(z + u[:, None], dim=0)
        u = log_r - torch.logsumexp(z + v[None, :], dim=1)
    return torch.exp(z + u[:, None] + v[None, :])


def _pot(method):
    def plan(sizes, cost):
        import ot
        b, k = cost.shape
        r = torch.full((b,), 1 / b, device=cost.device, dtype=cost.dtype)
        c = torch.full((k,), 1 / k, device=cost.device, dtype=cost.dtype)
        with warnings.catch_warnings():  # "did not converge": stopThr=0 asks for all iterations
            warnings.simplefilter("ignore")
            return ot.sinkhorn(r, c, cost, EPS, method=method, numItermax=sizes["iters"],
                               stopThr=0)
    return plan


# POT imports JAX where it is installed, and JAX takes most of the GPU's memory unless told not to.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:  # the anchor is a benchmark-only extra: without it the case runs without those rows
    import ot  # noqa: F401
    BASELINES = {"POT sinkhorn": _pot("sinkhorn"), "POT sinkhorn_log": _pot("sinkhorn_log")}
except ImportError:
    BASELINES = {}


def fused(sizes, cost):
    return protokernels.sinkhorn_plan(cost, eps=EPS, n_iters=sizes["iters"])


def cases(quick: bool):
    """4096 x 4096, 100 iterations."""
    sizes = {"B": 128, "K": 96, "iters": 20} if quick else {"B": 4096, "K": 4096, "iters": 100}
    return [("fp32", "highest", torch.float32, sizes)]


def make_inputs(sizes, dtype, device):
    """Squared distances between two random point clouds, scaled to [0, 1]."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sizes["B"], 16, device=device, generator=generator)
    y = torch.randn(sizes["K"], 16, device=device, generator=generator) + 0.5
    cost = torch.cdist(x, y).square()
    return ((cost / cost.max()).to(dtype),)


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): one read of the cost per iteration, one more and the plan's write."""
    size = torch.tensor([], dtype=dtype).element_size()
    return 0, size * sizes["B"] * sizes["K"] * (sizes["iters"] + 2)
