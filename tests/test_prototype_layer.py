"""nn.PrototypeLayer (distances, R1/R2 from one nearest_both pass) and nn.CaseBasedLoss (eq. 7)
against float64 formulas, gradients, every backend, bad input."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, relative_error, skip_unless_capable
from protokernels.nn import CaseBasedLoss, PrototypeLayer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_distances_and_regularizers(backend, dtype):
    skip_unless_capable(backend, "nearest_both", dtype)
    torch.manual_seed(0)
    layer = PrototypeLayer(6, 9).to(DEVICE, dtype)
    z = torch.randn(25, 6, device=DEVICE, dtype=dtype)
    d = torch.cdist(z.double(), layer.prototypes.double()).square()
    assert relative_error(layer(z), d) <= (1e-10 if dtype == torch.float64 else 1e-5)
    r1, r2 = layer.regularizers(z)
    assert relative_error(r1, d.min(0).values.mean()) <= 1e-5  # eq. 5: prototypes near inputs
    assert relative_error(r2, d.min(1).values.mean()) <= 1e-5  # eq. 6: inputs near prototypes
    if dtype == torch.float64:
        zs = z[:7].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a: torch.stack(layer.regularizers(a)), (zs,))
        r1, r2 = layer.regularizers(z)
        (r1 + 2 * r2).backward()
        p = layer.prototypes.detach().clone().requires_grad_()
        d = (z[:, None] - p[None]).square().sum(-1)
        (d.min(0).values.mean() + 2 * d.min(1).values.mean()).backward()
        assert relative_error(layer.prototypes.grad, p.grad) <= 1e-10


def test_case_based_loss_is_eq_7():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    x, reconstruction = torch.rand(8, 1, 5, 5), torch.rand(8, 1, 5, 5)
    r1, r2 = torch.tensor(0.7), torch.tensor(1.3)
    loss = CaseBasedLoss(0.1, 0.2, 0.3)(logits, labels, reconstruction, x, r1, r2)
    expected = (F.cross_entropy(logits, labels) + 0.1 * (reconstruction - x).square().sum((1, 2, 3))
                .mean() + 0.2 * r1 + 0.3 * r2)
    assert relative_error(loss, expected) <= 1e-6


def test_empty_batch_gives_zero_regularizers():
    layer = PrototypeLayer(3, 2).to(DEVICE)
    r1, r2 = layer.regularizers(torch.randn(0, 3, device=DEVICE))
    assert r1.item() == 0 and r2.item() == 0


@pytest.mark.parametrize("call,error,message", [
    (lambda: PrototypeLayer(0, 3), ValueError, "'dim' must be a positive int"),
    (lambda: PrototypeLayer(3, 2)(torch.randn(4, 5)), ValueError, "'z' must have 3 features"),
    (lambda: PrototypeLayer(3, 2)(torch.ones(4, 3, dtype=torch.int64)), TypeError,
     "'z' must be a 2-D floating-point"),
    (lambda: CaseBasedLoss(lambda_r1=-1), ValueError, "'lambda_r1' must be"),
    (lambda: CaseBasedLoss()(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64),
                             torch.randn(2, 4), torch.randn(2, 5), 0, 0), ValueError,
     "'reconstruction' must have x's shape"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
