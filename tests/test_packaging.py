"""The package's own commands and metadata: __version__ is the installed distribution's, the
license is declared, `python -m protokernels.info` reports, `python -m protokernels.warmup`
compiles (on a GPU) or says why it cannot."""
import importlib.metadata
import subprocess
import sys

import pytest
import torch

import protokernels
from conftest import HAS_GPU


def test_version_is_the_installed_distributions():
    distributions = importlib.metadata.packages_distributions()["protokernels"]
    assert len(distributions) == 1, distributions  # install exactly one of them
    (name,) = distributions
    assert name in ("protokernels", "protokernels-cu12", "protokernels-cu13"), name
    metadata = importlib.metadata.metadata(name)
    assert metadata["Version"] == protokernels.__version__
    assert "MIT" in (metadata.get("License-Expression") or metadata.get("License") or "")


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)


def test_info_reports_versions_backends_capabilities_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    out = run("protokernels.info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"protokernels {protokernels.__version__}" in text
    assert f"torch {torch.__version__}" in text and "triton" in text and "driver:" in text
    for name in ("cuda", "triton", "reference"):
        assert f"  {name:<9} " in text
    (nearest,) = [line for line in text.splitlines() if line.startswith("  nearest ")]
    assert "reference: dtypes float16/bfloat16/float32/float64" in nearest
    assert f"Triton cache: {tmp_path / 'cache'} (not created)" in text


@pytest.mark.skipif(HAS_GPU, reason="checks the message on a machine without a GPU")
def test_warmup_without_a_gpu_says_why():
    out = run("protokernels.warmup")
    assert out.returncode == 1 and "no GPU visible" in out.stderr


@pytest.mark.skipif(not HAS_GPU, reason="compiles for a GPU")
def test_warmup_fills_the_triton_cache(tmp_path):
    env = {**__import__("os").environ, "TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "protokernels.warmup", "--op", "sqdist",
                          "--cases", "model", "--dtype", "float32", "--precision", "high"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    from protokernels.info import compiled_kernels
    assert compiled_kernels(str(tmp_path))["_sqdist_kernel"] >= 1
