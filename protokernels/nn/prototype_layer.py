"""The case-based reasoning prototype network's prototype layer and objective
(case-based-reasoning-prototype-layer, §2, eq. 3-7): the squared distances of each encoded input
to m learned prototypes (the classifier's input), and the interpretability regularizers R1 (every
prototype near some encoded input, eq. 5) and R2 (every encoded input near some prototype, eq. 6),
both from one fused pass (protokernels.nearest_both), or all three from one distance matrix
(protokernels.prototype_layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from ..ops.nearest import nearest_both
from ..ops.prototype_layer import prototype_layer
from ..ops.sqdist import sqdist


def prototype_regularizers(z: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """(R1, R2) of encoded inputs z (N, dim) and prototypes (m, dim) (eq. 5 and 6), from one
    protokernels.nearest_both; 0 for an empty batch (nothing to be near)."""
    if z.shape[0] == 0:
        zero = prototypes.sum() * 0
        return zero, zero
    row_dist, _, col_dist, _ = nearest_both(z, prototypes)
    return col_dist.mean(), row_dist.mean()


class PrototypeLayer(nn.Module):
    """m prototypes in a `dim`-dimensional latent space. forward(z (N, dim)) -> (N, m) squared
    distances ||z_i - p_j||^2 (protokernels.sqdist). `regularizers(z)` -> (R1, R2):
    R1 = mean_j min_i ||p_j - z_i||^2, R2 = mean_i min_j ||z_i - p_j||^2 over the batch (the
    paper relaxes R1's minimum to the minibatch too), one search for both, without the (N, m)
    matrix. `with_regularizers(z)` -> (distances, R1, R2) from one distance kernel: the training
    step's form (forward and regularizers together, one backward)."""

    def __init__(self, dim: int, num_prototypes: int, device=None, dtype=None):
        super().__init__()
        _validate.settings("PrototypeLayer", ints=dict(dim=dim, num_prototypes=num_prototypes))
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, dim, device=device,
                                                  dtype=dtype))

    def _check(self, z: Tensor) -> None:
        _validate.feature_rows("PrototypeLayer", "z", z, self.prototypes.shape[1], "(N, dim)")

    def forward(self, z: Tensor) -> Tensor:
        self._check(z)
        return sqdist(z, self.prototypes.to(z.dtype))

    def regularizers(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self._check(z)
        return prototype_regularizers(z, self.prototypes.to(z.dtype))

    def with_regularizers(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check(z)
        return prototype_layer(z, self.prototypes.to(z.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.prototypes.shape[1]}, prototypes={self.prototypes.shape[0]}"


class CaseBasedLoss(nn.Module):
    """The four-term objective (eq. 7): cross-entropy of the classifier's logits (eq. 3)
    + lambda_rec * the mean squared reconstruction error per input (eq. 4, summed over features)
    + lambda_r1 * R1 + lambda_r2 * R2 (the paper uses 0.05 for all three).

    forward(logits, labels, reconstruction, x, r1, r2) -> loss, with (r1, r2) from
    PrototypeLayer.regularizers."""

    def __init__(self, lambda_rec: float = 0.05, lambda_r1: float = 0.05,
                 lambda_r2: float = 0.05):
        super().__init__()
        _validate.settings("CaseBasedLoss", nonnegative=dict(
            lambda_rec=lambda_rec, lambda_r1=lambda_r1, lambda_r2=lambda_r2))
        self.lambda_rec, self.lambda_r1, self.lambda_r2 = lambda_rec, lambda_r1, lambda_r2

    def forward(self, logits: Tensor, labels: Tensor, reconstruction: Tensor, x: Tensor,
                r1: Tensor, r2: Tensor) -> Tensor:
        if reconstruction.shape != x.shape:
            raise ValueError(f"CaseBasedLoss: 'reconstruction' must have x's shape "
                             f"{tuple(x.shape)}, got {tuple(reconstruction.shape)}")
        rec = (reconstruction - x).square().flatten(1).sum(1).mean() if x.shape[0] else \
            reconstruction.sum() * 0
        return (F.cross_entropy(logits, labels) + self.lambda_rec * rec + self.lambda_r1 * r1
                + self.lambda_r2 * r2)

    def extra_repr(self) -> str:
        return (f"lambda_rec={self.lambda_rec}, lambda_r1={self.lambda_r1}, "
                f"lambda_r2={self.lambda_r2}")
