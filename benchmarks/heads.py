"""The papers' prototype heads (protokernels.nn): one training step (loss forward and backward)
of each head against the same head written naively in PyTorch (the (N, M) distance matrix by
the expanded formula, then masks and mins), and prototorch's loss functions where it has them
(GLVQ, RSLVQ). Interface as benchmarks/sqdist.py; sizes["head"] picks the head.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch
import torch.nn.functional as F

from protokernels import dpnp_loss, prototype_layer, sinkhorn_prototype_loss
from protokernels.bench import DoesNotApply
from protokernels.nn import GLVQLoss, RSLVQLoss

OP = "heads"
MODES = ("fwd+bwd",)  # a training step


def _distances(x, y):
    return (x.square().sum(-1, keepdim=True) - 2 * x @ y.mT + y.square().sum(-1)).clamp_min(0)


def glvq_naive(x, labels, protos, plabels):
    d = _distances(x, protos)
    same = labels[:, None] == plabels[None]
    dp = d.masked_fill(~same, math.inf).min(1).values
    dm = d.masked_fill(same, math.inf).min(1).values
    return torch.sigmoid(5.0 * (dp - dm) / (dp + dm)).mean()


def rslvq_naive(x, labels, protos, plabels):
    logits = -_distances(x, protos) / 2.0
    same = labels[:, None] == plabels[None]
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~same, -math.inf),
                                                         1)).mean()


def dpnp_naive(x, labels, protos, _plabels):
    d = _distances(x, protos)
    rival = d.scatter(1, labels[:, None], math.inf).argmin(1)
    neighbour = _distances(protos, protos).fill_diagonal_(math.inf).argmin(1)
    half = lambda v: (torch.sqrt(v.abs() + 1e-8) - 1e-4).sum(-1)  # noqa: E731
    n, m = x.shape[0], protos.shape[0]
    return (F.cross_entropy(x @ protos.t(), labels) + 0.01 / (2 * n) *
            (x - protos[labels]).square().sum() - 0.01 / (2 * n) * half(x - protos[rival]).sum()
            - 0.01 / (2 * m) * half(protos - protos[neighbour]).sum())


def case_based_naive(x, _labels, protos, _plabels):
    d = _distances(x, protos)
    return d.min(0).values.mean() + d.min(1).values.mean() + d.sum() * 1e-6


def sinkhorn_naive(x, _labels, protos, _plabels):
    from .sinkhorn import swav_sinkhorn
    scores = F.normalize(x, dim=1) @ F.normalize(protos, dim=1).t()
    with torch.no_grad():
        codes = swav_sinkhorn(scores.detach(), 0.05, 3)
    return -(codes * F.log_softmax(scores / 0.1, dim=1)).sum(1).mean()


NAIVE = {"glvq": glvq_naive, "rslvq": rslvq_naive, "dpnp": dpnp_naive,
         "case_based": case_based_naive, "sinkhorn": sinkhorn_naive}


def naive(sizes, x, labels, protos, plabels):
    return NAIVE[_HEADS[sizes["head"]]](x, labels, protos, plabels)


def case_based(dist, r1, r2):
    """The case-based head's step from prototype_layer's outputs (as case_based_naive)."""
    return r1 + r2 + dist.sum() * 1e-6  # the distances' own use: the naive head's d.sum()


_GLVQ, _RSLVQ = GLVQLoss("sigmoid", beta=5.0), RSLVQLoss(1.0)
FUSED = {
    "glvq": _GLVQ, "rslvq": _RSLVQ,
    "dpnp": lambda x, labels, protos, _: dpnp_loss(x, labels, protos, lambda_pos=0.01,
                                                   lambda_neg_sample=0.01,
                                                   lambda_neg_class=0.01, eps=1e-8),
    "case_based": lambda x, _, protos, __: case_based(*prototype_layer(x, protos)),
    "sinkhorn": lambda x, _, protos, __: sinkhorn_prototype_loss(
        x, protos, temperature=0.1, eps=0.05, n_iters=3)[0],
}


def fused(sizes, x, labels, protos, plabels):
    return FUSED[_HEADS[sizes["head"]]](x, labels, protos, plabels)


def prototorch_losses():
    """prototorch's loss, activation and distance modules, loaded from its installed files
    without its package __init__ (which imports torchvision and pkg_resources); None if it is not
    installed (it is the `bench` and `test` extras' prototorch==0.7.6)."""
    spec = importlib.util.find_spec("prototorch")
    if spec is None:
        return None
    root = spec.submodule_search_locations[0]
    saved = {k: v for k, v in sys.modules.items() if k.startswith("prototorch")}
    try:
        for name, path in (("prototorch", root), ("prototorch.nn", root + "/nn"),
                           ("prototorch.core", root + "/core")):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
        modules = {}
        for name in ("prototorch.nn.activations", "prototorch.core.losses",
                     "prototorch.core.distances"):
            module_spec = importlib.util.spec_from_file_location(
                name, root + "/" + name.split(".", 1)[1].replace(".", "/") + ".py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            modules[name.rsplit(".", 1)[1]] = module
        return modules
    finally:
        for key in [k for k in sys.modules if k.startswith("prototorch")]:
            del sys.modules[key]
        sys.modules.update(saved)


def _prototorch(sizes, x, labels, protos, plabels):
    pt = _PROTOTORCH
    d = pt["distances"].squared_euclidean_distance(x, protos)
    if _HEADS[sizes["head"]] == "glvq":
        return pt["activations"].sigmoid_beta(pt["losses"].glvq_loss(d, labels, plabels),
                                              beta=5.0).mean()
    if _HEADS[sizes["head"]] == "rslvq":
        return pt["losses"].rslvq_loss(torch.exp(-d / 2.0), labels, plabels).mean()
    raise DoesNotApply(f"prototorch has no {_HEADS[sizes['head']]} head")


_PROTOTORCH = prototorch_losses()
BASELINES = {"prototorch": _prototorch} if _PROTOTORCH is not None else {}
_HEADS = ("glvq", "rslvq", "dpnp", "case_based", "sinkhorn")


def _case(head, n, m, d, classes):
    return (f"{_HEADS[head]} N{n} M{m} D{d}", "high", torch.float32,
            {"head": head, "N": n, "M": m, "D": d, "C": classes})


def model_cases(quick: bool):
    """Heads inside models: prototype heads of 10-2000 prototypes on 256-8192 samples."""
    if quick:
        return [_case(h, 64, 10, 16, 5) for h in range(len(_HEADS))]
    rows = []
    for head in range(len(_HEADS)):
        one_per_class = _HEADS[head] in ("rslvq", "dpnp")  # prototorch's RSLVQ; DPNP's design
        for n, m, d in [(256, 10, 512), (8192, 100, 64), (4096, 1000, 128)]:
            rows.append(_case(head, n, m, d, m if one_per_class else max(m // 10, 2)))
    return rows


cases = model_cases


def rows_of(head: str):
    """model_cases restricted to one head's rows (the loss ops' own benchmark grids)."""
    return lambda quick: [case for case in model_cases(quick) if case[0].startswith(head + " ")]


def op_benchmark(head: str):
    """What a head's op benchmark (benchmarks/<op>.py) shares with this file: (BASELINES,
    make_inputs, work, naive, cases) for that head's rows; the op file adds OP and fused."""
    def naive_head(sizes, x, labels, protos, plabels):
        return NAIVE[head](x, labels, protos, plabels)
    return {}, make_inputs, work, naive_head, rows_of(head)


def make_inputs(sizes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sizes["N"], sizes["D"], device=device, dtype=dtype, generator=generator)
    protos = torch.randn(sizes["M"], sizes["D"], device=device, dtype=dtype, generator=generator)
    labels = torch.randint(0, sizes["C"], (sizes["N"],), device=device, generator=generator)
    return x, labels, protos, torch.arange(sizes["M"], device=device) % sizes["C"]


def work(sizes, dtype, backward: bool):
    n, m, d = sizes["N"], sizes["M"], sizes["D"]
    size = torch.tensor([], dtype=dtype).element_size()
    return 6 * n * m * d, size * (2 * n * d + 2 * m * d)
