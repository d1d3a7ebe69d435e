"""Backend selection: available_backends, use_backend, PROTOKERNELS_BACKEND, the auto rule, errors."""
import functools
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import warnings

import pytest
import torch

import protokernels
from protokernels import _backend
from conftest import DEVICE, HAS_GPU


def test_available_backends_reports_every_backend_with_a_reason():
    status = protokernels.available_backends()
    assert list(status) == ["cuda", "triton", "reference"]
    assert status["reference"].available
    for name, entry in status.items():
        assert isinstance(entry, protokernels.BackendStatus) and entry.detail, name
    if not HAS_GPU:
        assert not status["cuda"].available
        assert "fix" in status["cuda"].detail.lower() or "no cuda device" in status["cuda"].detail.lower()


def test_use_backend_is_a_context_manager_and_a_plain_call():
    assert protokernels.current_backend() == "auto"
    with protokernels.use_backend("reference") as previous:
        assert previous == "auto"
        assert protokernels.current_backend() == "reference"
        with protokernels.use_backend("triton"):
            assert protokernels.current_backend() == "triton"
        assert protokernels.current_backend() == "reference"
    assert protokernels.current_backend() == "auto"
    previous = protokernels.use_backend("reference")
    try:
        assert previous == "auto" and protokernels.current_backend() == "reference"
    finally:
        protokernels.use_backend(previous)
    assert protokernels.current_backend() == "auto"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        protokernels.use_backend("cudnn")


def test_auto_uses_reference_for_cpu_tensors():
    assert _backend.resolve("sqdist", torch.device("cpu"), torch.float32) == "reference"


@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a GPU")
def test_explicit_unavailable_backend_raises_with_the_reason():
    with protokernels.use_backend("cuda"), pytest.raises(protokernels.BackendUnavailableError,
                                                         match="backend 'cuda' is unavailable"):
        protokernels.sqdist(torch.randn(3, 2), torch.randn(4, 2))


def test_cuda_backend_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setitem(_backend._status(), "cuda", protokernels.BackendStatus(True, "test"))
    with protokernels.use_backend("cuda"), pytest.raises(protokernels.BackendUnavailableError,
                                                         match="needs CUDA tensors"):
        _backend.resolve("sqdist", torch.device("cpu"), torch.float32)


def _pretend(monkeypatch, **available):
    """Backends available or not as given, with every capability, on a pretend CUDA device."""
    statuses = dict(_backend._status())
    for name, on in available.items():
        statuses[name] = protokernels.BackendStatus(on, f"{name} {'here' if on else 'missing'} "
                                                        "(test)")
    monkeypatch.setattr(_backend, "_status", lambda: statuses)
    for name in _backend.BACKENDS:
        for op_file in _backend._FILES:
            monkeypatch.setitem(_backend._CAPABILITIES, (name, op_file),
                                _backend.EVERYTHING)


def test_auto_falls_back_with_one_warning(monkeypatch):
    _pretend(monkeypatch, triton=False, cuda=True)
    monkeypatch.setattr(_backend, "_warned", set())
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="fastest backend 'triton' is unavailable.*using 'cuda'"):
        assert _backend.resolve("sqdist", cuda, torch.float32) == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert _backend.resolve("sqdist", cuda, torch.float32) == "cuda"


def test_auto_skips_a_backend_that_cannot_take_the_input_silently(monkeypatch):
    _pretend(monkeypatch, triton=True, cuda=True)
    limited = protokernels._capabilities.Capabilities(
        dtypes=(torch.float32,), max_rows=100, max_k=4, why="test limits")
    monkeypatch.setitem(_backend._CAPABILITIES, ("triton", "nearest"), limited)
    cuda = torch.device("cuda")
    big = dict(n=4096, m=100, d=4096)  # Triton first by size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capability skip is no fallback warning
        assert _backend.resolve("nearest", cuda, torch.float32, rows=100, k=4, **big) == "triton"
        assert _backend.resolve("nearest", cuda, torch.float64, **big) == "cuda"
        assert _backend.resolve("nearest", cuda, torch.float32, rows=101, **big) == "cuda"
        assert _backend.resolve("nearest", cuda, torch.float32, k=5, **big) == "cuda"
    with protokernels.use_backend("triton"), pytest.raises(
            protokernels.BackendUnavailableError,
            match=r"backend 'triton' cannot take this input: dtype float16 is not supported "
                  r"\(takes float32\); 101 rows is above its limit of 100; k = 5 is above its "
                  r"limit of 4 \(test limits\)"):
        _backend.resolve("nearest", cuda, torch.float16, rows=101, k=5)


def test_every_op_and_backend_resolves_to_an_implementation():
    """Each op's implementation table binds in every backend that runs here (the CUDA entries
    need the extension, Triton's need triton)."""
    import protokernels.ops as ops_package
    import pkgutil
    import importlib
    tables = []
    for info in pkgutil.iter_modules(ops_package.__path__):
        module = importlib.import_module(f"protokernels.ops.{info.name}")
        tables += [v for v in vars(module).values() if isinstance(v, _backend.Implementations)]
    functions = {(t.op_file, t.function) for t in tables}
    assert functions == {
        ("sqdist", "sqdist"), ("sqdist", "sqdist_grad"), ("nearest", "nearest"),
        ("nearest", "nearest_by_label"), ("nearest", "nearest_both"),
        ("nearest", "gather_sqdist_grad"), ("kp_conv", "kp_conv2d"),
        ("kp_conv", "kp_conv2d_grad_input"), ("kp_conv", "kp_conv2d_grad_weight"),
        ("codebook_lookup", "codebook_lookup"), ("codebook_stats", "codebook_stats"),
        ("sinkhorn", "sinkhorn_column_logsum"), ("sinkhorn", "sinkhorn_row_sweep"),
        ("sinkhorn", "sinkhorn_iterate"), ("nearest", "dw_nearest"),
        ("glvq_loss", "glvq_epilogue"), ("rslvq_loss", "rslvq_epilogue"),
        ("codes_cross_entropy", "codes_cross_entropy_rows"),
        ("codes_cross_entropy", "codes_cross_entropy_grad"), ("dpnp_loss", "dpnp_epilogue"),
        ("sinkhorn_prototype_loss", "unit_rows"), ("sinkhorn_prototype_loss", "unit_rows_grad")}
    statuses = protokernels.available_backends()
    for table in tables:
        for name in _backend.BACKENDS:
            if statuses[name].available:
                # Only CUDA has the fused iteration and the whole dw_nearest call.
                if table.optional and name != "cuda":
                    assert table[name] is None, (table.function, name)
                else:
                    assert callable(table[name]), (table.function, name)


def test_environment_variable_sets_the_default():
    code = "import protokernels; print(protokernels.current_backend())"
    env = {**os.environ, "PROTOKERNELS_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "reference"
    env["PROTOKERNELS_BACKEND"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


def test_missing_extension_is_explained(monkeypatch):
    import importlib.util
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "without its CUDA extension" in _backend._extension_load_error()


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("message,expected", [
    ("libcudart.so.12: cannot open shared object file", "built for CUDA 12"),
    ("_C.abi3.so: undefined symbol: torch_call_dispatcher", "stable ABI of torch >= 2.10"),
])
def test_extension_load_errors_say_how_to_fix(monkeypatch, message, expected, wrapped):
    """wrapped: torch 2.14 raises "Could not load this library: <path>" from the loader's error."""
    import importlib.util
    from types import SimpleNamespace

    def fail(path):
        if not wrapped:
            raise OSError(message)
        try:
            raise OSError(message)
        except OSError as cause:
            raise OSError(f"Could not load this library: {path}") from cause
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin="_C.so"))
    monkeypatch.setattr(torch.ops, "load_library", fail)
    assert expected in _backend._extension_load_error()


def test_backend_choice_is_guarded_under_compile(monkeypatch):
    """Changing the backend after compiling recompiles instead of replaying the old choice."""
    from protokernels.ops import sqdist as sqdist_op
    calls = []

    class Spy(dict):
        def __missing__(self, backend):
            calls.append(backend)
            return _backend.Implementations("sqdist", "sqdist")[backend]

        def __getitem__(self, backend):
            calls.append(backend)
            return self.__missing__(backend)

    monkeypatch.setattr(sqdist_op, "_SQDIST", Spy())
    compiled = torch.compile(lambda x, y: protokernels.sqdist(x, y), fullgraph=True,
                             backend="aot_eager")
    x, y = torch.randn(5, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    with protokernels.use_backend("reference"):
        compiled(x, y)
    assert calls[-1] == "reference"
    if protokernels.available_backends()["triton"].available:
        with protokernels.use_backend("triton"):
            compiled(x, y)
        assert calls[-1] == "triton"


def test_capabilities_parse_the_extensions_declaration():
    parsed = protokernels._capabilities.Capabilities.parse(
        "dtypes=float16,bfloat16,float32;max_rows=2147483647;max_k=64;hopper_depth_bytes=1152;"
        "why=packed keys; ranked as float32")
    assert parsed.dtypes == (torch.float16, torch.bfloat16, torch.float32)
    assert (parsed.max_rows, parsed.max_k, parsed.hopper_depth_bytes) == (2**31 - 1, 64, 1152)
    assert parsed.why == "packed keys; ranked as float32"
    assert protokernels._capabilities.Capabilities.parse("") == _backend.EVERYTHING


@pytest.mark.parametrize("op,small,large", [
    ("sqdist", dict(n=1024, m=100, d=128, grad=True), dict(n=1024, m=100, d=128)),
    ("nearest", dict(n=8192, m=100, d=64), dict(n=4096, m=512, d=128)),
    ("nearest_by_label", dict(n=8192, m=100, d=64), dict(n=65536, m=1024, d=64)),
    ("kp_conv2d", dict(batch=64, p=16, pixels=64, c=1, taps=9),
     dict(batch=32, p=128, pixels=3136, c=64, taps=9)),
])
def test_auto_chooses_by_size(monkeypatch, op, small, large):
    """The size table: CUDA's cheaper launches for small problems, Triton's kernels above
    (boundaries from RESULTS.md "In-model sizes")."""
    _pretend(monkeypatch, triton=True, cuda=True)
    cuda = torch.device("cuda")
    assert _backend.resolve(op, cuda, torch.float32, **small) == "cuda"
    assert _backend.resolve(op, cuda, torch.float32, **large) == "triton"


@pytest.mark.parametrize("op", ["nearest", "nearest_by_label", "nearest_both", "dw_nearest",
                                "dw_quantize"])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32"), (torch.float32, "tf32x3"),
                                             (torch.bfloat16, "ieee")], ids=str)
def test_auto_takes_the_tensor_core_cuda_search_up_to_2_to_the_30(monkeypatch, op, dtype,
                                                                   precision):
    """One best per row on tensor cores: CUDA's mma.sync search up to N*M*D = 2^30, Triton's
    above (RESULTS.md "The tensor-core CUDA search"); top k and float32 "ieee" keep the FFMA
    search's boundary (test_auto_chooses_by_size)."""
    _pretend(monkeypatch, triton=True, cuda=True)
    cuda = torch.device("cuda")
    assert _backend.resolve(op, cuda, dtype, precision, n=4096, m=512, d=128) == "cuda"
    assert _backend.resolve(op, cuda, dtype, precision, n=8192, m=512, d=64, batch=1) == "cuda"
    assert _backend.resolve(op, cuda, dtype, precision, n=65536, m=1024, d=64) == "triton"
    assert _backend.resolve(op, cuda, dtype, precision, n=65536, m=1024, d=64, batch=8) == "triton"
    assert _backend.resolve("nearest_k", cuda, dtype, precision, n=4096, m=512, d=128) == "triton"


def _declare_hopper(monkeypatch, op_file, depth_bytes, split_depth_bytes):
    """Both backends available, CUDA's op_file declaring Hopper kernels of these depths; returns
    the pretend device."""
    _pretend(monkeypatch, triton=True, cuda=True)
    monkeypatch.setitem(_backend._CAPABILITIES, ("cuda", op_file),
                        protokernels._capabilities.Capabilities(
                            hopper_depth_bytes=depth_bytes,
                            hopper_split_depth_bytes=split_depth_bytes))
    return torch.device("cuda")


F32, BF16 = torch.float32, torch.bfloat16

# (dtype, precision, sizes, the backend auto picks) where CUDA declares its Hopper search for
# rows of 1280 bytes (1024 at "tf32x3").
LARGE_SEARCH = dict(n=65536, m=8192, d=256)
HOPPER_SEARCH_CASES = [
    (F32, "tf32", LARGE_SEARCH, "cuda"), (BF16, "ieee", LARGE_SEARCH, "cuda"),
    (BF16, "ieee", dict(n=65536, m=8192, d=576), "cuda"),
    (F32, "tf32", dict(n=65536, m=1024, d=64), "cuda"),
    (F32, "tf32", dict(n=65536, m=4096, d=64, batch=4), "cuda"),
    (F32, "tf32", dict(n=65536, m=1024, d=32, batch=8), "cuda"),
    (F32, "tf32", dict(n=8192, m=256, d=32, batch=8), "cuda"),
    # Rows under 128 bytes: float32 at "tf32" always, half rows against 8192 columns or more.
    (F32, "tf32", dict(n=65536, m=1024, d=16, batch=8), "cuda"),
    (F32, "tf32", dict(n=65536, m=1024, d=8, batch=8), "cuda"),
    (BF16, "ieee", dict(n=65536, m=8192, d=32), "cuda"),
    (BF16, "ieee", dict(n=65536, m=1024, d=32, batch=8), "triton"),
    (BF16, "ieee", dict(n=8192, m=256, d=32, batch=1), "cuda"),  # the 2^30 boundary
    (F32, "tf32x3", dict(n=65536, m=1024, d=16, batch=8), "triton"),
    (F32, "tf32x3", LARGE_SEARCH, "cuda"),
    (F32, "tf32x3", dict(n=65536, m=1024, d=64), "cuda"),
    (F32, "tf32x3", dict(n=65536, m=1024, d=64, batch=8), "cuda"),
    (F32, "tf32x3", dict(n=65536, m=8192, d=288), "triton"),  # deeper than declared
    (F32, "tf32", dict(n=65536, m=8192, d=512), "triton"),  # deeper than declared
]


@pytest.mark.parametrize("op", ["nearest", "dw_nearest", "dw_quantize"])
def test_auto_takes_the_hopper_search_by_depth(monkeypatch, op):
    """Where CUDA declares its Hopper search (hopper_depth_bytes, hopper_split_depth_bytes), one
    best per row at "tf32", "tf32x3" or in half precision runs on CUDA at every size for rows of
    128 bytes or more, float32 rows at "tf32" of any depth and half rows against 8192 columns or
    more (RESULTS.md "The fold's ALU work"); other shallow rows, rows deeper than declared and
    the label searches keep the mma.sync boundary (2^30)."""
    cuda = _declare_hopper(monkeypatch, "nearest", 1280, 1024)
    for dtype, precision, sizes, expected in HOPPER_SEARCH_CASES:
        assert _backend.resolve(op, cuda, dtype, precision, **sizes) == expected, (precision, sizes)
    assert _backend.resolve("nearest_by_label", cuda, F32, "tf32", **LARGE_SEARCH) == "triton"
    monkeypatch.setitem(_backend._CAPABILITIES, ("cuda", "nearest"), _backend.EVERYTHING)
    assert _backend.resolve(op, cuda, F32, "tf32", **LARGE_SEARCH) == "triton"


# (dtype, precision, sizes, the backend auto picks) where CUDA declares sqdist's Hopper forward
# for rows of 1152 bytes (896 at "tf32x3").
IN_MODEL = dict(n=4096, m=512, d=128)
HOPPER_DISTANCE_CASES = [
    (F32, "tf32", IN_MODEL, "cuda"), (BF16, "ieee", IN_MODEL, "cuda"),
    (F32, "tf32", dict(n=4096, m=4096, d=64, batch=8), "cuda"),
    (F32, "tf32", dict(n=4096, m=4096, d=128, batch=8), "cuda"),
    (F32, "tf32", dict(n=8192, m=2000, d=256), "cuda"),
    (F32, "ieee", IN_MODEL, "triton"),
    (F32, "tf32x3", IN_MODEL, "cuda"),
    (F32, "tf32x3", dict(n=4096, m=4096, d=128, batch=8), "cuda"),
    (F32, "tf32x3", dict(n=4096, m=4096, d=224, batch=2), "cuda"),
    (F32, "tf32x3", dict(n=1024, m=100, d=256), "triton"),  # 1024 bytes: deeper than declared
    (F32, "tf32", dict(n=256, m=10, d=512), "triton"),
    (F32, "ieee", dict(IN_MODEL, grad=True), "cuda"),
    (F32, "tf32", dict(n=4096, m=1000, d=128, grad=True), "cuda"),
    (F32, "tf32", dict(n=8192, m=2000, d=256, grad=True), "cuda"),
    (F32, "tf32x3", dict(n=4096, m=4096, d=128, batch=8, grad=True), "cuda"),
    (F32, "tf32", dict(n=8192, m=2001, d=256, grad=True), "triton"),  # grad's rows unaligned
    (F32, "tf32x3", dict(n=8192, m=2000, d=256, grad=True), "triton"),  # deeper than declared
    (BF16, "ieee", dict(n=8192, m=2000, d=256, grad=True), "cuda"),
    (BF16, "ieee", dict(n=8192, m=2004, d=256, grad=True), "triton"),  # grad's rows unaligned
    (torch.float64, "ieee", dict(IN_MODEL, grad=True), "cuda"),  # 2^28: the old rule
]


@pytest.mark.parametrize("op", ["sqdist", "rslvq_loss", "prototype_layer"])
def test_auto_takes_the_hopper_distance_by_depth_and_size(monkeypatch, op):
    """Where CUDA declares its Hopper forward (hopper_depth_bytes, hopper_split_depth_bytes),
    sqdist's forward at "tf32", "tf32x3" or in half precision runs on CUDA at every size; Triton
    at "ieee" and for rows deeper than declared. With a backward: CUDA where both Hopper kernels
    run (float32 at "tf32" or "tf32x3" or a half type, rows declared, grad's rows of M elements
    16-byte aligned), else CUDA up to 2^30
    (RESULTS.md "The sqdist rule", "The Hopper search's own end", "The Hopper gradient")."""
    cuda = _declare_hopper(monkeypatch, "sqdist", 1152, 896)
    for dtype, precision, sizes, expected in HOPPER_DISTANCE_CASES:
        assert _backend.resolve(op, cuda, dtype, precision, **sizes) == expected, (precision, sizes)
    monkeypatch.setitem(_backend._CAPABILITIES, ("cuda", "sqdist"), _backend.EVERYTHING)
    assert _backend.resolve(op, cuda, F32, "tf32", **IN_MODEL) == "triton"


def test_auto_gives_kp_conv_its_hopper_kernels(monkeypatch):
    """Where CUDA declares kp_conv's Hopper kernels (hopper_kernels), float32 at "tf32" or
    "tf32x3" with stride 1 along the width (the gradients also in half precision), each
    computation runs on CUDA where its own kernel does, whatever runs the others: the weight
    gradient always; the forward for kernels up to 4 wide (3 at "tf32x3") and 32 channels or
    more; the grad input for the same widths, 32 prototypes or more, stride 1 and padding within
    the kernel's reach (grad_input_conv). Other
    precisions, strides, channel counts and a CUDA without them follow the old rule (RESULTS.md
    "kp_conv's weight gradient on Hopper", "kp_conv's forward on Hopper", "kp_conv's grad input
    on Hopper", "Split products in kp_conv's Hopper kernels")."""
    _pretend(monkeypatch, triton=True, cuda=True)
    monkeypatch.setitem(_backend._CAPABILITIES, ("cuda", "kp_conv"),
                        protokernels._capabilities.Capabilities(
                            hopper_kernels=("kp_conv2d", "kp_conv2d_grad_input",
                                            "kp_conv2d_grad_weight")))
    cuda = torch.device("cuda")
    spec = dict(batch=32, c=64, p=128, pixels=56 * 56, taps=9, kw=3, stride_w=1,
                grad_input_conv=True)
    forward = functools.partial(_backend.resolve, "kp_conv2d", cuda)
    grad_input = functools.partial(_backend.resolve, "kp_conv2d_grad_input", cuda)
    weight = functools.partial(_backend.resolve, "kp_conv2d_grad_weight", cuda)
    assert forward(F32, "tf32", **spec) == "cuda"
    assert forward(F32, "tf32", grad=True, **spec) == "cuda"
    assert forward(F32, "tf32", **dict(spec, c=16)) == "triton"
    assert forward(F32, "tf32", **dict(spec, kw=5, taps=25)) == "triton"
    assert forward(F32, "tf32x3", **spec) == "cuda"
    assert forward(F32, "tf32x3", **dict(spec, kw=4, taps=16)) == "triton"
    assert forward(F32, "ieee", **spec) == "triton"
    assert grad_input(F32, "tf32", **spec) == "cuda"
    assert grad_input(F32, "tf32", **dict(spec, c=16)) == "cuda"
    assert grad_input(F32, "tf32", **dict(spec, p=16)) == "triton"
    assert grad_input(F32, "tf32", **dict(spec, grad_input_conv=False)) == "triton"
    assert grad_input(F32, "tf32", **dict(spec, kw=5, taps=25)) == "triton"
    assert grad_input(F32, "tf32x3", **spec) == "cuda"
    assert grad_input(F32, "tf32", **dict(spec, kw=4, taps=16)) == "cuda"
    assert grad_input(F32, "tf32x3", **dict(spec, kw=4, taps=16)) == "triton"
    assert weight(F32, "tf32", **spec) == "cuda"
    assert weight(F32, "tf32x3", **spec) == "cuda"
    assert weight(F32, "tf32x3", **dict(spec, kw=5, taps=25)) == "cuda"
    assert weight(F32, "ieee", **spec) == "triton"
    for half in (BF16, torch.float16):  # the gradients on float32 copies, at any precision
        assert weight(half, "ieee", **spec) == "cuda"
        assert weight(half, "tf32x3", **dict(spec, kw=5, taps=25)) == "cuda"
        assert weight(half, "ieee", **dict(spec, stride_w=2)) == "triton"
        assert grad_input(half, "ieee", **spec) == "cuda"
        assert grad_input(half, "tf32x3", **dict(spec, kw=4, taps=16)) == "cuda"
        assert grad_input(half, "ieee", **dict(spec, p=16)) == "triton"
        assert forward(half, "tf32", **spec) == "triton"
    assert weight(F32, "tf32", **dict(spec, stride_w=2)) == "triton"
    monkeypatch.setitem(_backend._CAPABILITIES, ("cuda", "kp_conv"), _backend.EVERYTHING)
    assert weight(F32, "tf32", **spec) == "triton"
    assert grad_input(F32, "tf32", **spec) == "triton"
    assert forward(F32, "tf32", **spec) == "triton"
    small = dict(batch=64, c=1, p=16, pixels=64, taps=9, kw=3, stride_w=1, grad_input_conv=True)
    assert weight(F32, "tf32x3", **small) == "cuda"
    assert grad_input(F32, "tf32x3", **small) == "cuda"


@pytest.mark.parametrize("op", ["codebook_lookup", "codebook_stats"])
def test_auto_takes_cuda_for_small_codebook_ops(monkeypatch, op):
    """Host-bound lookups and statistics (N*G*Dg <= 2^22) on CUDA, larger ones on Triton
    (RESULTS.md "One call for the VQ step")."""
    _pretend(monkeypatch, triton=True, cuda=True)
    cuda = torch.device("cuda")
    assert _backend.resolve(op, cuda, torch.float32, n=65536, m=1024, batch=1, d=64) == "cuda"
    assert _backend.resolve(op, cuda, torch.float32, n=65536, m=1024, batch=8, d=32) == "triton"


def test_auto_takes_cuda_for_small_codes_cross_entropy(monkeypatch):
    """SwAV's B <= 1024 at K3000 (B*K <= 2^22) on CUDA, B4096 on Triton (RESULTS.md "DPNP in one
    op"); the losses of the heads: CUDA at every size."""
    _pretend(monkeypatch, triton=True, cuda=True)
    cuda = torch.device("cuda")
    assert _backend.resolve("codes_cross_entropy", cuda, torch.float32, n=1024, m=3000) == "cuda"
    assert _backend.resolve("codes_cross_entropy", cuda, torch.float32, n=4096, m=3000) == \
        "triton"
    assert _backend.resolve("dpnp_loss", cuda, torch.float32, n=65536, m=1000, d=512) == "cuda"


@pytest.mark.parametrize("op", ["sinkhorn", "sinkhorn_plan"])
def test_auto_takes_cuda_where_sinkhorn_is_one_launch(monkeypatch, op):
    """CUDA's whole iteration in one launch up to B*K = 2^24 with K <= 8192 (RESULTS.md
    "Sinkhorn in one launch"); Triton's sweeps above."""
    _pretend(monkeypatch, triton=True, cuda=True)
    cuda = torch.device("cuda")
    for n, m in ((1, 1), (256, 3000), (4096, 3000), (2048, 8192)):
        assert _backend.resolve(op, cuda, torch.float32, n=n, m=m) == "cuda"
    for n, m in ((8192, 3000), (16, 8193), (65536, 16384)):
        assert _backend.resolve(op, cuda, torch.float32, n=n, m=m) == "triton"
    # a tolerance check or a process group runs sweep by sweep: Triton's sweeps
    assert _backend.resolve(op, cuda, torch.float32, n=256, m=3000, stepwise=True) == "triton"


def test_triton_kernels_reducing_sums_of_squares_compile_without_fma_contraction():
    """A kernel that reduces tl.sum(v * v) (itself or in a helper it calls) is launched with
    SUMS_OF_SQUARES: with contraction the lanes holding one sum disagree in the last bit and
    race to write it (compute-sanitizer's racecheck on the H100). Found from the source, so a new
    kernel with such a sum fails here until its launcher takes the options."""
    kernels = pytest.importorskip("protokernels.triton_kernels")
    kit = importlib.import_module("protokernels.triton_kernels._common")
    square_sum = re.compile(r"tl\.sum\((\w+) \* \1\b")
    checked = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        # @triton.jit functions (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1)
        jitted = {name: f for name, f in vars(module).items()
                  if inspect.isfunction(getattr(f, "fn", None))}

        def reduces_squares(name, seen):
            if name in seen:
                return False
            seen.add(name)
            src = inspect.getsource(jitted[name].fn)
            return bool(square_sum.search(src)) or any(
                re.search(rf"\b{callee}\(", src) and reduces_squares(callee, seen)
                for callee in jitted)

        for launch in vars(module).values():
            if isinstance(launch, kit._Launcher) and launch.kernel.fn.__module__ == module.__name__:
                needs = reduces_squares(launch.kernel.__name__, set())
                assert (launch.options == kit.SUMS_OF_SQUARES) == needs, launch.kernel.__name__
                checked.append((launch.kernel.__name__, needs))
    assert ("_sqdist_kernel", True) in checked and ("_search_kernel", True) in checked
    assert ("_sqdist_grad_kernel", False) in checked


def test_sinkhorn_wrappers_say_when_they_run_sweep_by_sweep(monkeypatch):
    """A tolerance or a process group stops between the iterations: the wrappers tell the size
    table (stepwise), which then takes Triton's sweeps over CUDA's one-launch iteration."""
    seen = []
    resolve = _backend.resolve

    def spy(op, *args, **sizes):
        seen.append((op, sizes.get("stepwise")))
        return resolve(op, *args, **sizes)
    monkeypatch.setattr(_backend, "resolve", spy)
    cost = torch.rand(6, 5)
    protokernels.sinkhorn(cost, n_iters=2)
    protokernels.sinkhorn_plan(cost, eps=0.5, n_iters=3)
    protokernels.sinkhorn_plan(cost, eps=0.5, n_iters=3, tol=1e-3)
    assert seen == [("sinkhorn", False), ("sinkhorn_plan", False), ("sinkhorn_plan", True)]
