"""sinkhorn_prototype_loss benchmark cases: the op against the Sinkhorn prototypes' loss written
naively in PyTorch (F.normalize twice, the product, SwAV's three-iteration loop, log_softmax),
forward and training step, at the prototype heads' sizes (benchmarks/heads.py's Sinkhorn rows,
where the head's step is measured). Interface as benchmarks/sqdist.py."""
from __future__ import annotations

import protokernels

from . import heads

OP = "sinkhorn_prototype_loss"
BASELINES, make_inputs, work, naive, model_cases = heads.op_benchmark("sinkhorn")
cases = model_cases


def fused(sizes, x, labels, protos, plabels):
    return protokernels.sinkhorn_prototype_loss(x, protos, temperature=0.1, eps=0.05,
                                                n_iters=3)[0]
