"""nn.DPNPLoss against eq. 10 written out in float64 (nearest rival per sample, eq. 6, and per
prototype, eq. 8), gradients, renormalization, every backend, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, relative_error, skip_unless_capable
from protokernels.nn import DPNPLoss


def truth(h, labels, c, lp, ls, lc, eps):
    h, c = h.double(), c.double()
    d = torch.cdist(h, c).square()
    rival = d.scatter(1, labels[:, None], math.inf).argmin(1)
    dc = torch.cdist(c, c).square().fill_diagonal_(math.inf)
    neighbour = dc.argmin(1)
    half = lambda v: (torch.sqrt(v.abs() + eps) - math.sqrt(eps)).sum(-1)  # noqa: E731
    n, m = h.shape[0], c.shape[0]
    return (F.cross_entropy(h @ c.t(), labels) + lp / (2 * n) * (h - c[labels]).square().sum()
            - ls / (2 * n) * half(h - c[rival]).sum() - lc / (2 * m) * half(c - c[neighbour]).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_eq_10(backend, dtype):
    skip_unless_capable(backend, "dpnp_loss", dtype)
    torch.manual_seed(0)
    loss_fn = DPNPLoss(7, 5, alpha=2.0, lambda_pos=0.3, lambda_neg_sample=0.2,
                       lambda_neg_class=0.1, device=DEVICE, dtype=dtype)
    h = torch.randn(30, 5, device=DEVICE, dtype=dtype)
    labels = torch.randint(0, 7, (30,), device=DEVICE)
    expected = truth(h, labels, loss_fn.prototypes.detach(), 0.3, 0.2, 0.1, 1e-8)
    assert relative_error(loss_fn(h, labels), expected) <= (1e-10 if dtype == torch.float64
                                                            else 1e-5)
    assert torch.allclose(loss_fn.prototypes.norm(dim=1).double(),
                          torch.full((7,), 2.0, dtype=torch.float64, device=DEVICE))
    if dtype == torch.float64:
        hs = h[:6].clone().requires_grad_()
        ours_h = hs.clone().detach().requires_grad_()
        loss_fn(ours_h, labels[:6]).backward()
        expected_h = hs.clone().detach().requires_grad_()
        truth(expected_h, labels[:6], loss_fn.prototypes.detach(), 0.3, 0.2, 0.1,
              1e-8).backward()
        assert relative_error(ours_h.grad, expected_h.grad) <= 1e-10
        assert torch.autograd.gradcheck(lambda a: loss_fn(a, labels[:6]), (hs,))


def test_one_class_has_no_rival_terms():
    loss_fn = DPNPLoss(1, 3).to(DEVICE)
    h, labels = torch.randn(4, 3, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE)
    expected = 0.01 / 8 * (h - loss_fn.prototypes[0]).square().sum()  # CE of one class is 0
    assert relative_error(loss_fn(h, labels), expected) <= 1e-6


@pytest.mark.parametrize("call,error,message", [
    (lambda: DPNPLoss(0, 3), ValueError, "'num_classes' must be a positive int"),
    (lambda: DPNPLoss(3, 3, alpha=0), ValueError, "'alpha' must be a finite number > 0"),
    (lambda: DPNPLoss(3, 3, lambda_pos=-1), ValueError, "'lambda_pos' must be"),
    (lambda: DPNPLoss(3, 4)(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64)), ValueError,
     "'h' must have 4 features"),
    (lambda: DPNPLoss(3, 3)(torch.randn(2, 3), torch.zeros(2)), TypeError, "'labels' must be"),
    (lambda: DPNPLoss(3, 3)(torch.ones(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)),
     TypeError, "'h' must be a 2-D floating-point tensor"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
