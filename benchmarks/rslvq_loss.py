"""rslvq_loss benchmark cases: the op against RSLVQ written naively in PyTorch (the (N, M) distance
matrix, two log-sum-exps), forward and training step, at the prototype heads' sizes
(benchmarks/heads.py's RSLVQ rows, where the module's step is measured). Interface as
benchmarks/sqdist.py."""
from __future__ import annotations

import protokernels

from . import heads

OP = "rslvq_loss"
BASELINES, make_inputs, work, naive, model_cases = heads.op_benchmark("rslvq")
cases = model_cases


def fused(sizes, x, labels, protos, plabels):
    return protokernels.rslvq_loss(x, labels, protos, plabels, sigma=1.0)
