"""The numeric rules, written once for every backend.

- float64 stays float64 (products, sums and returned distances); every other floating dtype
  (float16, bfloat16, float32) accumulates in float32, and distances of the nearest family come
  back in that accumulate dtype.
- Squared distances over at most DIRECT_DEPTH features are formed directly as sum((x - y)^2):
  the expanded ||x||^2 - 2 x.y + ||y||^2 cancels where x ~ y (sqdist of 1x1 at D = 1 came out
  1.1e-5 from float64 under "highest", over its 1e-5 bound), and tensor cores would pad such a
  depth to 16 anyway.
- Sinkhorn clamps scores / eps to +-SCORE_LIMIT: an infinite score then acts as an overwhelming
  finite one (its row's mass goes to its column) instead of inf - inf = NaN in every potential;
  NaN still propagates. The limit leaves room for the potentials' sums in float32.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and products of `dtype` inputs are formed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


DIRECT_DEPTH = 8
SCORE_LIMIT = 1e30
