"""Deep positive-negative prototypes (dpnp-positive-negative-prototypes, §IV, eq. 5-10): one
set of class prototypes serves as the classifier's weights (positive prototypes) and, for the
other classes, as negative prototypes: the nearest rival of each sample (eq. 6) and of each
prototype (eq. 8) push away. The loss is protokernels.dpnp_loss (one op).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from ..ops.dpnp_loss import dpnp_loss


class DPNPLoss(nn.Module):
    """DPNP's classifier and loss (eq. 10). Holds the class prototypes C (num_classes, dim), which
    are the classifier's weights: logits(h) = h C^T (inner products, as the paper uses for its
    cross-entropy term). forward(h (N, dim), labels (N,)) ->

        CE(h C^T, y) + lambda_pos / 2N sum_i ||h_i - c_{y_i}||^2
                     - lambda_neg_sample / 2N sum_i ||h_i - c_neg(i)||_{1/2}^{1/2}
                     - lambda_neg_class / 2M sum_j ||c_j - c_neg(j)||_{1/2}^{1/2}

    with c_neg(i) the nearest prototype of another class than y_i (eq. 6) and c_neg(j) the nearest
    other prototype of c_j (eq. 8): protokernels.dpnp_loss. `eps` keeps the L_{1/2} terms'
    gradient finite. `renormalize_()` puts the prototypes back on the sphere
    of radius `alpha` (the paper does so at the start of each epoch). With one class there is no
    rival: both negative terms are 0.
    """

    def __init__(self, num_classes: int, dim: int, *, alpha: float = 1.0,
                 lambda_pos: float = 0.01, lambda_neg_sample: float = 0.01,
                 lambda_neg_class: float = 0.01, eps: float = 1e-8, device=None, dtype=None):
        super().__init__()
        _validate.settings("DPNPLoss", ints=dict(num_classes=num_classes, dim=dim),
                           positive=dict(alpha=alpha, eps=eps),
                           nonnegative=dict(lambda_pos=lambda_pos,
                                            lambda_neg_sample=lambda_neg_sample,
                                            lambda_neg_class=lambda_neg_class))
        self.alpha, self.eps = float(alpha), float(eps)
        self.lambda_pos, self.lambda_neg_sample = float(lambda_pos), float(lambda_neg_sample)
        self.lambda_neg_class = float(lambda_neg_class)
        self.prototypes = nn.Parameter(torch.randn(num_classes, dim, device=device, dtype=dtype))
        self.renormalize_()

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Prototypes onto the sphere of radius alpha."""
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1) * self.alpha)

    def logits(self, h: Tensor) -> Tensor:
        return h @ self.prototypes.t()

    def forward(self, h: Tensor, labels: Tensor) -> Tensor:
        _validate.feature_rows("DPNPLoss", "h", h, self.prototypes.shape[1], "(N, dim)")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dim() != 1 or \
                labels.shape[0] != h.shape[0]:
            raise TypeError(f"DPNPLoss: 'labels' must be a 1-D integer tensor of {h.shape[0]} "
                            f"class indices, got {getattr(labels, 'dtype', type(labels).__name__)}")
        return dpnp_loss(h, labels, self.prototypes.to(h.dtype), lambda_pos=self.lambda_pos,
                         lambda_neg_sample=self.lambda_neg_sample,
                         lambda_neg_class=self.lambda_neg_class, eps=self.eps)

    def extra_repr(self) -> str:
        return (f"classes={self.prototypes.shape[0]}, dim={self.prototypes.shape[1]}, "
                f"alpha={self.alpha}, lambda_pos={self.lambda_pos}, "
                f"lambda_neg_sample={self.lambda_neg_sample}, "
                f"lambda_neg_class={self.lambda_neg_class}")
