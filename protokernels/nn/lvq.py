"""Learning vector quantization heads (prototype-layers-and-kernel-prototype-convolution, §6.1):
GLVQ's relative-distance loss (eq. 20) and RSLVQ's Gaussian-mixture likelihood ratio (eq. 19),
each one fused op (protokernels.glvq_loss, rslvq_loss), and a prototype classifier holding
labelled prototypes.

Conventions shared by both losses: distances are squared Euclidean; a sample whose class has no
prototype has nothing to be near and is left out of the loss (it contributes 0, and a mean is
taken over the samples that count; a batch where none counts gives 0), never a NaN from that
(NaN in x does give NaN).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops.glvq_loss import glvq_loss
from ..ops.nearest import nearest
from ..ops.rslvq_loss import rslvq_loss
from ..reference._losses import REDUCTIONS
from ..reference.glvq_loss import TRANSFERS


def _check_reduction(op: str, reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


class GLVQLoss(nn.Module):
    """GLVQ's loss: f(mu) with mu = (d+ - d-) / (d+ + d-), d+ the squared distance to the nearest
    prototype of the sample's class, d- to the nearest of any other class (eq. 20), f the transfer
    function: "identity", "sigmoid" (1 / (1 + exp(-beta mu))) or "swish" (mu * sigmoid(beta mu)),
    as in prototorch. mu < 0 is a correct classification; mu is in [-1, 1].

    forward(x (N, D), labels (N,), prototypes (M, D), prototype_labels (M,)) -> loss:
    protokernels.glvq_loss (one nearest_by_label search for d+ and d- without the (N, M) matrix,
    one epilogue kernel); gradients reach x and the two winning prototypes of each sample. A
    sample whose class has no prototype is left out; one with no prototype of another class has
    d- = inf and mu = -1 (nothing to confuse it with).
    """

    def __init__(self, transfer: str = "identity", beta: float = 10.0, reduction: str = "mean"):
        super().__init__()
        if transfer not in TRANSFERS:
            raise ValueError(f"GLVQLoss: 'transfer' must be one of {TRANSFERS}, got {transfer!r}")
        _validate.settings("GLVQLoss", positive=dict(beta=beta))
        self.transfer, self.beta = transfer, float(beta)
        self.reduction = _check_reduction("GLVQLoss", reduction)

    def forward(self, x: Tensor, labels: Tensor, prototypes: Tensor,
                prototype_labels: Tensor) -> Tensor:
        return glvq_loss(x, labels, prototypes, prototype_labels, transfer=self.transfer,
                         beta=self.beta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"transfer={self.transfer!r}, beta={self.beta}, reduction={self.reduction!r}"


class RSLVQLoss(nn.Module):
    """RSLVQ's loss: the negative log-likelihood ratio of a Gaussian mixture, one Gaussian of
    variance sigma^2 per prototype (eq. 19: softmax of -d / (2 sigma^2)):

        -log( sum_{j: c_j = y} exp(-d_j / 2 sigma^2) / sum_j exp(-d_j / 2 sigma^2) )

    with d_j the squared distances: protokernels.rslvq_loss (sqdist's kernel and one epilogue
    kernel; the log-sum-exps taken stably, no exp overflow for any sigma). A sample whose class
    has no prototype is left out.
    """

    def __init__(self, sigma: float = 1.0, reduction: str = "mean"):
        super().__init__()
        _validate.settings("RSLVQLoss", positive=dict(sigma=sigma))
        self.sigma = float(sigma)
        self.reduction = _check_reduction("RSLVQLoss", reduction)

    def forward(self, x: Tensor, labels: Tensor, prototypes: Tensor,
                prototype_labels: Tensor) -> Tensor:
        return rslvq_loss(x, labels, prototypes, prototype_labels, sigma=self.sigma,
                          reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, reduction={self.reduction!r}"


class PrototypeClassifier(nn.Module):
    """Labelled prototypes, `prototypes_per_class` per class, for GLVQ or RSLVQ heads on top of a
    feature extractor: forward(x) gives the winner's class (winner-takes-all, one fused search);
    `loss(x, labels)` the head's loss (GLVQLoss by default, any (x, labels, prototypes,
    prototype_labels) loss module as `criterion`). `init_from(x, labels)` puts each class's
    prototypes on class members (the class means plus small noise)."""

    def __init__(self, dim: int, num_classes: int, prototypes_per_class: int = 1, *,
                 criterion: nn.Module | None = None, device=None, dtype=None):
        super().__init__()
        _validate.settings("PrototypeClassifier", ints=dict(
            dim=dim, num_classes=num_classes, prototypes_per_class=prototypes_per_class))
        self.prototypes = nn.Parameter(torch.randn(num_classes * prototypes_per_class, dim,
                                                   device=device, dtype=dtype))
        self.register_buffer("prototype_labels", torch.arange(num_classes, device=device)
                             .repeat_interleave(prototypes_per_class))
        self.criterion = criterion if criterion is not None else GLVQLoss()

    @torch.no_grad()
    def init_from(self, x: Tensor, labels: Tensor, noise: float = 0.01) -> None:
        for c in range(int(self.prototype_labels.max()) + 1):
            members = x[labels == c]
            if len(members):
                rows = self.prototype_labels == c
                mean = members.mean(0).to(self.prototypes.dtype)
                self.prototypes[rows] = mean + noise * torch.randn_like(self.prototypes[rows])

    def forward(self, x: Tensor) -> Tensor:
        _, idx = nearest(x, self.prototypes)
        return self.prototype_labels[idx]

    def loss(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.criterion(x, labels, self.prototypes, self.prototype_labels)

    def extra_repr(self) -> str:
        return (f"{self.prototypes.shape[1]}, prototypes={self.prototypes.shape[0]}, "
                f"classes={int(self.prototype_labels.max()) + 1}")


__all__ = ["GLVQLoss", "RSLVQLoss", "PrototypeClassifier"]
