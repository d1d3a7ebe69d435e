"""Backend selection: available_backends, use_backend, PROTOKERNELS_BACKEND, the auto rule, errors."""
import os
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
    assert _backend.resolve("sqdist", torch.device("cpu")) == "reference"


@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a GPU")
def test_explicit_unavailable_backend_raises_with_the_reason():
    with protokernels.use_backend("cuda"), pytest.raises(protokernels.BackendUnavailableError,
                                                         match="backend 'cuda' is unavailable"):
        protokernels.sqdist(torch.randn(3, 2), torch.randn(4, 2))


def test_cuda_backend_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setitem(_backend._status(), "cuda", protokernels.BackendStatus(True, "test"))
    with pytest.raises(protokernels.BackendUnavailableError, match="needs CUDA tensors"):
        _backend._resolve("sqdist", "cuda", "cpu")


def test_auto_falls_back_with_one_warning(monkeypatch):
    statuses = dict(_backend._status())
    statuses["triton"] = protokernels.BackendStatus(False, "triton missing (test)")
    statuses["cuda"] = protokernels.BackendStatus(True, "test")
    monkeypatch.setattr(_backend, "_status", lambda: statuses)
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="fastest backend 'triton' is unavailable.*using 'cuda'"):
        assert _backend._resolve("sqdist", "auto", "cuda") == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert _backend._resolve("sqdist", "auto", "cuda") == "cuda"


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


@pytest.mark.parametrize("message,expected", [
    ("libcudart.so.12: cannot open shared object file", "built for CUDA 12"),
    ("_C.abi3.so: undefined symbol: torch_call_dispatcher", "stable ABI of torch >= 2.10"),
])
def test_extension_load_errors_say_how_to_fix(monkeypatch, message, expected):
    import importlib.util
    from types import SimpleNamespace

    def fail(path):
        raise OSError(message)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin="_C.so"))
    monkeypatch.setattr(torch.ops, "load_library", fail)
    assert expected in _backend._extension_load_error()


def test_backend_choice_is_guarded_under_compile():
    """Changing the backend after compiling recompiles instead of replaying the old choice."""
    calls = []
    original = _backend.kernel

    def spy(backend, op_file, function):
        calls.append(backend)
        return original(backend, op_file, function)

    compiled = torch.compile(lambda x, y: protokernels.sqdist(x, y), fullgraph=True,
                             backend="aot_eager")
    x, y = torch.randn(5, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    try:
        _backend.kernel = spy
        with protokernels.use_backend("reference"):
            compiled(x, y)
        if protokernels.available_backends()["triton"].available:
            with protokernels.use_backend("triton"):
                compiled(x, y)
            assert calls[-1] == "triton"
    finally:
        _backend.kernel = original
    assert calls[0] == "reference"
