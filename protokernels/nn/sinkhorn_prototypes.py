"""Sinkhorn-balanced prototypes (prototypical-vae-sinkhorn, §2.2-2.3, eq. 5 and 9-12; SwAV):
latent codes are assigned to K learnable prototypes by equipartition Sinkhorn codes, the
prototypes learn from the cross-entropy between those codes and the softmax of the prototype
scores (eq. 10), and each prototype anchors its cluster through an MMD term towards N(v_k, I)
(eq. 5).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops.sinkhorn_prototype_loss import sinkhorn_prototype_loss
from ..ops.sqdist import sqdist


class SinkhornPrototypes(nn.Module):
    """K prototypes V (K, dim) in a latent space.

    forward(z (B, dim)) -> (loss, codes, scores): scores = z V^T (with `normalize`, of the
    unit-normalized z and V, as SwAV), codes = protokernels.sinkhorn(scores, eps, n_iters) (the
    balanced assignment, no gradient), loss = -mean_b sum_k codes log softmax(scores / temperature)
    (eq. 10: it moves the prototypes and the encoder towards the balanced assignment); all three
    from protokernels.sinkhorn_prototype_loss (one op).

    anchor_loss(z, codes) -> the prototype-anchored regularization (eq. 5): for every prototype k,
    the MMD between the codes assigned to it (argmax of codes) and samples of N(v_k, I), with a
    Gaussian kernel of width `bandwidth`; summed over prototypes (kernel matrices from
    protokernels.sqdist).
    """

    def __init__(self, dim: int, num_prototypes: int, *, temperature: float = 0.1,
                 eps: float = 0.05, n_iters: int = 3, normalize: bool = True,
                 bandwidth: float = 1.0, device=None, dtype=None):
        super().__init__()
        _validate.settings("SinkhornPrototypes",
                           ints=dict(dim=dim, num_prototypes=num_prototypes, n_iters=n_iters),
                           positive=dict(temperature=temperature, eps=eps, bandwidth=bandwidth))
        self.temperature, self.eps, self.n_iters = float(temperature), float(eps), n_iters
        self.normalize, self.bandwidth = normalize, float(bandwidth)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim, device=device,
                                                   dtype=dtype))

    def _check(self, z: Tensor) -> None:
        _validate.feature_rows("SinkhornPrototypes", "z", z, self.prototypes.shape[1],
                               "(B, dim)")

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check(z)
        return sinkhorn_prototype_loss(z, self.prototypes.to(z.dtype),
                                       temperature=self.temperature, eps=self.eps,
                                       n_iters=self.n_iters, normalize=self.normalize)

    def anchor_loss(self, z: Tensor, codes: Tensor) -> Tensor:
        self._check(z)
        if codes.shape != (z.shape[0], self.prototypes.shape[0]):
            raise ValueError(f"SinkhornPrototypes: 'codes' must have shape "
                             f"{(z.shape[0], self.prototypes.shape[0])}, got {tuple(codes.shape)}")
        if z.shape[0] == 0:
            return z.sum() * 0
        assigned = codes.argmax(1)
        anchors = self.prototypes.to(z.dtype)[assigned]
        targets = anchors + torch.randn_like(anchors)  # samples of N(v_k, I)
        same = assigned[:, None] == assigned[None, :]
        counts = torch.bincount(assigned, minlength=self.prototypes.shape[0]).to(z.dtype)
        weight = same / counts[assigned][:, None] ** 2  # 1 / n_k^2 within cluster k

        def kernel(a, b):
            return torch.exp(-sqdist(a, b) / (2 * self.bandwidth ** 2))
        mmd = kernel(z, z) + kernel(targets, targets) - 2 * kernel(z, targets)
        return (weight * mmd).sum()

    def extra_repr(self) -> str:
        return (f"dim={self.prototypes.shape[1]}, prototypes={self.prototypes.shape[0]}, "
                f"temperature={self.temperature}, eps={self.eps}, n_iters={self.n_iters}")
