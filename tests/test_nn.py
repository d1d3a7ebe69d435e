"""protokernels.nn modules: semantics against the ops they wrap, surrogate gradients, init,
state_dict, torch.compile, bad configuration."""
import pytest
import torch
import torch.nn.functional as F

import protokernels
from conftest import DEVICE, HAS_GPU, relative_error
from protokernels.nn import KernelPrototypeConv2d


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def layer(**kwargs):
    torch.manual_seed(0)
    return KernelPrototypeConv2d(3, 5, 3, padding=1, precision="ieee", **kwargs).to(DEVICE)


@pytest.mark.parametrize("radius,activation", [(False, "none"), (True, "none"),
                                               (True, "ball_relu"), (False, "softmax"),
                                               (True, "softmax"), (True, "sigmoid")])
def test_forward_is_the_activation_of_the_distances(radius, activation):
    module = layer(radius=radius, activation=activation, temperature=2.0)
    x = randn(2, 3, 6, 7)
    d = protokernels.kp_conv2d(x, module.weight, padding=1, precision="ieee")
    score = -d if not radius else module.radius.view(-1, 1, 1) ** 2 - d
    expected = {"none": d if not radius else score, "ball_relu": score.relu(),
                "softmax": (score / 2).softmax(1), "sigmoid": (score / 2).sigmoid()}[activation]
    out = module(x)
    assert out.shape == (2, 5, 6, 7)
    assert relative_error(out, expected) <= 1e-6


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_hard_forward_with_soft_surrogate_backward(activation):
    x = randn(2, 3, 6, 7)
    hard, soft = layer(radius=True, activation=activation, hard=True), layer(
        radius=True, activation=activation)
    out = hard(x)
    d = hard.distances(x)
    if activation == "softmax":  # one-hot of the nearest prototype
        assert torch.equal(out.argmax(1), d.argmin(1)) and torch.equal(out.sum(1), torch.ones_like(d[:, 0]))
    else:  # inside the ball or not
        assert torch.equal(out, (hard.radius.view(-1, 1, 1) ** 2 > d).float())
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    g = randn(*out.shape)
    out.backward(g)
    soft(x).backward(g)
    assert relative_error(hard.weight.grad, soft.weight.grad) <= 1e-6
    assert relative_error(hard.radius.grad, soft.radius.grad) <= 1e-6


def test_init_from_data_windows():
    module = layer(radius=True, activation="ball_relu")
    x = randn(4, 3, 5, 6)
    module.init_from(x, generator=torch.Generator().manual_seed(1))
    windows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    for prototype in module.weight.flatten(1):  # each prototype is one of x's windows
        assert (windows - prototype).abs().amax(1).min() == 0
    nearest = module.distances(x).amin(1)
    assert torch.allclose(module.radius, nearest.median().sqrt().expand(5))
    inside = (module(x) > 0).any(1).float().mean()
    assert 0.3 <= inside <= 0.7  # about half the windows start inside a ball


def test_default_init_and_repr():
    module = layer(radius=True, activation="softmax", hard=True, temperature=0.5)
    assert module.weight.shape == (5, 3, 3, 3) and module.weight.abs().max() <= 1
    assert torch.all(module.radius == 27**0.5)
    text = repr(module)
    for part in ("3, 5, kernel_size=(3, 3)", "padding=(1, 1)", "radius=True",
                 "activation='softmax'", "temperature=0.5", "hard=True"):
        assert part in text, text


def test_state_dict_round_trip():
    source = layer(radius=True, activation="sigmoid")
    source.init_from(randn(2, 3, 6, 6))
    target = layer(radius=True, activation="sigmoid")
    target.load_state_dict(source.state_dict())
    assert set(source.state_dict()) == {"weight", "radius"}
    x = randn(2, 3, 6, 6)
    assert torch.equal(target(x), source(x))


def test_compile_fullgraph():
    module = layer(radius=True, activation="softmax", hard=True)
    x = randn(2, 3, 6, 7)
    compiled = torch.compile(module, fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    out = compiled(x)
    assert torch.equal(out, module(x))
    out.sum().backward()
    assert module.weight.grad is not None and module.radius.grad is not None


@pytest.mark.parametrize("kwargs,message", [
    (dict(activation="relu"), "activation must be one of"),
    (dict(activation="ball_relu"), "needs radius=True"),
    (dict(activation="none", hard=True), "hard=True needs"),
    (dict(activation="softmax", temperature=0.0), "temperature must be positive"),
], ids=str)
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KernelPrototypeConv2d(3, 5, 3, **kwargs)


# The papers' heads: torch.compile (fullgraph), autocast and state_dict for each.
def _heads():
    from protokernels.nn import (DPNPLoss, GLVQLoss, PatchPrototypes, PrototypeClassifier,
                                 PrototypeLayer, RSLVQLoss, SinkhornPrototypes)
    labels = torch.randint(0, 3, (16,), device=DEVICE)
    return {
        "glvq": (lambda: PrototypeClassifier(6, 3, 2), lambda m, x: m.loss(x, labels)),
        "rslvq": (lambda: PrototypeClassifier(6, 3, 2, criterion=RSLVQLoss(0.7)),
                  lambda m, x: m.loss(x, labels)),
        "dpnp": (lambda: DPNPLoss(3, 6), lambda m, x: m(x, labels)),
        "prototype_layer": (lambda: PrototypeLayer(6, 5),
                            lambda m, x: m(x).sum() + sum(m.regularizers(x))),
        "patch": (lambda: PatchPrototypes(6, 4, 1),
                  lambda m, x: m(x.view(4, 4, 6).permute(0, 2, 1)[..., None])[1].sum()),
        "sinkhorn": (lambda: SinkhornPrototypes(6, 5), lambda m, x: m(x)[0]),
        "glvq_loss": (lambda: GLVQLoss("swish"),
                      lambda m, x: m(x, labels, x[:5].detach(), labels[:5])),
    }


@pytest.mark.parametrize("name", list(_heads()))
def test_heads_compile_autocast_state_dict(name):
    torch.manual_seed(0)
    make, run = _heads()[name]
    module = make().to(DEVICE)
    x = torch.randn(16, 6, device=DEVICE)
    eager = run(module, x)
    compiled = torch.compile(lambda m, a: run(m, a), fullgraph=True,
                             backend="aot_eager" if not HAS_GPU else "inductor")
    assert relative_error(compiled(module, x), eager) <= 1e-4
    if HAS_GPU:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.isfinite(run(module, x))
    copy = make().to(DEVICE)
    copy.load_state_dict(module.state_dict())
    assert torch.equal(run(copy, x), eager)
