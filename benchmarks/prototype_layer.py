"""prototype_layer benchmark cases: the op (distances, R1, R2 from one distance kernel) against the
case-based layer written naively in PyTorch (the (N, M) matrix by the expanded formula, its row
and column minima), forward and training step, at the prototype heads' sizes
(benchmarks/heads.py's case-based rows, where the head's step is measured). Interface as
benchmarks/sqdist.py."""
from __future__ import annotations

import protokernels

from . import heads

OP = "prototype_layer"
BASELINES, make_inputs, work, naive, model_cases = heads.op_benchmark("case_based")
cases = model_cases


def fused(sizes, x, labels, protos, plabels):
    return heads.case_based(*protokernels.prototype_layer(x, protos))
