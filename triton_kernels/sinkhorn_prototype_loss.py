"""sinkhorn_prototype_loss's unit rows in Triton: the normalizations of z and the prototypes,
forward and backward, one program per row of both matrices in one launch (formulas:
reference/sinkhorn_prototype_loss.py).

Why kernels for four lines of PyTorch: at the in-model sizes the Sinkhorn head's training step is
host time, and those lines were 20 of its 29 launches (two norms, two clamps and two divisions
forward; two divisions, and per matrix a dot product (two launches), a comparison, a masked fill,
an addcmul and a division backward; RESULTS.md "The in-model grid, sixteenth session").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import accumulator, block, float32_pair, launcher


@triton.jit
def _unit_row(T, UNIT, NORM, row, st_r, st_c, D, eps, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    squares = tl.zeros((BLOCK_D,), ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        t = tl.load(T + row * st_r + cols * st_c, mask=cols < D, other=0.0).to(ACC)
        squares += t * t
    root = tl.sqrt(tl.sum(squares, 0))
    # at least eps (a NaN stays NaN), rounded to t's dtype first, as F.normalize divides by its
    # (t-dtype) denominator
    norm = tl.where(root < eps, eps, root).to(NORM.dtype.element_ty)
    tl.store(NORM + row, norm)
    divisor = norm.to(ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        t = tl.load(T + row * st_r + cols * st_c, mask=ok, other=0.0).to(ACC)
        tl.store(UNIT + row * D + cols, (t / divisor).to(UNIT.dtype.element_ty), mask=ok)


@triton.jit
def _unit_rows_kernel(Z, P, ZU, PU, ZN, PN, B, D, sz_r, sz_c, sp_r, sp_c, eps_hi, eps_lo,
                      ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows 0..B-1 of the launch are z's, the rest the prototypes'."""
    row = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    if row < B:
        _unit_row(Z, ZU, ZN, row, sz_r, sz_c, D, eps, ACC, BLOCK_D)
    else:
        _unit_row(P, PU, PN, row - B, sp_r, sp_c, D, eps, ACC, BLOCK_D)


@triton.jit
def _unit_row_grad(G, UNIT, NORM, OUT, row, sg_r, sg_c, D, eps, ACC: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    dots = tl.zeros((BLOCK_D,), ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        g = tl.load(G + row * sg_r + cols * sg_c, mask=ok, other=0.0).to(ACC)
        dots += g * tl.load(UNIT + row * D + cols, mask=ok, other=0.0).to(ACC)
    norm = tl.load(NORM + row).to(ACC)
    radial = tl.where(norm <= eps, 0.0, tl.sum(dots, 0))
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        g = tl.load(G + row * sg_r + cols * sg_c, mask=ok, other=0.0).to(ACC)
        unit = tl.load(UNIT + row * D + cols, mask=ok, other=0.0).to(ACC)
        tl.store(OUT + row * D + cols, ((g - unit * radial) / norm).to(OUT.dtype.element_ty),
                 mask=ok)


@triton.jit
def _unit_rows_grad_kernel(GZ, ZU, ZN, GP, PU, PN, OUT_Z, OUT_P, B, D, sgz_r, sgz_c, sgp_r,
                           sgp_c, eps_hi, eps_lo, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    if row < B:
        _unit_row_grad(GZ, ZU, ZN, OUT_Z, row, sgz_r, sgz_c, D, eps, ACC, BLOCK_D)
    else:
        _unit_row_grad(GP, PU, PN, OUT_P, row - B, sgp_r, sgp_c, D, eps, ACC, BLOCK_D)


_launch_unit_rows = launcher(_unit_rows_kernel)
_launch_unit_rows_grad = launcher(_unit_rows_grad_kernel)


def _config(depth: int) -> dict:
    block_d = block(depth, 1024)
    return dict(BLOCK_D=block_d, num_warps=4 if block_d >= 512 else 1)


def unit_rows(z: torch.Tensor, prototypes: torch.Tensor, eps: float):
    """z (B, D), prototypes (K, D) -> (z_unit, p_unit, z_norm, p_norm); see
    reference/sinkhorn_prototype_loss.py."""
    (b, depth), k = z.shape, prototypes.shape[0]
    z_unit, p_unit = z.new_empty((b, depth)), z.new_empty((k, depth))
    z_norm, p_norm = z.new_empty((b,)), z.new_empty((k,))
    if b + k > 0:
        _launch_unit_rows((b + k,), z, prototypes, z_unit, p_unit, z_norm, p_norm, b, depth,
                          *z.stride(), *prototypes.stride(), *float32_pair(eps),
                          ACC=accumulator(z.dtype), **_config(depth))
    return z_unit, p_unit, z_norm, p_norm


def unit_rows_grad(grad_z_unit, z_unit, z_norm, grad_p_unit, p_unit, p_norm, eps):
    """(grad_z, grad_p) from the unit rows' gradients; see reference/sinkhorn_prototype_loss.py."""
    (b, depth), k = z_unit.shape, p_unit.shape[0]
    grad_z, grad_p = z_unit.new_empty((b, depth)), z_unit.new_empty((k, depth))
    if b + k > 0:
        _launch_unit_rows_grad((b + k,), grad_z_unit, z_unit, z_norm, grad_p_unit, p_unit,
                               p_norm, grad_z, grad_p, b, depth, *grad_z_unit.stride(),
                               *grad_p_unit.stride(), *float32_pair(eps),
                               ACC=accumulator(z_unit.dtype), **_config(depth))
    return grad_z, grad_p
