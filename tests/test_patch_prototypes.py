"""nn.PatchPrototypes: minimum patch distances and ProtoPNet's similarity against float64
unfold formulas, gradients, push (projection onto the nearest training patch, batched, with
per-image restrictions), every backend, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, relative_error, skip_unless_capable
from protokernels.nn import PatchPrototypes


def min_patch_distance(features, prototypes):
    k = prototypes.shape[-1]
    cols = F.unfold(features.double(), k)  # (B, C k k, L)
    d = (cols[:, None] - prototypes.double().flatten(1)[None, :, :, None]).square().sum(2)
    return d.min(-1)  # (B, P)


@pytest.mark.parametrize("kernel", [1, 3])
def test_min_distances_and_similarities(backend, kernel):
    torch.manual_seed(0)
    layer = PatchPrototypes(4, 6, kernel, eps=1e-3).to(DEVICE)
    features = torch.randn(3, 4, 7, 8, device=DEVICE)
    min_d, sim = layer(features)
    expected = min_patch_distance(features, layer.prototypes).values
    assert relative_error(min_d, expected) <= 1e-5
    assert relative_error(sim, torch.log((expected + 1) / (expected + 1e-3))) <= 1e-5


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = PatchPrototypes(2, 3, 2).double().to(DEVICE)
    features = torch.randn(2, 2, 4, 4, dtype=torch.float64, device=DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda f: torch.cat(layer(f)), (features,))


@pytest.mark.parametrize("kernel", [1, 2])
def test_push_projects_onto_the_nearest_training_patch(backend, kernel):
    skip_unless_capable(backend, "nearest", torch.float32)
    torch.manual_seed(0)
    layer = PatchPrototypes(3, 5, kernel).to(DEVICE)
    batches = [torch.randn(4, 3, 6, 5, device=DEVICE) for _ in range(3)]
    before = layer.prototypes.detach().clone()
    found = layer.push(iter(batches))
    everything = torch.cat(batches)
    best = min_patch_distance(everything, before)
    assert relative_error(found["distance"], best.values.min(0).values) <= 1e-5
    for p in range(5):
        b, i, r, c = (int(found[key][p]) for key in ("batch", "image", "row", "col"))
        patch = batches[b][i, :, r:r + kernel, c:c + kernel]
        assert torch.equal(layer.prototypes[p], patch)
    # the channels_last layout searches the same patches, as a view
    layer2 = PatchPrototypes(3, 5, kernel).to(DEVICE)
    layer2.prototypes.data.copy_(before)
    again = layer2.push([t.contiguous(memory_format=torch.channels_last) for t in batches])
    assert torch.equal(again["image"], found["image"]) and torch.equal(layer2.prototypes,
                                                                       layer.prototypes)


def test_push_respects_allowed_images():
    torch.manual_seed(0)
    layer = PatchPrototypes(2, 2, 1).to(DEVICE)
    features = torch.randn(4, 2, 3, 3, device=DEVICE)
    allowed = torch.tensor([[True, False], [True, False], [False, True], [False, False]],
                           device=DEVICE)
    found = layer.push(features, allowed_images=lambda batch, b: allowed)
    assert found["image"][0].item() in (0, 1) and found["image"][1].item() == 2
    nobody = PatchPrototypes(2, 1, 1).to(DEVICE)
    before = nobody.prototypes.detach().clone()
    found = nobody.push(features, allowed_images=lambda batch, b: torch.zeros(b, 1, dtype=torch.bool,
                                                                             device=DEVICE))
    assert found["image"].item() == -1 and found["distance"].item() == math.inf
    assert torch.equal(nobody.prototypes, before)


@pytest.mark.parametrize("call,error,message", [
    (lambda: PatchPrototypes(0, 3), ValueError, "'in_channels' must be a positive int"),
    (lambda: PatchPrototypes(3, 3, eps=0), ValueError, "'eps' must be a finite number > 0"),
    (lambda: PatchPrototypes(3, 2)(torch.randn(2, 4, 5, 5)), ValueError, "must have 3 channels"),
    (lambda: PatchPrototypes(3, 2)(torch.randn(3, 5, 5)), TypeError, "'features' must be a 4-D"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
