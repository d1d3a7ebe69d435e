"""dpnp_loss benchmark cases: the op against DPNP's loss written naively in PyTorch (the (N, M)
and (M, M) distance matrices, masked argmins, a cross-entropy, gathers and norms), forward and
training step, at the prototype heads' sizes (benchmarks/heads.py's DPNP rows, where the head's
step is measured). Interface as benchmarks/sqdist.py."""
from __future__ import annotations

import protokernels

from . import heads

OP = "dpnp_loss"
BASELINES, make_inputs, work, naive, model_cases = heads.op_benchmark("dpnp")
cases = model_cases


def fused(sizes, x, labels, protos, plabels):
    return protokernels.dpnp_loss(x, labels, protos)
