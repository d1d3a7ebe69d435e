"""The loss ops' reduction, written once for the reference backend (the kernels' form:
triton_kernels/_common.finish_sum, csrc/losses.cuh)."""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean")


def reduce_values(values: torch.Tensor, counted: torch.Tensor, reduction: str):
    """(loss, scale) of per-sample values (0 where a sample does not count): the values ("none"),
    their sum, or their mean over the counted samples (0 when none count); scale is what the
    backward multiplies the per-sample derivatives by (1, or 1 / count for "mean")."""
    if reduction == "none":
        return values, values.new_ones(())
    if reduction == "sum":
        return values.sum(), values.new_ones(())
    scale = counted.sum().clamp_min(1).to(values.dtype).reciprocal()
    return values.sum() * scale, scale
