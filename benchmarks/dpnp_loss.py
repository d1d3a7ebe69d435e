"""dpnp_loss benchmark cases: the op against DPNP's loss written naively in PyTorch (the (N, M)
and (M, M) distance matrices, masked argmins, a cross-entropy, gathers and norms), forward and
training step, at the prototype heads' sizes (benchmarks/heads.py's DPNP rows, where the head's
step is measured). Interface as benchmarks/sqdist.py."""
from __future__ import annotations

import protokernels

from . import heads

OP = "dpnp_loss"
BASELINES: dict = {}
make_inputs, work = heads.make_inputs, heads.work


def naive(sizes, x, labels, protos, plabels):
    return heads.dpnp_naive(x, labels, protos, plabels)


def fused(sizes, x, labels, protos, plabels):
    return protokernels.dpnp_loss(x, labels, protos)


model_cases = cases = heads.rows_of("dpnp")
