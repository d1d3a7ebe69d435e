"""sinkhorn benchmark cases: SwAV's codes (equipartition Sinkhorn) against SwAV's own code (the
naive formula users copy) and a log-domain version under torch.compile. Interface as
benchmarks/sqdist.py. Input: scores (B, K). Forward only: the codes carry no gradient."""
from __future__ import annotations

import torch

import protokernels

OP = "sinkhorn"
MODES = ("fwd",)
EPS = 0.05


def swav_sinkhorn(scores, eps, n_iters):
    """SwAV's distributed_sinkhorn on one process (github.com/facebookresearch/swav), verbatim."""
    Q = torch.exp(scores / eps).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iters):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def naive(sizes, scores):
    return swav_sinkhorn(scores, EPS, sizes["iters"])


def log_domain(sizes, scores):
    """The same iteration on log-potentials (what one writes to avoid the overflow)."""
    z = scores / EPS
    u = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
    for _ in range(sizes["iters"]):
        v = -torch.logsumexp(z + u[:, None], dim=0)
        u = -torch.logsumexp(z + v[None, :], dim=1)
    return torch.exp(z + u[:, None] + v[None, :])


BASELINES = {"log-domain compiled": torch.compile(log_domain)}


def fused(sizes, scores):
    return protokernels.sinkhorn(scores, eps=EPS, n_iters=sizes["iters"])


def cases(quick: bool):
    """SwAV's size (B 4096, K 3000, 3 iterations) and a large one (B 65536, K 16384, 10)."""
    if quick:
        return [("fp32", "highest", torch.float32, {"B": 256, "K": 300, "iters": 3})]
    return [("fp32", "highest", torch.float32, {"B": 4096, "K": 3000, "iters": 3}),
            ("fp32", "highest", torch.float32, {"B": 65536, "K": 16384, "iters": 10}),
            ("bf16", "highest", torch.bfloat16, {"B": 65536, "K": 16384, "iters": 10})]


def model_cases(quick: bool):
    """SwAV's batches: B 256 to 4096 samples against K 3000 prototypes, 3 iterations."""
    batches = [64] if quick else [256, 1024, 4096]
    return [(f"B{b} K3000", "highest", torch.float32, {"B": b, "K": 300 if quick else 3000,
                                                       "iters": 3}) for b in batches]


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(sizes["B"], 128, device=device,
                                                  generator=generator), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(sizes["K"], 128, device=device,
                                                           generator=generator), dim=1)
    return ((x @ prototypes.t()).to(dtype),)  # cosine similarities, as in SwAV


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): one read of the scores per iteration, one more and the write of the
    codes (the floor of a one-pass-per-iteration schedule; exp counted as no FLOPs)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return 0, size * sizes["B"] * sizes["K"] * (sizes["iters"] + 2)
