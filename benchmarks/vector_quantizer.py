"""VectorQuantizer training-step cases: forward (search, lookup, commitment loss, EMA update of
the codebooks) and backward, protokernels.nn.VectorQuantizer against the same step in plain
PyTorch and against vector-quantize-pytorch's VectorQuantize (the anchor; a benchmark-only extra,
`pip install protokernels[bench]`).

Interface as benchmarks/sqdist.py. Input: x (B, 1024, dim). Every runner returns quantized + loss
first, so that fwd+bwd back-propagates both the straight-through and the commitment gradient.
The modules are created on first use per case and kept (their EMA state carries over calls).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from protokernels.nn import VectorQuantizer

OP = "vector_quantizer"
DECAY, COMMITMENT = 0.99, 0.25
_modules: dict = {}


def _module(kind, sizes, x, make):
    key = (kind, tuple(sizes.items()), x.dtype, x.device)
    if key not in _modules:
        torch.manual_seed(0)
        _modules[key] = make().to(x.device).train()
    return _modules[key]


class _PlainEmaVQ(torch.nn.Module):
    """The step as plain PyTorch: (G, N, K) distances, argmin, gather, one-hot EMA statistics."""

    def __init__(self, dim, size, groups):
        super().__init__()
        depth = dim // groups
        self.register_buffer("codebook", torch.randn(groups, size, depth))
        self.register_buffer("count", torch.ones(groups, size))
        self.register_buffer("total", self.codebook.clone())

    def forward(self, x):
        groups, size, depth = self.codebook.shape
        flat = x.reshape(-1, groups, depth).transpose(0, 1)  # (G, N, Dg)
        dist = torch.baddbmm(self.codebook.square().sum(-1).unsqueeze(1), flat,
                             self.codebook.mT, alpha=-2)
        idx = dist.argmin(-1)
        quantized = self.codebook.gather(1, idx[..., None].expand(-1, -1, depth))
        loss = COMMITMENT * F.mse_loss(flat, quantized)
        with torch.no_grad():
            onehot = F.one_hot(idx, size).to(flat.dtype)  # (G, N, K)
            self.count.lerp_(onehot.sum(1), 1 - DECAY)
            self.total.lerp_(onehot.mT @ flat, 1 - DECAY)
            n = self.count.sum(-1, keepdim=True)
            smoothed = (self.count + 1e-5) / (n + size * 1e-5) * n
            self.codebook.copy_(self.total / smoothed[..., None])
        out = flat + (quantized - flat).detach()
        return out.transpose(0, 1).reshape(x.shape), idx.t(), loss


def naive(sizes, x):
    vq = _module("plain", sizes, x, lambda: _PlainEmaVQ(sizes["dim"], sizes["K"], sizes["G"]))
    quantized, indices, loss = vq(x)
    return quantized + loss, indices


def _vector_quantize_pytorch(sizes, x):
    from vector_quantize_pytorch import VectorQuantize
    groups = sizes["G"]
    vq = _module("vector-quantize-pytorch", sizes, x, lambda: VectorQuantize(
        dim=sizes["dim"], codebook_size=sizes["K"], heads=groups,
        separate_codebook_per_head=groups > 1, codebook_dim=sizes["dim"] // groups,
        decay=DECAY, commitment_weight=COMMITMENT))
    quantized, indices, loss = vq(x)
    return quantized + loss, indices


try:  # the anchor is a benchmark-only extra: without it the case runs without that row
    import vector_quantize_pytorch  # noqa: F401
    BASELINES = {"vector-quantize-pytorch": _vector_quantize_pytorch}
except ImportError:
    BASELINES = {}


def fused(sizes, x):
    vq = _module("protokernels", sizes, x, lambda: VectorQuantizer(
        sizes["dim"], sizes["K"], sizes["G"], decay=DECAY, commitment_weight=COMMITMENT))
    quantized, indices, loss = vq(x)
    return quantized + loss, indices


def _sizes(n, dim, g, k):
    return {"N": n, "dim": dim, "G": g, "K": k}


def cases(quick: bool):
    """The large sizes (README, "Speed": 65536 vectors, dim 512, 8 groups, K 1024; the issue's
    dim 256, K 8192, one group), tf32."""
    if quick:
        grouped, plain = _sizes(2048, 64, 8, 64), _sizes(2048, 32, 1, 128)
    else:
        grouped, plain = _sizes(65536, 512, 8, 1024), _sizes(65536, 256, 1, 8192)
    return [("G8 tf32", "high", torch.float32, grouped), ("G1 tf32", "high", torch.float32, plain)]


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sizes["N"] // 1024, 1024, sizes["dim"], device=device, dtype=dtype,
                    generator=generator)
    return (x,)


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): the search's products and the statistics; reading x and writing the
    quantized vectors (backward: reading and writing one more x-sized tensor)."""
    n, dim, k = sizes["N"], sizes["dim"], sizes["K"]
    size = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * n * k * dim
    moved = size * 2 * n * dim
    if backward:
        moved += size * 2 * n * dim
    return flops, moved
