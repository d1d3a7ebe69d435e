"""Shared fixtures: the backends that can run here, float64 comparison, poisoned outputs.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is imported), on small shapes; with one, every backend runs on CUDA tensors.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import protokernels  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")

# Relative-error bounds of the README ("Precision") by dtype / float32 precision.
TOLERANCE = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2e-3, torch.float16: 1e-2,
             torch.bfloat16: 1e-2, torch.float64: 1e-12}


def tolerance(dtype, precision="ieee"):
    return TOLERANCE[precision] if dtype == torch.float32 else TOLERANCE[dtype]


def backend_params():
    """(backend, device) pairs; those that cannot run here are skipped with the reason."""
    status = protokernels.available_backends()
    params = []
    for name in protokernels._backend.BACKENDS:
        reason = None if status[name].available else status[name].detail
        params.append(pytest.param(name, id=name,
                                   marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    with protokernels.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every new tensor starts as NaN, so an output element a kernel never wrote shows up."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def relative_error(out, ref):
    """||out - ref|| / ||ref|| in float64; inf if any element is not finite where ref is."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.equal(torch.isfinite(out), torch.isfinite(ref)):
        return float("inf")
    scale = ref.norm().item()
    return (out - ref).norm().item() / (scale if scale > 0 else 1.0)


def log_domain(scale_s, log_r, log_c, n_iters):
    """Log-domain Sinkhorn of scaled scores (the tests' float64 ground truth): columns then rows,
    n_iters times; returns the plan."""
    u = torch.zeros_like(log_r)
    for _ in range(n_iters):
        v = log_c - torch.logsumexp(scale_s + u[:, None], dim=0)
        u = log_r - torch.logsumexp(scale_s + v[None, :], dim=1)
    return torch.exp(scale_s + u[:, None] + v[None, :])


@pytest.fixture(params=[False, True], ids=["hopper", "portable"])
def portable(request, monkeypatch):
    """CUDA's tensor-core kernels (the searches, sqdist's forward) as a call gets them (the Hopper
    ones on a Hopper GPU, where they apply), or the portable ones that
    PROTOKERNELS_CUDA_PORTABLE=1 forces."""
    if not HAS_GPU or not protokernels.available_backends()["cuda"].available:
        pytest.skip("needs a GPU and the CUDA extension")
    if request.param:
        monkeypatch.setenv("PROTOKERNELS_CUDA_PORTABLE", "1")
    return request.param


def hopper_build():
    """A Hopper GPU and an extension built with sm_90a code: CUDA's Hopper kernels can run."""
    if not HAS_GPU or not protokernels.available_backends()["cuda"].available:
        return False
    return (torch.cuda.get_device_capability()[0] == 9
            and "sm90a" in torch.ops.protokernels.cuda_build_info())


# The deepest x rows, in 128-byte boxes, that stay in the Hopper kernels' shared memory on a 227 KB
# GPU beside their rings (csrc/hopper.cuh, walk_stages), by op and by products (TF32 or half,
# split TF32 at "tf32x3"): sqdist's forward float32 D <= 288 / 224 (half D <= 576), whose
# consumers keep 3 KB of norms; the search D <= 320 / 256 (half D <= 640), 1 KB.
HOPPER_DEPTH_BOXES = {"sqdist": (9, 7), "nearest": (10, 8)}


def hopper_fits(x, op, precision="tf32"):
    """Whether CUDA's Hopper kernel of `op` ("sqdist" or "nearest") takes x (B, N, D) at
    `precision`: TMA reads rows that start at multiples of 16 bytes, and x's rows must fit in
    shared memory."""
    row_bytes = x.shape[-1] * x.element_size()
    split = x.dtype == torch.float32 and precision == "tf32x3"
    boxes = HOPPER_DEPTH_BOXES[op][1 if split else 0]
    return row_bytes % 16 == 0 and -(-row_bytes // 128) <= boxes


def cuda_kernels_run(fn):
    """The names of the CUDA kernels that fn() launches (the profiler's), space-separated; None
    where the profiler sees none at all (under compute-sanitizer, which holds the profiling
    interface): the caller then skips its which-kernel check, and its values are still checked."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return " ".join(event.name for event in profile.events()) or None


def assert_ran(kernels, name, expected=True):
    """Whether kernel `name` is among those cuda_kernels_run() saw is `expected` (unchecked where it
    saw none)."""
    if kernels is not None:
        assert (name in kernels) == expected, kernels


def skip_unless_capable(backend, op, dtype, rows=0, k=1):
    """Skip when `backend` declares it cannot take this input (its capabilities, e.g. float64
    ranking in the nearest family); test_capabilities checks the error an explicit call gets."""
    reasons = protokernels._backend.capabilities(op, backend).not_supported_reasons(dtype, rows, k)
    if reasons:
        pytest.skip(f"{backend} cannot take it: {'; '.join(reasons)}")


def labelled_data(n, m, d, classes, dtype=torch.float32, seed=0):
    """(x, labels, prototypes, prototype_labels) for the LVQ losses: prototypes labelled
    0..classes-1 in turn, labels over one class more, so that some samples have no prototype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    protos = torch.randn(m, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    labels = torch.randint(0, classes + 1, (n,), generator=g).to(DEVICE)
    plabels = (torch.arange(m) % classes).to(DEVICE)
    return x, labels, protos, plabels


def check_loss(loss, truth, inputs, bound):
    """A loss op against float64: loss(*leaves) of fresh leaves cloned from the differentiable
    `inputs` comes back in the accumulate dtype; its backward of a random gradient `grad` is
    compared with truth(grad) -> (value, *gradients w.r.t. inputs): the value within `bound`,
    each gradient within 10 * bound (it compounds the value's rounding)."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    value = loss(*leaves)
    assert value.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    grad = torch.randn(value.shape, device=DEVICE, dtype=value.dtype)
    value.backward(grad)
    want, *want_grads = truth(grad)
    assert relative_error(value, want) <= bound
    for leaf, want_grad in zip(leaves, want_grads):
        assert relative_error(leaf.grad, want_grad) <= 10 * bound

