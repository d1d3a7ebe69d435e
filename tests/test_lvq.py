"""nn.GLVQLoss, nn.RSLVQLoss, nn.PrototypeClassifier: values and gradients against float64
formulas and against prototorch (the LVQ library's own loss functions), every backend, classes
without prototypes, compile, autocast, state_dict, bad input."""
import math

import pytest
import torch

import protokernels
from conftest import DEVICE, HAS_GPU, relative_error, skip_unless_capable
from protokernels.nn import GLVQLoss, PrototypeClassifier, RSLVQLoss


def data(n=40, m=9, d=6, classes=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    protos = torch.randn(m, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    labels = torch.randint(0, classes, (n,), generator=g).to(DEVICE)
    plabels = (torch.arange(m) % classes).to(DEVICE)
    return x, labels, protos, plabels


def glvq_truth(x, labels, protos, plabels, transfer="identity", beta=10.0):
    d = (x.double()[:, None] - protos.double()[None]).square().sum(-1)
    same = labels[:, None] == plabels[None]
    dp = d.masked_fill(~same, math.inf).min(1).values
    dm = d.masked_fill(same, math.inf).min(1).values
    mu = (dp - dm) / (dp + dm)
    if transfer == "sigmoid":
        mu = torch.sigmoid(beta * mu)
    elif transfer == "swish":
        mu = mu * torch.sigmoid(beta * mu)
    return mu


@pytest.mark.parametrize("transfer", ["identity", "sigmoid", "swish"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_glvq_matches_float64_and_gradcheck(backend, transfer, dtype):
    skip_unless_capable(backend, "nearest_by_label", dtype)
    x, labels, protos, plabels = data(dtype=dtype)
    loss = GLVQLoss(transfer, beta=3.0, reduction="none")(x, labels, protos, plabels)
    truth = glvq_truth(x, labels, protos, plabels, transfer, 3.0)
    assert relative_error(loss, truth) <= (1e-10 if dtype == torch.float64 else 1e-5)
    if dtype == torch.float64:
        xs, ps = x[:8].clone().requires_grad_(), protos.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b: GLVQLoss(transfer, beta=3.0)(a, labels[:8], b, plabels), (xs, ps))


def test_glvq_classes_without_prototypes_never_give_nan(backend):
    x, labels, protos, plabels = data(dtype=torch.float32)
    labels[:5] = 7  # no prototype of class 7: left out
    loss_fn = GLVQLoss(reduction="none")
    values = loss_fn(x, labels, protos, plabels)
    assert torch.isfinite(values).all() and (values[:5] == 0).all()
    kept = GLVQLoss()(x, labels, protos, plabels)
    assert torch.allclose(kept, values[5:].mean(), atol=1e-6)
    # every prototype of one class: no rival, mu = -1
    one = GLVQLoss(reduction="none")(x, torch.zeros_like(labels), protos,
                                     torch.zeros_like(plabels))
    assert (one == -1).all()
    # nothing counts: 0, not NaN
    assert GLVQLoss()(x, torch.full_like(labels, 9), protos, plabels).item() == 0


def rslvq_truth(x, labels, protos, plabels, sigma):
    d = (x.double()[:, None] - protos.double()[None]).square().sum(-1)
    logits = -d / (2 * sigma ** 2)
    same = labels[:, None] == plabels[None]
    return torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~same, -math.inf), 1)


@pytest.mark.parametrize("sigma", [0.05, 1.0, 30.0])
def test_rslvq_matches_float64_and_is_stable(backend, sigma):
    x, labels, protos, plabels = data(dtype=torch.float32)
    loss = RSLVQLoss(sigma, reduction="none")(x, labels, protos, plabels)
    assert torch.isfinite(loss).all()  # sigma 0.05: exp(-d / 2 sigma^2) underflows naively
    assert relative_error(loss, rslvq_truth(x, labels, protos, plabels, sigma)) <= 1e-4


def test_rslvq_gradcheck():
    x, labels, protos, plabels = data(n=6, m=5)
    with protokernels.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda a, b: RSLVQLoss(0.7)(a, labels, b, plabels),
            (x.clone().requires_grad_(), protos.clone().requires_grad_()))


def _prototorch():
    from protokernels.benchmarks.heads import prototorch_losses
    modules = prototorch_losses()
    if modules is None:
        pytest.skip("prototorch is not installed (scripts/setup.sh installs it)")
    return modules


@pytest.mark.parametrize("transfer", ["identity", "sigmoid", "swish"])
def test_glvq_matches_prototorch(transfer):
    pt = _prototorch()
    x, labels, protos, plabels = data(dtype=torch.float64)
    xs, ps = x.clone().requires_grad_(), protos.clone().requires_grad_()
    xr, pr = x.clone().requires_grad_(), protos.clone().requires_grad_()
    ours = GLVQLoss(transfer, beta=5.0, reduction="sum")(xs, labels, ps, plabels)
    mu = pt["losses"].glvq_loss(pt["distances"].squared_euclidean_distance(xr, pr), labels,
                                plabels)
    if transfer != "identity":
        mu = pt["activations"].get_activation(f"{transfer}_beta")(mu, beta=5.0)
    theirs = mu.sum()
    assert abs(ours.item() - theirs.item()) <= 1e-10 * max(1, abs(theirs.item()))
    ours.backward()
    theirs.backward()
    assert relative_error(xs.grad, xr.grad) <= 1e-10 and relative_error(ps.grad, pr.grad) <= 1e-10


def test_rslvq_matches_prototorch():
    """prototorch's rslvq_loss takes the Gaussian priors exp(-d / 2 variance) of one prototype per
    class (its class-probability mapping assumes that)."""
    pt = _prototorch()
    x, labels, protos, plabels = data(m=3, dtype=torch.float64)
    xs, ps = x.clone().requires_grad_(), protos.clone().requires_grad_()
    xr, pr = x.clone().requires_grad_(), protos.clone().requires_grad_()
    ours = RSLVQLoss(sigma=1.5, reduction="sum")(xs, labels, ps, plabels)
    d = pt["distances"].squared_euclidean_distance(xr, pr)
    theirs = pt["losses"].rslvq_loss(torch.exp(-d / (2 * 1.5 ** 2)), labels.cpu(),
                                     plabels.cpu()).sum()
    assert abs(ours.item() - theirs.item()) <= 1e-9 * abs(theirs.item())
    ours.backward()
    theirs.backward()
    assert relative_error(xs.grad, xr.grad) <= 1e-8 and relative_error(ps.grad, pr.grad) <= 1e-8


def test_classifier_predicts_the_winners_class_and_learns(backend):
    torch.manual_seed(0)
    centers = torch.randn(3, 4, device=DEVICE) * 4
    labels = torch.randint(0, 3, (300,), device=DEVICE)
    x = centers[labels] + torch.randn(300, 4, device=DEVICE)
    head = PrototypeClassifier(4, 3, prototypes_per_class=2).to(DEVICE)
    head.init_from(x, labels)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(30):
        optimizer.zero_grad()
        head.loss(x, labels).backward()
        optimizer.step()
    d = torch.cdist(x, head.prototypes.detach())
    assert torch.equal(head(x), head.prototype_labels[d.argmin(1)])
    assert (head(x) == labels).float().mean() > 0.9


def test_heads_compile_autocast_and_state_dict():
    x, labels, protos, plabels = data(dtype=torch.float32)
    head = PrototypeClassifier(6, 3, 3, criterion=RSLVQLoss(0.8)).to(DEVICE)
    compiled = torch.compile(lambda a, b: GLVQLoss("sigmoid")(a, b, protos, plabels) +
                             RSLVQLoss()(a, b, protos, plabels), fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    eager = GLVQLoss("sigmoid")(x, labels, protos, plabels) + RSLVQLoss()(x, labels, protos,
                                                                          plabels)
    assert relative_error(compiled(x, labels), eager) <= 1e-5
    if HAS_GPU:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.isfinite(head.loss(x, labels))
    other = PrototypeClassifier(6, 3, 3).to(DEVICE)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other(x), head(x))


@pytest.mark.parametrize("call,error,message", [
    (lambda: GLVQLoss("relu"), ValueError, "'transfer' must be one of"),
    (lambda: GLVQLoss(beta=0), ValueError, "'beta' must be a finite number > 0"),
    (lambda: RSLVQLoss(sigma=-1), ValueError, "'sigma' must be"),
    (lambda: GLVQLoss(reduction="avg"), ValueError, "'reduction' must be"),
    (lambda: GLVQLoss()(torch.ones(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                        torch.randn(2, 2), torch.zeros(2, dtype=torch.int64)),
     TypeError, "'x' must be a 2-D floating-point tensor"),
    (lambda: GLVQLoss()(torch.randn(3, 2), torch.zeros(4, dtype=torch.int64), torch.randn(2, 2),
                        torch.zeros(2, dtype=torch.int64)), ValueError, "'labels' must have 3"),
    (lambda: RSLVQLoss()(torch.randn(3, 2), torch.zeros(3), torch.randn(2, 2),
                         torch.zeros(2, dtype=torch.int64)), TypeError, "'labels' must be a 1-D"),
    (lambda: RSLVQLoss()(torch.randn(3, 2), torch.zeros(3, dtype=torch.int64), torch.randn(2, 5),
                         torch.zeros(2, dtype=torch.int64)), ValueError, "same feature size"),
    (lambda: PrototypeClassifier(4, 0), ValueError, "'num_classes' must be a positive int"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
