"""Backend selection: which implementation (cuda, triton, reference) runs an op.

The choice is made in the public wrappers, before the custom op is called, and is passed to the op
as a string argument. That keeps the op itself a pure function of its arguments (torch.compile
guards on the global setting read here, CUDA graphs replay whatever backend was captured).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import re
import warnings
from typing import NamedTuple

import torch

from ._capabilities import EVERYTHING, Capabilities

BACKENDS = ("cuda", "triton", "reference")
_CHOICES = BACKENDS + ("auto",)

# The op file (csrc/<file>.cu, triton_kernels/<file>.py, reference/<file>.py) of each public op:
# its kernels and their capabilities live there.
OP_FILES = {
    "sqdist": "sqdist", "nearest": "nearest", "nearest_k": "nearest",
    "nearest_by_label": "nearest", "nearest_both": "nearest", "dw_nearest": "nearest",
    "dw_quantize": "nearest",
    # glvq_loss: nearest_by_label's search (its capabilities) and an epilogue in glvq_loss.*
    "glvq_loss": "nearest",
    # rslvq_loss: sqdist's kernels (its capabilities) and an epilogue in rslvq_loss.*
    "rslvq_loss": "sqdist",
    # prototype_layer: sqdist's kernels and two torch reductions
    "prototype_layer": "sqdist",
    "codes_cross_entropy": "codes_cross_entropy", "dpnp_loss": "dpnp_loss",
    "kp_conv2d": "kp_conv", "kp_conv1d": "kp_conv", "codebook_lookup": "codebook_lookup",
    # kp_conv's gradients, which `auto` places on their own (_hopper_grad_input_order,
    # _hopper_weight_gradient_order)
    "kp_conv2d_grad_input": "kp_conv", "kp_conv2d_grad_weight": "kp_conv",
    "codebook_stats": "codebook_stats", "sinkhorn": "sinkhorn", "sinkhorn_plan": "sinkhorn",
    # sinkhorn_prototype_loss: sinkhorn's iteration and codes_cross_entropy's row kernel
    "sinkhorn_prototype_loss": "sinkhorn",
}
_FILES = tuple(dict.fromkeys(OP_FILES.values()))


TRITON_FIRST = ("triton", "cuda", "reference")
CUDA_FIRST = ("cuda", "triton", "reference")


def _backend_by_work(sizes, keys: str, cuda_up_to: int):
    """CUDA first for problems whose work (the product of the sizes named in `keys`) is at most
    `cuda_up_to`, Triton first above."""
    work = 1
    for key in keys.split():
        work *= sizes.get(key, 1)
    return CUDA_FIRST if work <= cuda_up_to else TRITON_FIRST


def _ffma_search_order(sizes):
    """CUDA's FFMA search (top k, float32 "ieee") against Triton's: see _AUTO_ORDER."""
    return _backend_by_work(sizes, "batch n m d", 2**28 if _wants_grad(sizes) else 2**26)


def _tensor_search_order(dtype, precision, sizes):
    """CUDA's mma.sync search against Triton's wgmma kernel (float32 "ieee": the FFMA
    searches'): see _AUTO_ORDER."""
    if dtype == torch.float32 and precision == "ieee":
        return _ffma_search_order(sizes)
    return _backend_by_work(sizes, "batch n m d", 2**30)


def _hopper_row_bytes(op_file, dtype, precision, sizes):
    """The bytes of x's rows where CUDA's Hopper kernel of op_file takes them (at most its
    declared depth at this dtype and precision: Capabilities.hopper_depth), else None."""
    declared = _CAPABILITIES.get(("cuda", op_file))
    row_bytes = sizes.get("d", 0) * dtype.itemsize
    if declared is None or not 0 < row_bytes <= declared.hopper_depth(dtype, precision):
        return None
    return row_bytes


def _hopper_search_order(dtype, precision, sizes):
    """Where CUDA runs its Hopper search (one best per row at "tf32", "tf32x3" or in half
    precision, rows of at most the capability's hopper_depth(dtype, precision)): CUDA first at
    every size for rows of 128 bytes or more, for float32 rows at "tf32" of any depth, and for
    half rows of 16-64 bytes against 8192 columns or more. H200, eager ms against Triton's
    (RESULTS.md "The fold's ALU work"): N65536 M8192 D256 tf32 0.93 against 1.35, bf16 0.55
    against 0.81, "tf32x3" 2.53 against 3.71; dw N65536 G8 K1024 Dg64 tf32 0.48 against 0.63,
    bf16 0.38 against 0.43; rows of 64 and 32 bytes at "tf32": dw Dg16 0.367 against 0.403, Dg8
    0.360 against 0.488, nearest N65536 M8192 D16 0.262 against 0.337. Half rows of 64 bytes or
    less: nearest N65536 M8192 bf16 D32 0.263 against 0.336, but with few column tiles a row
    block's fixed costs weigh more than Triton's (dw G8 K1024 bf16 Dg32 0.376 against 0.340,
    Dg16 0.373 against 0.300), so there None (the mma.sync boundary, where CUDA runs this same
    kernel)."""
    row_bytes = _hopper_row_bytes("nearest", dtype, precision, sizes)
    if row_bytes is None:
        return None
    if (row_bytes >= 128 or (dtype == torch.float32 and precision == "tf32")
            or sizes.get("m", 0) >= 8192):
        return CUDA_FIRST
    return None


def _hopper_distance_order(dtype, precision, sizes):
    """Where CUDA runs sqdist's Hopper forward ("tf32", "tf32x3" or half precision, rows of at
    most the capability's hopper_depth(dtype, precision)): CUDA first at every size. Its one C++
    launch (host ~47 us a call against Triton's ~70, which splits "tf32x3" operands in launches
    of their own) wins every host-bound forward (H200 eager: N256 M10 D64 0.057 against 0.089
    ms, N4096 M512 D128 0.064 against 0.095), and since its shared-memory reads are shared
    loads, its kernel the large ones (H200: the spec size B8 N4096 M4096 D128 0.232 against
    0.318, bf16 0.152 against 0.218; N8192 M2000 D256 0.065 against 0.140, GPU time 0.061
    against 0.062; "tf32x3" B2 N4096 M4096 D224 0.178 against 0.284). RESULTS.md "The Hopper
    distance", "The Hopper search's own end"."""
    if _hopper_row_bytes("sqdist", dtype, precision, sizes) is None:
        return None
    return CUDA_FIRST


def _hopper_gradient_order(dtype, precision, sizes):
    """With a backward, float32 at "tf32" or "tf32x3" or a half type where CUDA runs both Hopper
    kernels (x's rows fit the forward's walk; the gradient's TMA reads grad's rows of M
    elements, which must start at multiples of 16 bytes): CUDA first at every size. Its gradient
    reads G once per gradient at ~2.2 TB/s and sums G's rows from the same registers (H100 tf32
    fwd+bwd: B8 N4096 M4096 D128 0.860 against Triton's 1.176 ms, D64 0.694 against 0.989, N4096
    M512 D128 0.253 against 0.511; RESULTS.md "The Hopper gradient"; H200 bf16 fwd+bwd: B8 N4096
    M4096 D128 0.411 against 0.450, N8192 M2000 D256 0.378 against 0.732, RESULTS.md "Half
    precision on the Hopper kernels")."""
    if (dtype == torch.float64 or sizes.get("m", 0) * dtype.itemsize % 16
            or _hopper_row_bytes("sqdist", dtype, precision, sizes) is None):
        return None
    return CUDA_FIRST


def _kp_conv_hopper(kernel: str, dtype, precision, sizes, halves=False) -> bool:
    """CUDA declares kp_conv's Hopper `kernel` here (the capability hopper_kernels) and the call
    is float32 at "tf32" or "tf32x3" (or, with `halves`, a half type at any precision: CUDA
    widens its x and g to float32 copies, exact in TF32) with stride 1 along the width, as its
    Hopper kernels need; the convolution kernel (forward, grad input) takes kernels up to 4 wide,
    3 at float32's "tf32x3" (the weight gradient any width)."""
    declared = _CAPABILITIES.get(("cuda", "kp_conv"))
    convolution = kernel != "kp_conv2d_grad_weight"
    split = dtype == torch.float32 and precision == "tf32x3"
    return (declared is not None and kernel in declared.hopper_kernels
            and ((halves and dtype in (torch.float16, torch.bfloat16)) or split or
                 (dtype == torch.float32 and precision == "tf32"))
            and sizes.get("stride_w") == 1
            and not (convolution and sizes.get("kw", 0) > (3 if split else 4)))


def _hopper_forward_order(dtype, precision, sizes):
    """kp_conv's forward where CUDA runs its Hopper kernel (kernels up to 4 wide, at least 32
    channels: fewer pad its 32-channel K steps with zeros), with or without a backward (each
    gradient has its own backend): CUDA first. H100, through the host functions: the spec size
    0.110 ms against Triton's 0.138, B8 C128 32x32 P256 0.057 against 0.084, B16 C256 28x28 P512
    0.274 against 0.292; B32 C64 14x14 P64 0.037-0.068 against 0.042-0.070 (host-bound, eager
    noise); "tf32x3" at the spec size 0.235 against 0.607. RESULTS.md "kp_conv's forward on
    Hopper", "kp_conv's grad input on Hopper", "Split products in kp_conv's Hopper kernels". Not
    the half types: on a float32 copy of x it loses to Triton's half-precision MMAs (H200 bf16
    spec size 0.115 against 0.095 ms, B16 C256 28x28 P512 0.238 against 0.214; RESULTS.md "Half
    precision on the Hopper kernels")."""
    if not _kp_conv_hopper("kp_conv2d", dtype, precision, sizes) or sizes.get("c", 0) < 32:
        return None
    return CUDA_FIRST


def _hopper_grad_input_order(dtype, precision, sizes):
    """kp_conv's grad input where CUDA runs its Hopper kernel, the forward's kernel on g (a
    convolution of g: stride 1, padding within the kernel's reach; kernels up to 4 wide, at
    least 32 prototypes, g's channels there): CUDA first. H100, through the host functions: the
    spec size 0.127 ms against Triton's 0.181, B64 C1 28x28 P32 0.050 against 0.089, B8 C128
    32x32 P256 0.060 against 0.137, B16 C256 28x28 P512 0.307 against 0.336, B32 C64 14x14 P64
    0.039 against 0.039; "tf32x3" at the spec size 0.218 against 0.606 (RESULTS.md "kp_conv's
    grad input on Hopper", "Split products in kp_conv's Hopper kernels"). The half types too, on
    a float32 copy of g: its kernel alone is slower than Triton's half-precision one (H200 spec
    size 0.178 ms against 0.108), but a Triton grad input adds 100-450 us of host time to each
    training step, which eager steps pay: bf16 fwd+bwd with the forward on Triton and the
    weight gradient on CUDA, 0.490 ms with this grad input against 0.735 (B8 C128 32x32 P256:
    0.83 against 0.97; B16 C256 28x28 P512, GPU-bound: 0.88 against 0.76; RESULTS.md "Half
    precision on the Hopper kernels")."""
    if (not _kp_conv_hopper("kp_conv2d_grad_input", dtype, precision, sizes, halves=True)
            or not sizes.get("grad_input_conv") or sizes.get("p", 0) < 32):
        return None
    return CUDA_FIRST


def _hopper_weight_gradient_order(dtype, precision, sizes):
    """kp_conv's weight gradient where CUDA runs its Hopper kernel: CUDA first, whatever backend
    runs the forward. TMA reads g and x as they lie, so the gradient's GEMM runs without the
    gathers that hold the other kernels to a quarter of the forward's speed: H100, the spec size
    0.114 ms against Triton's 0.612, and faster at each in-model size measured (B64 C1 8x8 P16
    0.031 against 0.153 up to B16 C256 28x28 P512 0.289 against 1.020; "tf32x3" at the spec
    size 0.322 against 1.411; RESULTS.md "kp_conv's weight gradient on Hopper", "Split products
    in kp_conv's Hopper kernels"). The half types too, on float32 copies of g and x: H200, the
    spec size bf16 0.162 against Triton's 0.618, B16 C256 28x28 P512 0.287 against 0.853, B8
    C128 32x32 P256 0.062 against 0.147 (RESULTS.md "Half precision on the Hopper kernels")."""
    if not _kp_conv_hopper("kp_conv2d_grad_weight", dtype, precision, sizes, halves=True):
        return None
    return CUDA_FIRST


def _wants_grad(sizes) -> bool:
    return bool(sizes.get("grad", False))


def wants_grad(*tensors) -> bool:
    """Whether a call on these tensors will be differentiated (its backward follows)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# `auto` on CUDA tensors: per op, the backends to try, fastest first, by problem size, dtype and
# precision (sizes as the public wrappers pass them; "grad": the call will be differentiated, its
# backward runs on the same backend). Each boundary cites benchmarks/RESULTS.md; an unavailable
# backend, or one that cannot take the input (its capabilities), is skipped.
#
# Why CUDA wins small problems: its host cost per call is lower (one C++ launch sequence; the
# Triton path is Python with two or more launches), and at small sizes the host cost is the time.
# Its kernels are slower (simple tiles, no warp specialization), so Triton wins once the GPU
# time shows. Every row behind these numbers: RESULTS.md "In-model sizes, host cost, cold start
# and the prototype heads, 2026-11-26, H100".
_AUTO_ORDER = {
    # sqdist: with a backward, CUDA at every size where its Hopper forward and gradient both run
    # (_hopper_gradient_order); elsewhere CUDA's cheaper launches win up to N*M*D = 2^30 (H200,
    # its Hopper forward: N4096 M512 D128 fwd+bwd 0.615 vs 0.848 ms; RSLVQ N4096 M1000 D128,
    # 2^29: 0.750 vs 1.075; the case-based layer there 0.959 vs 1.287) and lose at 2^32 (N8192
    # M2000 D256: 1.67 vs 0.60, the gradient's tile kernel; RESULTS.md "The sqdist rule"). The
    # forward alone: CUDA where its Hopper kernel runs (_hopper_distance_order), else Triton (its
    # kernel's GPU time, N256 M10 D64: 0.0058 ms vs CUDA's tile kernel 0.0166).
    # rslvq_loss and prototype_layer are sqdist with an epilogue: sqdist's rule.
    **dict.fromkeys(("sqdist", "rslvq_loss", "prototype_layer"),
                    lambda dtype, precision, sizes: (
                        (_hopper_gradient_order(dtype, precision, sizes)
                         or _backend_by_work(sizes, "batch n m d", 2**30)) if _wants_grad(sizes)
                        else _hopper_distance_order(dtype, precision, sizes) or TRITON_FIRST)),
    # The nearest family. One best per row on tensor cores (nearest, nearest_by_label,
    # nearest_both, dw_nearest at "tf32"/"tf32x3" or in half precision) runs CUDA's mma.sync
    # search: CUDA up to N*M*D = 2^30 (N4096 M512 D128 tf32: 0.024-0.038 vs 0.074-0.099 ms; dw
    # N8192 K512 Dg64: 0.036-0.049 vs 0.090-0.116), Triton's wgmma kernel above (N65536 M1024
    # D64: 0.175 vs 0.090-0.12; the spec size 2.4 vs 1.35). Top k and float32 "ieee" run CUDA's
    # FFMA search: CUDA up to 2^26 (N8192 M100 D64: 0.074 vs 0.181 ms; labels: 0.062 vs 0.131),
    # Triton from 2^28 (N4096 M512 D128: 0.097 vs 0.213); with a backward CUDA up to 2^28
    # (N4096 M512 D128 fwd+bwd 0.560 vs 0.720). RESULTS.md "The tensor-core CUDA search".
    # On a Hopper GPU, nearest and dw_nearest at "tf32" or in half precision run CUDA's Hopper
    # search where x's rows fit (the capability hopper_depth_bytes): _hopper_search_order.
    "nearest_k": lambda dtype, precision, sizes: _ffma_search_order(sizes),
    **dict.fromkeys(("nearest", "dw_nearest", "dw_quantize"),
                    lambda dtype, precision, sizes: (
                        _hopper_search_order(dtype, precision, sizes)
                        or _tensor_search_order(dtype, precision, sizes))),
    # glvq_loss is nearest_by_label's search with an epilogue launch: the search's rule.
    **dict.fromkeys(("nearest_by_label", "nearest_both", "glvq_loss"), lambda dtype, precision,
                    sizes: _tensor_search_order(dtype, precision, sizes)),
    # kp_conv: the forward on CUDA where its Hopper kernel runs (_hopper_forward_order); else
    # CUDA up to B*P*H*W*C*kh*kw = 2^21, H*W the input's (B64 C1 8x8 P16: fwd 0.0165 vs 0.0203
    # ms, fwd+bwd 0.185 vs 0.477), Triton above (B64 C1 28x28 P32: fwd 0.028 vs 0.048, fwd+bwd
    # 0.593 vs 0.656; the spec size 0.139 vs 4.30).
    **dict.fromkeys(("kp_conv2d", "kp_conv1d"), lambda dtype, precision, sizes: (
        _hopper_forward_order(dtype, precision, sizes)
        or _backend_by_work(sizes, "batch p pixels c taps", 2**21))),
    # Its gradients: each on CUDA's Hopper kernel where that runs, else the forward's rule.
    "kp_conv2d_grad_input": lambda dtype, precision, sizes: (
        _hopper_grad_input_order(dtype, precision, sizes)
        or _backend_by_work(sizes, "batch p pixels c taps", 2**21)),
    "kp_conv2d_grad_weight": lambda dtype, precision, sizes: (
        _hopper_weight_gradient_order(dtype, precision, sizes)
        or _backend_by_work(sizes, "batch p pixels c taps", 2**21)),
    # codes_cross_entropy: one row kernel forward, one elementwise kernel backward, either way.
    # CUDA up to B*K = 2^22, Triton above: at SwAV's K3000 the training step takes CUDA
    # 0.225/0.216/0.357 ms at B256/1024/4096 against Triton 0.609/0.392/0.315, the forward
    # 0.051/0.059/0.075 against 0.071/0.072/0.052 (H100, RESULTS.md "DPNP in one op", the
    # one-pass kernels).
    "codes_cross_entropy": lambda dtype, precision, sizes: _backend_by_work(sizes, "n m", 2**22),
    # dpnp_loss: two cuBLAS products and one row kernel either way. CUDA's forward wins the three
    # head sizes (0.159/0.152/0.137 ms against Triton 0.188/0.179/0.336), its step two of them
    # (0.85/1.14/0.79 against 0.94/0.96/1.07). RESULTS.md "DPNP in one op".
    "dpnp_loss": lambda dtype, precision, sizes: CUDA_FIRST,
    # codebook_stats (also the scatter of the codes' gradient in dw_quantize's and
    # codebook_lookup's backward) and codebook_lookup: CUDA up to N*G*Dg = 2^22, where the call
    # is host-bound and CUDA's one C++ call wins (stats N8192 G1 K512 Dg64: 0.099 vs 0.112 ms,
    # N65536 G1 K1024 Dg64: 0.119 vs 0.130, dw_quantize's fwd+bwd there 0.538 vs 0.902; lookup
    # N8192 G1 K512 Dg64: 0.115 vs 0.139, N65536 G1 K1024 Dg64: 0.111 vs 0.133), Triton above
    # (stats N65536 G8 K1024 Dg32: 0.147 vs 0.187, GPU time 0.048 vs 0.107; lookup there 0.111
    # vs 0.187). RESULTS.md "One call for the VQ step".
    **dict.fromkeys(("codebook_lookup", "codebook_stats"),
                    lambda dtype, precision, sizes: _backend_by_work(sizes, "n batch d", 2**22)),
    # sinkhorn: CUDA up to B*K = 2^24 with K <= 8192, where its whole iteration is one
    # cooperative launch (33-44 us of host time against Triton's ~300 for eight launches): B256
    # K3000 0.036 vs 0.385 ms, B1024 0.045 vs 0.236, B4096 0.100 vs 0.254 (H100; GPU time at
    # B4096 0.096). RESULTS.md "Sinkhorn's whole iteration in groups of rows" and "Sinkhorn in
    # one launch".
    # Triton above: beyond 8192 columns CUDA runs sweep by sweep (B65536 K16384: 128 vs 31.6 ms).
    # A call that must stop between the iterations (a
    # tolerance check, a cross-rank all-reduce: "stepwise") runs sweep by sweep on any backend,
    # and there Triton's sweeps win (above). sinkhorn_plan's iterations are the same sweeps.
    # sinkhorn_prototype_loss runs sinkhorn's iteration: its rule.
    **dict.fromkeys(("sinkhorn", "sinkhorn_plan", "sinkhorn_prototype_loss"),
                    lambda dtype, precision, sizes: (
                        CUDA_FIRST if (not sizes.get("stepwise") and sizes["m"] <= 8192
                                       and sizes["n"] * sizes["m"] <= 2**24)
                        else TRITON_FIRST)),
}


class BackendStatus(NamedTuple):
    available: bool
    detail: str

    def __str__(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.detail


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (see `available_backends()`)."""


def _extension_load_error() -> str | None:
    """Load protokernels._C (which registers the CUDA kernels); return why it failed, or None."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU build; the CUDA backend needs a CUDA "
                "build of torch >= 2.10")
    spec = importlib.util.find_spec("protokernels._C")
    if spec is None or spec.origin is None:
        return ("protokernels was installed without its CUDA extension (built with "
                "PROTOKERNELS_SKIP_CUDA=1, or without nvcc / a CUDA build of torch). Fix: on a "
                "machine with nvcc, `pip install --no-build-isolation .` from the source tree")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:
        # torch 2.14 raises "Could not load this library: <path>" from the loader's own error.
        message = str(err) if err.__cause__ is None else f"{err}: {err.__cause__}"
        missing = re.search(r"lib(cudart|cublas)\.so\.(\d+)", message)
        if missing:
            return (f"the extension was built for CUDA {missing.group(2)}, but this torch uses "
                    f"CUDA {torch.version.cuda} ({message}). Fix: install protokernels-cu"
                    f"{torch.version.cuda.split('.')[0]} instead, or rebuild from source")
        if "undefined symbol" in message:
            return (f"the extension needs a symbol this torch ({torch.__version__}) lacks; it "
                    f"targets the stable ABI of torch >= 2.10 ({message}). Fix: upgrade torch to "
                    ">= 2.10, or rebuild from source against this torch")
        return f"the extension failed to load: {message}"
    return None


@functools.cache
def _status() -> dict[str, BackendStatus]:
    statuses = {"reference": BackendStatus(True, "plain PyTorch, any device")}
    has_gpu = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"

    error = _extension_load_error()
    if error is not None:
        statuses["cuda"] = BackendStatus(False, error)
    elif not has_gpu:
        statuses["cuda"] = BackendStatus(False, "extension loaded, but no CUDA device is visible")
    else:
        info = torch.ops.protokernels.cuda_build_info()
        major, minor = torch.cuda.get_device_capability()
        archs = [int(a) for a in re.findall(r"sm(\d+)", info)]
        if major * 10 + minor < min(archs):
            statuses["cuda"] = BackendStatus(
                False, f"GPU is sm_{major}{minor}, older than every architecture the extension "
                f"was built for ({info}). Fix: rebuild with PROTOKERNELS_CUDA_ARCH_LIST")
        else:
            statuses["cuda"] = BackendStatus(True, info)

    try:
        import triton
    except ImportError as err:
        statuses["triton"] = BackendStatus(False, f"triton does not import ({err})")
    else:
        if has_gpu:
            statuses["triton"] = BackendStatus(True, f"triton {triton.__version__}")
        elif interpret:
            statuses["triton"] = BackendStatus(
                True, f"triton {triton.__version__} interpreter on CPU (TRITON_INTERPRET=1)")
        else:
            statuses["triton"] = BackendStatus(
                False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
    statuses = {name: statuses[name] for name in BACKENDS}
    _load_capabilities(statuses)
    return statuses


# (backend, op file) -> Capabilities, filled with the statuses (outside any torch.compile trace:
# the lookups at call time are plain dictionary reads).
_CAPABILITIES: dict[tuple[str, str], Capabilities] = {}


def _load_capabilities(statuses) -> None:
    for op_file in _FILES:
        _CAPABILITIES["reference", op_file] = EVERYTHING
        if statuses["triton"].available:
            module = importlib.import_module(f"protokernels.triton_kernels.{op_file}")
            _CAPABILITIES["triton", op_file] = getattr(module, "CAPABILITIES", EVERYTHING)
        if statuses["cuda"].available:
            declared = getattr(torch.ops.protokernels, f"{op_file}_cuda_capabilities", None)
            _CAPABILITIES["cuda", op_file] = (Capabilities.parse(declared()) if declared
                                              else EVERYTHING)


def capabilities(op: str, backend: str) -> Capabilities | None:
    """What `backend` can take for `op` (None: the backend is unavailable here)."""
    _status()
    return _CAPABILITIES.get((backend, OP_FILES[op]))


def _reasons(op: str, backend: str, dtype: torch.dtype, rows: int, k: int) -> list[str]:
    # _available_backends() has loaded the capabilities: a dictionary read, traceable.
    return _CAPABILITIES[backend, OP_FILES[op]].not_supported_reasons(dtype, rows, k)


def available_backends() -> dict[str, BackendStatus]:
    """Which backends can run here, and why not: {name: BackendStatus(available, detail)}."""
    return dict(_status())


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    return name


_selected = _check_name(os.environ.get("PROTOKERNELS_BACKEND", "auto"))


class _PreviousBackend(str):
    """`use_backend`'s result: the previous backend's name, and a context manager restoring it."""

    def __enter__(self) -> _PreviousBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        global _selected
        _selected = str(self)


def use_backend(name: str) -> _PreviousBackend:
    """Select the backend for subsequent calls ("cuda", "triton", "reference" or "auto").

    Works as a context manager (`with protokernels.use_backend("triton"): ...` restores the
    previous choice on exit) and as a plain call, which returns the previous name.
    """
    global _selected
    previous = _PreviousBackend(_selected)
    _selected = _check_name(name)
    return previous


def current_backend() -> str:
    return _selected


_warned: set[tuple[str, str]] = set()


def resolve(op: str, device: torch.device, dtype: torch.dtype, precision: str = "ieee",
            rows: int = 0, k: int = 1, **sizes: int) -> str:
    """The backend that runs `op` on tensors of `device` and `dtype`, by the rules of the README
    ("Backends"): `auto` takes the first backend of the op's size table (`_AUTO_ORDER`) that is
    available and can take the input; an explicit choice that cannot raises with the reasons.
    `rows` (the most rows an index must address) and `k` are checked against the capabilities;
    `sizes` feed the size table."""
    # Plain Python on the arguments, so that torch.compile traces it (and guards on the
    # sizes); only probing the backends (_status) happens outside the trace.
    requested = _selected
    available = _available_backends(device.type)
    if requested == "auto":
        if device.type != "cuda":
            return "reference"
        order = _AUTO_ORDER[op](dtype, precision, sizes)
        for name in order:
            if name in available and not _reasons(op, name, dtype, rows, k):
                if name != order[0] and order[0] not in available:
                    _warn_fallback(op, order[0], name)
                return name
        raise BackendUnavailableError(f"protokernels.{op}: no backend can take this input")
    if requested not in available:
        raise BackendUnavailableError(_unavailable_reason(op, requested, device.type))
    reasons = _reasons(op, requested, dtype, rows, k)
    if reasons:
        raise BackendUnavailableError(f"protokernels.{op}: backend '{requested}' cannot take "
                                      f"this input: {'; '.join(reasons)}")
    return requested


@torch.compiler.assume_constant_result
def _available_backends(device: str) -> tuple[str, ...]:
    """The backends that can run on tensors of `device` here (constant under torch.compile: it
    probes the extension and triton, which must not be traced)."""
    statuses = _status()
    names = [name for name in BACKENDS if statuses[name].available]
    if device != "cuda":
        names.remove("cuda") if "cuda" in names else None
        if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in names:
            names.remove("triton")
    return tuple(names)


@torch.compiler.assume_constant_result
def _unavailable_reason(op: str, requested: str, device: str) -> str:
    status = _status()[requested]
    if not status.available:
        return f"protokernels.{op}: backend '{requested}' is unavailable: {status.detail}"
    if requested == "cuda":
        return f"protokernels.{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}"
    return (f"protokernels.{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
            f"CPU tensors), got tensors on {device}")


@torch.compiler.assume_constant_result
def _warn_fallback(op: str, fastest: str, used: str) -> bool:
    if (op, used) not in _warned:
        _warned.add((op, used))
        warnings.warn(f"protokernels.{op}: the fastest backend '{fastest}' is unavailable "
                      f"({_status()[fastest].detail}); using '{used}'", stacklevel=5)
    return True


class Implementations(dict):
    """backend name -> an op's implementation in that backend: `reference/<file>.py` and
    `triton_kernels/<file>.py` define `<function>`, `csrc/<file>.cu` registers
    `protokernels::<function>_cuda`. Each op binds its table once, at import; a backend's entry is
    looked up on its first use (so that importing protokernels neither imports triton nor loads
    the extension) and is a plain dictionary read afterwards."""

    def __init__(self, op_file: str, function: str, *, optional: bool = False):
        """optional: not every backend has one (e.g. a fused form of a driver loop); those
        without get None."""
        super().__init__()
        self.op_file, self.function, self.optional = op_file, function, optional

    def __missing__(self, backend: str):
        if backend == "cuda":
            _status()  # loads the extension, which registers the *_cuda operators
            source, name = torch.ops.protokernels, self.function + "_cuda"
        else:
            package = "reference" if backend == "reference" else "triton_kernels"
            source = importlib.import_module(f"protokernels.{package}.{self.op_file}")
            name = self.function
        implementation = getattr(source, name, None) if self.optional else getattr(source, name)
        if backend == "cuda" and implementation is not None:
            # The operator's one overload, bound directly: calling the packet resolves the
            # overload from the arguments on every call.
            implementation = implementation.default
        self[backend] = implementation
        return implementation


_PRECISIONS = ("ieee", "tf32x3", "tf32")
# torch.get_float32_matmul_precision() -> precision. "highest" must stay within 1e-5 relative of
# float64: 3xTF32 does (every test passes at 1e-5 on the H100) and is the faster way there: sqdist
# at the spec size takes 0.578 ms with 3xTF32 (RESULTS.md), while FFMA needs >= 0.67 ms even at
# the FFMA peak.
# "medium" could use bf16; tf32 is within that allowance and keeps one fewer path.
_FROM_MATMUL_PRECISION = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}


def resolve_precision(op: str, precision: str | None, dtype: torch.dtype) -> str:
    """The float32 product precision for an op call; other dtypes always use their own ("ieee")."""
    if precision is not None and precision not in _PRECISIONS:
        raise ValueError(f"protokernels.{op}: precision must be one of {_PRECISIONS} or None, "
                         f"got {precision!r}")
    if dtype != torch.float32:
        return "ieee"
    if precision is None:
        return _FROM_MATMUL_PRECISION[_matmul_precision()]
    return precision


@torch.compiler.assume_constant_result
def _matmul_precision() -> str:
    # Dynamo cannot trace this getter; under torch.compile precision=None is therefore fixed when
    # the graph is traced (pass precision= to pin it explicitly).
    return torch.get_float32_matmul_precision()


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Run torch matmuls and cuDNN convolutions (the reference backend's) at `precision`.

    cuDNN convolutions have their own TF32 switch (on by default), which
    set_float32_matmul_precision does not touch.
    """
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]
