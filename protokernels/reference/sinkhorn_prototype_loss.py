"""sinkhorn_prototype_loss's unit rows in plain PyTorch: the normalizations of z and the
prototypes (F.normalize's), forward and backward, each for both matrices in one call.

For a row t with norm n = max(||t||, eps) (rounded to t's dtype, as F.normalize's denominator):
    unit = t / n,
    d unit / d t applied to g = (g - unit (unit . g)) / n, without the radial part where
        n <= eps (there the norm is the constant eps, not a function of t).
The same formulas as triton_kernels/sinkhorn_prototype_loss.py and
csrc/sinkhorn_prototype_loss.cu, which do each call in one launch.
"""
from __future__ import annotations

import torch


def _unit(t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(t, dim=1).clamp_min_(eps)
    # contiguous, as the op's fake and the kernels' outputs (a division keeps t's layout)
    unit = torch.empty_like(t, memory_format=torch.contiguous_format)
    return torch.div(t, norm[:, None], out=unit), norm


def unit_rows(z: torch.Tensor, prototypes: torch.Tensor, eps: float):
    """z (B, D), prototypes (K, D) -> (z_unit, p_unit, z_norm, p_norm): unit rows (contiguous)
    and the rows' norms (at least eps), all in z's dtype."""
    z_unit, z_norm = _unit(z, eps)
    p_unit, p_norm = _unit(prototypes, eps)
    return z_unit, p_unit, z_norm, p_norm


def _unit_grad(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor, eps: float):
    radial = torch.linalg.vecdot(unit, grad).masked_fill_(norm <= eps, 0)
    return torch.addcmul(grad, unit, radial[:, None], value=-1).div_(norm[:, None])


def unit_rows_grad(grad_z_unit: torch.Tensor, z_unit: torch.Tensor, z_norm: torch.Tensor,
                   grad_p_unit: torch.Tensor, p_unit: torch.Tensor, p_norm: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients w.r.t. z and the prototypes of losses whose gradients w.r.t. unit_rows'
    unit rows are grad_z_unit (B, D) and grad_p_unit (K, D)."""
    return (_unit_grad(grad_z_unit, z_unit, z_norm, eps),
            _unit_grad(grad_p_unit, p_unit, p_norm, eps))
