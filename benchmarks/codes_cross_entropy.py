"""codes_cross_entropy benchmark cases: the op against SwAV's loss in PyTorch,
-(codes * log_softmax(scores / T)).sum(1).mean(), forward and forward+backward, at SwAV's
batch sizes (B 256-4096, K 3000 prototypes) with Sinkhorn-like codes (rows summing to 1).
Interface as benchmarks/sqdist.py."""
from __future__ import annotations

import torch

import protokernels

OP = "codes_cross_entropy"
TEMPERATURE = 0.1
BASELINES: dict = {}


def naive(sizes, scores, codes):
    return -(codes * torch.log_softmax(scores / TEMPERATURE, dim=1)).sum(1).mean()


def fused(sizes, scores, codes):
    return protokernels.codes_cross_entropy(scores, codes, temperature=TEMPERATURE)


def _case(b, k):
    return (f"B{b} K{k}", "high", torch.float32, {"B": b, "K": k})


def model_cases(quick: bool):
    """SwAV's loss per batch: B 256-4096 samples against K 3000 prototypes."""
    return [_case(64, 100)] if quick else [_case(b, 3000) for b in (256, 1024, 4096)]


def cases(quick: bool):
    """SwAV's largest batch of the in-model grid (B 4096, K 3000)."""
    return [_case(64, 100)] if quick else [_case(4096, 3000)]


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(sizes["B"], sizes["K"], device=device, dtype=dtype, generator=generator)
    codes = torch.softmax(torch.randn(sizes["B"], sizes["K"], device=device, dtype=dtype,
                                      generator=generator) * 3, dim=1)
    return scores, codes


def work(sizes, dtype, backward: bool):
    """(FLOPs, minimum bytes): ~5 per element; read scores and codes (and write the gradient)."""
    elements = sizes["B"] * sizes["K"]
    size = torch.tensor([], dtype=dtype).element_size()
    return 5 * elements, size * elements * (3 if backward else 2)
