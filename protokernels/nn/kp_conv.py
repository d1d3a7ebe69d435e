"""KernelPrototypeConv2d: a Conv2d-like layer whose kernels are prototypes (prototype-layers...,
§6.2 and §8): each output channel is the squared distance between every sliding window and one
kernel-prototype, optionally turned into a "ball" score r^2 - d and an activation."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..ops.kp_conv import kp_conv2d

ACTIVATIONS = ("none", "ball_relu", "softmax", "sigmoid")


class KernelPrototypeConv2d(nn.Module):
    """Kernel-prototype convolution with an optional learned radius and activation.

    d = kp_conv2d(x, weight) is (B, P, Ho, Wo), the squared distances of each window to the P
    prototypes `weight` (P, C, kh, kw). With `radius=True`, s = r^2 - d with a learned radius per
    prototype (positive inside the prototype's ball, §6.2); otherwise s = -d. Then `activation`:
      "none"       d (without radius) or s = r^2 - d
      "ball_relu"  relu(r^2 - d): how deep a window lies inside each ball (needs radius)
      "softmax"    softmax over prototypes of s / temperature (RSLVQ's Gibbs assignment, eq. 19)
      "sigmoid"    sigmoid(s / temperature): soft ball membership
    `hard=True` (softmax or sigmoid) forwards the hard assignment of §8 (one-hot nearest prototype
    for softmax, the Heaviside step of r^2 - d for sigmoid) and back-propagates the soft one's
    gradient (straight-through surrogate); `temperature` is the kernel width sigma.
    """

    def __init__(self, in_channels: int, num_prototypes: int, kernel_size, stride=1, padding=0,
                 dilation=1, *, radius: bool = False, activation: str = "none",
                 hard: bool = False, temperature: float = 1.0, precision: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"KernelPrototypeConv2d: activation must be one of {ACTIVATIONS}, "
                             f"got {activation!r}")
        if activation == "ball_relu" and not radius:
            raise ValueError("KernelPrototypeConv2d: activation 'ball_relu' needs radius=True")
        if hard and activation not in ("softmax", "sigmoid"):
            raise ValueError("KernelPrototypeConv2d: hard=True needs activation 'softmax' or "
                             f"'sigmoid', got {activation!r}")
        if not temperature > 0:
            raise ValueError(f"KernelPrototypeConv2d: temperature must be positive, got "
                             f"{temperature}")
        self.in_channels, self.num_prototypes = in_channels, num_prototypes
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.activation, self.hard, self.temperature = activation, hard, temperature
        self.precision = precision
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_prototypes, in_channels, *self.kernel_size,
                                               **factory))
        self.radius = nn.Parameter(torch.empty(num_prototypes, **factory)) if radius else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Prototypes as nn.Conv2d initializes its kernels; radius sqrt(C kh kw), the typical
        distance of a unit-variance window from such prototypes (half the windows inside)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.radius is not None:
            nn.init.constant_(self.radius, math.sqrt(self.weight[0].numel()))

    @torch.no_grad()
    def init_from(self, x: Tensor, generator: torch.Generator | None = None) -> None:
        """Prototypes from random windows of x (B, C, H, W) (§8: randomly chosen inputs), and the
        radius (if any) to the median distance of x's windows to their nearest prototype, so that
        about half of them start inside a ball."""
        windows = nn.functional.unfold(x.to(self.weight.dtype), self.kernel_size,
                                       dilation=self.dilation, padding=self.padding,
                                       stride=self.stride)  # (B, C kh kw, L)
        windows = windows.transpose(1, 2).reshape(-1, windows.shape[1])
        if windows.shape[0] == 0:
            raise ValueError("KernelPrototypeConv2d.init_from: 'x' has no windows, got "
                             f"shape {tuple(x.shape)}")
        replace = windows.shape[0] < self.num_prototypes
        pick = torch.multinomial(torch.ones(windows.shape[0]), self.num_prototypes,
                                 replacement=replace, generator=generator)
        self.weight.copy_(windows[pick.to(windows.device)].view_as(self.weight))
        if self.radius is not None:
            nearest = self.distances(x.to(self.weight.dtype)).amin(1)
            self.radius.fill_(nearest.median().clamp_min(0).sqrt().item())

    def distances(self, x: Tensor) -> Tensor:
        """The dissimilarity stack d (B, P, Ho, Wo)."""
        return kp_conv2d(x, self.weight, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, precision=self.precision)

    def forward(self, x: Tensor) -> Tensor:
        d = self.distances(x)
        score = -d if self.radius is None else self.radius.square().view(-1, 1, 1) - d
        if self.activation == "none":
            return d if self.radius is None else score
        if self.activation == "ball_relu":
            return torch.relu(score)
        if self.activation == "softmax":
            soft = torch.softmax(score / self.temperature, dim=-3)
            if not self.hard:
                return soft
            hard = torch.zeros_like(soft).scatter_(-3, soft.argmax(-3, keepdim=True), 1.0)
        else:
            soft = torch.sigmoid(score / self.temperature)
            if not self.hard:
                return soft
            hard = (score > 0).to(soft.dtype)
        return hard + (soft - soft.detach())  # forward hard, backward the soft surrogate

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.num_prototypes}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        text += f", radius={self.radius is not None}, activation={self.activation!r}"
        if self.activation in ("softmax", "sigmoid"):
            text += f", temperature={self.temperature}"
        if self.hard:
            text += ", hard=True"
        return text
