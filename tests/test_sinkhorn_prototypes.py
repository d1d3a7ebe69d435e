"""nn.SinkhornPrototypes: the prototype loss (eq. 10) on Sinkhorn codes, the prototype-anchored
MMD term (eq. 5) against float64 formulas, balanced codes, gradients, every backend, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import protokernels
from conftest import DEVICE, relative_error
from protokernels.nn import SinkhornPrototypes


def test_prototype_loss_is_eq_10(backend):
    torch.manual_seed(0)
    module = SinkhornPrototypes(8, 5, temperature=0.2, eps=0.1, n_iters=3).to(DEVICE)
    z = torch.randn(40, 8, device=DEVICE)
    loss, codes, scores = module(z)
    expected_scores = F.normalize(z, dim=1) @ F.normalize(module.prototypes, dim=1).t()
    assert relative_error(scores, expected_scores) <= 1e-5
    assert torch.allclose(codes, protokernels.sinkhorn(expected_scores, eps=0.1, n_iters=3),
                          atol=1e-5)
    assert torch.allclose(codes.sum(1), torch.ones(40, device=DEVICE), atol=1e-4)
    expected = -(codes * F.log_softmax(expected_scores / 0.2, dim=1)).sum(1).mean()
    assert relative_error(loss, expected) <= 1e-5
    loss.backward()
    assert module.prototypes.grad is not None and torch.isfinite(module.prototypes.grad).all()


def test_anchor_loss_is_a_per_prototype_mmd():
    torch.manual_seed(0)
    module = SinkhornPrototypes(3, 2, bandwidth=1.5).double().to(DEVICE)
    z = torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    codes = torch.rand(7, 2, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(1)
    loss = module.anchor_loss(z, codes)
    torch.manual_seed(1)
    assigned = codes.argmax(1)
    targets = module.prototypes[assigned] + torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    kernel = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * 1.5 ** 2))  # noqa: E731
    expected = 0
    for k in range(2):
        a, t = z[assigned == k], targets[assigned == k]
        if len(a):
            expected = expected + kernel(a, a).mean() + kernel(t, t).mean() - 2 * kernel(a, t).mean()
    assert relative_error(loss, expected) <= 1e-10
    zs = z.clone().requires_grad_()

    def seeded(a):
        torch.manual_seed(1)
        return module.anchor_loss(a, codes)
    assert torch.autograd.gradcheck(seeded, (zs,))


def test_empty_batch():
    module = SinkhornPrototypes(4, 3).to(DEVICE)
    loss, codes, _ = module(torch.randn(0, 4, device=DEVICE))
    assert loss.item() == 0 and codes.shape == (0, 3)
    assert module.anchor_loss(torch.randn(0, 4, device=DEVICE), codes).item() == 0


@pytest.mark.parametrize("call,error,message", [
    (lambda: SinkhornPrototypes(4, 0), ValueError, "'num_prototypes' must be a positive int"),
    (lambda: SinkhornPrototypes(4, 3, eps=0), ValueError, "'eps' must be a finite number > 0"),
    (lambda: SinkhornPrototypes(4, 3, temperature=math.inf), ValueError, "'temperature'"),
    (lambda: SinkhornPrototypes(4, 3)(torch.randn(5, 3)), ValueError, "'z' must have 4 features"),
    (lambda: SinkhornPrototypes(4, 3)(torch.ones(5, 4, dtype=torch.int64)), TypeError,
     "'z' must be a 2-D floating-point"),
    (lambda: SinkhornPrototypes(4, 3).anchor_loss(torch.randn(5, 4), torch.rand(5, 2)), ValueError,
     "'codes' must have shape"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
