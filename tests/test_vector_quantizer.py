"""nn.VectorQuantizer: forward against the ops, straight-through gradient, losses, EMA update,
k-means init, dead-code restart, usage/perplexity, layouts, compile, autocast, state_dict, bad
configuration, and codebook sync across 2 gloo ranks."""
import pytest
import torch
import torch.nn.functional as F

import protokernels
from _distributed import run_ranks
from conftest import DEVICE, HAS_GPU, relative_error
from protokernels.nn import VectorQuantizer


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def quantizer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("precision", "ieee")
    return VectorQuantizer(12, 7, groups=3, **kwargs).to(DEVICE)


@pytest.mark.parametrize("ema", [True, False])
def test_forward_is_search_then_lookup(ema):
    vq = quantizer(ema=ema).eval()
    x = randn(2, 20, 12)
    quantized, indices, loss = vq(x)
    dist, idx = protokernels.dw_nearest(x, vq.codebook.detach(), precision="ieee")
    assert torch.equal(indices, idx) and indices.shape == (2, 20, 3)
    assert torch.equal(quantized, protokernels.codebook_lookup(idx, vq.codebook.detach()))
    assert torch.equal(vq.get_codes_from_indices(indices), quantized)
    commitment = F.mse_loss(x, quantized)
    expected = 0.25 * commitment + (0 if ema else commitment)
    assert relative_error(loss, expected) <= 1e-5


def test_channel_first_images():
    vq = quantizer(channel_last=False).eval()
    x = randn(2, 12, 5, 6)
    quantized, indices, _ = vq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 5, 6, 3)
    flat, flat_indices, _ = quantizer().eval()(x.movedim(1, -1))
    assert torch.equal(indices, flat_indices) and torch.equal(quantized, flat.movedim(-1, 1))
    assert torch.equal(vq.get_codes_from_indices(indices), quantized)


@pytest.mark.parametrize("ema", [True, False])
def test_straight_through_and_loss_gradients(ema):
    vq = quantizer(ema=ema, commitment_weight=0.5)
    x = randn(30, 12).requires_grad_()
    quantized, _, loss = vq(x)
    g = randn(30, 12)
    (quantized * g).sum().backward(retain_graph=True)
    assert torch.equal(x.grad, g)  # the decoder's gradient passes to x unchanged
    x.grad = None
    loss.backward()
    xr = x.detach().clone().requires_grad_()
    codes = quantized.detach()
    (0.5 * F.mse_loss(xr, codes)).backward()
    assert relative_error(x.grad, xr.grad) <= 1e-5  # commitment only
    if not ema:  # the codebook loss reaches the chosen codes
        assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_ema_update_with_laplace_smoothing():
    vq = quantizer(decay=0.9, eps=1e-3)
    before = vq.codebook.clone()
    x = randn(50, 12)
    _, indices, _ = vq(x)
    idx = protokernels.dw_nearest(x, before, precision="ieee")[1]
    assert torch.equal(indices, idx)
    counts, sums = protokernels.codebook_stats(x, idx, 7)
    count = 0.9 * 1.0 + 0.1 * counts.double()
    total = count.sum(-1, keepdim=True)
    smoothed = (count + 1e-3) / (total + 7e-3) * total
    expected = (0.9 * before.double() + 0.1 * sums.double()) / smoothed[..., None]
    assert relative_error(vq.codebook, expected) <= 1e-6
    assert torch.equal(vq.last_counts, counts)


def test_eval_does_not_update():
    vq = quantizer().eval()
    before = vq.codebook.clone()
    vq(randn(50, 12))
    assert torch.equal(vq.codebook, before)


@pytest.mark.parametrize("ema", [True, False])
def test_kmeans_init_on_first_training_batch(ema):
    vq = quantizer(ema=ema, kmeans_init=True, kmeans_iters=10)
    assert not vq.initialized
    centers = randn(3, 7, 4) * 10  # well-separated clusters per group
    labels = torch.randint(0, 7, (400, 3), device=DEVICE)
    x = (centers[torch.arange(3, device=DEVICE), labels] + 0.01 * randn(400, 3, 4)).flatten(1)
    _, _, loss = vq(x)
    assert vq.initialized
    # Lloyd's fixed point: each used code is the mean of its vectors (k-means from random
    # vectors may merge two clusters, so the codes need not recover every centre).
    _, idx = protokernels.dw_nearest(x, vq.codebook, precision="ieee")
    counts, sums = protokernels.codebook_stats(x, idx, 7)
    used = counts > 0
    means = sums / counts.clamp_min(1)[..., None]
    assert relative_error(vq.codebook[used], means[used]) <= 1e-4
    random_loss = quantizer(ema=ema)(x)[2]
    assert loss < 0.2 * random_loss
    before = vq.codebook.clone()
    vq.eval()(x)
    assert torch.equal(vq.codebook, before)  # initialized once


def test_dead_code_restart_from_batch_vectors():
    vq = quantizer(dead_code_threshold=1e9)  # every code is dead
    x = randn(40, 12)
    vq(x)
    slices = x.view(40, 3, 4)
    for g in range(3):  # each code is now one of the batch's group-g slices
        exact = torch.cdist(vq.codebook[g], slices[:, g], compute_mode="donot_use_mm_for_euclid_dist")
        assert exact.amin(-1).max() == 0


def test_usage_and_perplexity():
    vq = quantizer()
    vq(randn(1, 12).expand(30, 12))  # one vector: one code per group
    assert torch.equal(vq.usage, torch.full((3,), 1 / 7, device=DEVICE))
    assert torch.allclose(vq.perplexity, torch.ones(3, device=DEVICE))
    vq(randn(500, 12))
    assert (vq.perplexity > 3).all() and (vq.perplexity <= 7).all() and (vq.usage > 0.5).all()


def test_state_dict_round_trip():
    vq = quantizer(kmeans_init=True)
    vq(randn(60, 12))
    vq.eval()
    other = VectorQuantizer(12, 7, groups=3, kmeans_init=True, precision="ieee").to(DEVICE)
    other.load_state_dict(vq.state_dict())
    x = randn(10, 12)
    assert torch.equal(other.eval()(x)[0], vq(x)[0])
    assert set(vq.state_dict()) == {"codebook", "ema_count", "ema_sum", "initialized"}
    other.train()(x)  # loaded as initialized: no k-means on this batch
    assert not other._needs_init


def test_half_precision_input_and_autocast():
    vq = quantizer().eval()
    x = randn(20, 12)
    quantized, indices, _ = vq(x.to(torch.bfloat16))
    assert quantized.dtype == torch.bfloat16 and vq.codebook.dtype == torch.float32
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        h = torch.nn.functional.linear(x, torch.eye(12, device=DEVICE))  # bf16 under autocast
        quantized, indices, loss = vq(h)
    assert quantized.dtype == h.dtype and loss.dtype == torch.float32


def test_compile():
    vq = quantizer().eval()
    x = randn(2, 20, 12)
    compiled = torch.compile(vq, backend="aot_eager" if not HAS_GPU else "inductor")
    for expected, got in zip(vq(x), compiled(x)):
        assert torch.equal(expected, got)
    vq.train()
    x = randn(2, 20, 12).requires_grad_()
    quantized, _, loss = compiled(x)
    (quantized.sum() + loss).backward()
    assert x.grad is not None


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(dim=12, codebook_size=7, groups=5), ValueError,
     r"'dim' \(12\) must be divisible by 'groups' \(5\)"),
    (dict(dim=12, codebook_size=0), ValueError, "'codebook_size' must be a positive int"),
    (dict(dim=12, codebook_size=7, decay=1.0), ValueError, r"'decay' must be in \[0, 1\)"),
    (dict(dim=12, codebook_size=7, commitment_weight=-0.1), ValueError,
     "'commitment_weight' must be a finite number >= 0, got -0.1"),
    (dict(dim=12, codebook_size=7, eps=0.0), ValueError, "'eps' must be a finite number > 0"),
    (dict(dim=12, codebook_size=7, dead_code_threshold=-1), ValueError,
     "'dead_code_threshold' must be"),
    (dict(dim=12, codebook_size=7, decay="0.9"), TypeError, "'decay' must be a number, got str"),
    (dict(dim=12, codebook_size=7, kmeans_iters=0), ValueError, "'kmeans_iters' must be"),
])
def test_bad_configuration(kwargs, error, message):
    with pytest.raises(error, match=message):
        VectorQuantizer(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="must have dim = 12 features in dimension 1"):
        quantizer(channel_last=False)(randn(2, 5, 12))
    with pytest.raises(ValueError, match="must have dim = 12 features in dimension -1"):
        quantizer()(randn(2, 5, 11))


@pytest.mark.parametrize("x,message", [
    (lambda: torch.ones(4, 12, dtype=torch.int64, device=DEVICE), "floating-point.*got torch.int64"),
    (lambda: torch.ones(4, 12, dtype=torch.int32, device=DEVICE), "floating-point.*got torch.int32"),
    (lambda: torch.ones(4, 12, dtype=torch.complex64, device=DEVICE),
     "floating-point.*got torch.complex64"),
    (lambda: None, "must be a torch.Tensor, got NoneType"),
])
def test_bad_input_type(x, message):
    with pytest.raises(TypeError, match=f"'x' must be a {message}" if "float" in message
                       else message):
        quantizer()(x())


def _settle():
    if HAS_GPU:
        torch.cuda.synchronize()  # the skip notice is read once the GPU has reached it


@pytest.mark.parametrize("ema", [True, False])
def test_a_non_finite_batch_never_reaches_the_codebook(ema):
    vq = quantizer(ema=ema, dead_code_threshold=0.5)
    x = randn(64, 12)
    x[0, 0] = float("nan")
    x[5, 7] = float("inf")
    before = vq.codebook.detach().clone()
    state = (vq.ema_count.clone(), vq.ema_sum.clone()) if ema else None
    quantized, _, loss = vq(x)
    loss.backward() if not ema else None
    assert loss.isnan()  # NaN in, NaN out: the loss says so
    assert torch.equal(vq.codebook.detach(), before)
    if ema:
        assert torch.equal(vq.ema_count, state[0]) and torch.equal(vq.ema_sum, state[1])
    else:  # the codebook loss leaves the non-finite rows out: no NaN gradient into the codes
        assert torch.isfinite(vq.codebook.grad).all()
    _settle()
    with pytest.warns(RuntimeWarning, match="held NaN or infinity; its codebook update was "
                                            "skipped"):
        quantized, indices, loss = vq(randn(64, 12))
    assert torch.isfinite(quantized).all() and torch.isfinite(loss)
    assert torch.isfinite(vq.codebook).all()
    if ema:
        assert not torch.equal(vq.codebook, before)  # the clean batch updated it


def test_kmeans_init_waits_for_a_finite_batch():
    vq = quantizer(kmeans_init=True)
    x = randn(64, 12)
    x[3, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="k-means initialization waits"):
        vq(x)
    assert not vq.initialized and torch.isfinite(vq.codebook).all()
    _settle()
    with pytest.warns(RuntimeWarning, match="its codebook update was skipped"):
        vq(randn(64, 12))
    assert vq.initialized and torch.isfinite(vq.codebook).all()


@pytest.mark.parametrize("ema,decay", [(True, 0.0), (True, 0.99), (False, 0.99)])
def test_empty_training_batch_changes_nothing(ema, decay):
    vq = quantizer(ema=ema, decay=decay)
    before = vq.codebook.detach().clone()
    quantized, indices, loss = vq(randn(0, 12))
    assert quantized.shape == (0, 12) and indices.shape == (0, 3)
    assert loss.item() == 0
    assert torch.equal(vq.codebook.detach(), before)


def test_restarted_code_starts_at_the_threshold_count():
    """As vector-quantize-pytorch's threshold_ema_dead_code: a replaced code's EMA count is the
    threshold and its EMA sum the sample times the threshold."""
    vq = quantizer(dead_code_threshold=3.0)
    vq(randn(40, 12))
    restarted = vq.ema_count == 3.0
    assert restarted.any()
    codes = vq.codebook[restarted]
    assert torch.allclose(vq.ema_sum[restarted], codes.float() * 3.0)


@pytest.mark.parametrize("deterministic", [None, False, True])
def test_statistics_paths_users_get(deterministic):
    """The EMA statistics on the path users get by default (atomic scatter: deterministic
    algorithms off) as well as the deterministic one: the same update to rounding."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        vq = quantizer(deterministic=deterministic, decay=0.5)
        reference = quantizer(decay=0.5)
        x = randn(500, 12)
        vq(x)
        with protokernels.use_backend("reference"):
            torch.use_deterministic_algorithms(True, warn_only=True)
            reference(x)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=True)
    assert relative_error(vq.codebook, reference.codebook) <= 1e-5
    assert torch.equal(vq.last_counts, reference.last_counts)


# -- two gloo ranks ---------------------------------------------------------------------------

def _rank_codebooks(rank, rows):
    torch.manual_seed(0)
    data = torch.randn(sum(rows), 12)
    start = sum(rows[:rank])
    local = data[start:start + rows[rank]]  # ranks see different batch sizes (even 0)
    torch.manual_seed(rank)  # different initial codebooks: the first step syncs them
    synced = VectorQuantizer(12, 7, groups=3, kmeans_init=True, dead_code_threshold=0.5)
    plain = VectorQuantizer(12, 7, groups=3)
    for _ in range(3):
        synced(local)
        plain(local)
    return synced.codebook, plain.codebook, plain.last_counts


@pytest.mark.parametrize("rows", [(40, 25), (30, 0)], ids=["uneven", "one-empty"])
def test_two_gloo_ranks_hold_the_same_codebook(rows):
    results = run_ranks(_rank_codebooks, 2, rows)
    (synced0, plain0, counts0), (synced1, plain1, counts1) = results[0], results[1]
    assert torch.equal(synced0, synced1) and torch.equal(plain0, plain1)
    assert torch.equal(counts0, counts1)  # the all-reduced statistics
    # Without k-means/restarts, the synced EMA equals one process on the concatenated batch.
    torch.manual_seed(0)
    data = torch.randn(sum(rows), 12)
    torch.manual_seed(0)  # rank 0's initial codebook
    VectorQuantizer(12, 7, groups=3)
    single = VectorQuantizer(12, 7, groups=3)
    for _ in range(3):
        single(data)
    assert relative_error(plain0, single.codebook) <= 1e-6
    assert torch.equal(counts0, single.last_counts)
