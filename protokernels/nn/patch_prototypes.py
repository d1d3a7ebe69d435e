"""ProtoPNet-style patch prototypes (prototype-layers-and-kernel-prototype-convolution, §6-8):
each prototype is a (C, k, k) patch of a feature map; its distance to an image is the smallest
squared distance to any of the image's patches, from the fused kernel-prototype convolution, and
`push` projects every prototype onto its nearest training patch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from .._numerics import FLOAT_DTYPES
from ..ops.kp_conv import kp_conv2d
from ..ops.nearest import nearest


class PatchPrototypes(nn.Module):
    """`num_prototypes` patch prototypes of shape (in_channels, kernel_size, kernel_size).

    forward(features (B, C, H, W)) -> (min_distances, similarities), both (B, P):
    min_distances[b, p] = min over positions of ||window - p||^2 (protokernels.kp_conv2d, then the
    minimum over positions), similarities = log((d + 1) / (d + eps)) (ProtoPNet's activation).
    `distance_maps(features)` gives the (B, P, H', W') maps themselves.

    push(features, ...) replaces each prototype with its nearest training patch ("projection");
    see its docstring.
    """

    def __init__(self, in_channels: int, num_prototypes: int, kernel_size: int = 1, *,
                 eps: float = 1e-4, device=None, dtype=None):
        super().__init__()
        _validate.settings("PatchPrototypes", ints=dict(
            in_channels=in_channels, num_prototypes=num_prototypes, kernel_size=kernel_size),
            positive=dict(eps=eps))
        self.eps = float(eps)
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, in_channels, kernel_size,
                                                  kernel_size, device=device, dtype=dtype))

    def _check(self, features: Tensor) -> None:
        if not isinstance(features, Tensor) or features.dtype not in FLOAT_DTYPES or \
                features.dim() != 4:
            raise TypeError("PatchPrototypes: 'features' must be a 4-D floating-point tensor "
                            f"(B, C, H, W), got {getattr(features, 'dtype', type(features))}")
        if features.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"PatchPrototypes: 'features' must have {self.prototypes.shape[1]} "
                             f"channels, got {features.shape[1]}")

    def distance_maps(self, features: Tensor) -> Tensor:
        self._check(features)
        return kp_conv2d(features, self.prototypes.to(features.dtype))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        maps = self.distance_maps(features)
        min_distances = maps.flatten(2).amin(-1)
        similarities = torch.log((min_distances + 1) / (min_distances + self.eps))
        return min_distances, similarities

    @torch.no_grad()
    def push(self, features, allowed_images=None) -> dict:
        """Project every prototype onto its nearest patch among `features`: a (B, C, H, W) tensor
        or an iterable of such batches (e.g. a loader's encoded training images).
        `allowed_images(batch_index, B) -> (B, P) bool`, optional: which images a prototype may
        take its patch from (ProtoPNet restricts each to images of its class).

        Searches with protokernels.nearest: for 1x1 prototypes against the feature maps as they
        are (a strided view, nothing copied); for larger ones against unfolded patches. Returns
        {"distance": (P,), "batch": (P,), "image": (P,), "row": (P,), "col": (P,)}: where each
        prototype's patch came from (-1 if none was allowed)."""
        batches = [features] if isinstance(features, Tensor) else features
        p, c, k, _ = self.prototypes.shape
        protos = self.prototypes.detach().flatten(1)
        best = torch.full((p,), math.inf, device=protos.device, dtype=torch.float64)
        where = torch.full((4, p), -1, dtype=torch.int64, device=protos.device)
        patch_of = torch.empty_like(protos)
        for batch, maps in enumerate(batches):
            self._check(maps)
            b, _, h, w = maps.shape
            if k == 1:  # (B, H*W, C) as a view of NCHW or channels_last maps
                patches = maps.permute(0, 2, 3, 1).flatten(1, 2)
            else:
                patches = F.unfold(maps, k).transpose(1, 2)  # (B, L, C k k)
            cols = w - k + 1
            dist, idx = nearest(protos.to(maps.dtype).expand(b, p, -1), patches)  # (B, P)
            dist = dist.double()
            if allowed_images is not None:
                dist = dist.masked_fill(~allowed_images(batch, b), math.inf)
            image_best, image = dist.min(0)  # (P,)
            better = image_best < best
            best = torch.where(better, image_best, best)
            position = idx[image, torch.arange(p, device=idx.device)]
            found = torch.stack([torch.full_like(image, batch), image, position // cols,
                                 position % cols])
            where = torch.where(better, found, where)
            chosen = patches[image, position.clamp_min(0)].to(patch_of.dtype)
            patch_of = torch.where(better[:, None], chosen, patch_of)
        taken = best < math.inf
        self.prototypes.copy_(torch.where(taken[:, None], patch_of, protos)
                              .view_as(self.prototypes))
        return {"distance": best, "batch": where[0], "image": where[1], "row": where[2],
                "col": where[3]}

    def extra_repr(self) -> str:
        p, c, k, _ = self.prototypes.shape
        return f"in_channels={c}, prototypes={p}, kernel_size={k}, eps={self.eps}"
