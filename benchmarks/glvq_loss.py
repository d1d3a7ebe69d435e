"""glvq_loss benchmark cases: the op against GLVQ written naively in PyTorch (the (N, M) distance
matrix, masked minima, the transfer), forward and training step, at the prototype heads' sizes
(benchmarks/heads.py's GLVQ rows, where the module's step is measured). Interface as
benchmarks/sqdist.py."""
from __future__ import annotations

import protokernels

from . import heads

OP = "glvq_loss"
BASELINES, make_inputs, work, naive, model_cases = heads.op_benchmark("glvq")
cases = model_cases


def fused(sizes, x, labels, protos, plabels):
    return protokernels.glvq_loss(x, labels, protos, plabels, transfer="sigmoid", beta=5.0)
