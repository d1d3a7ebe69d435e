"""`python -m protokernels.info`: what this installation is and can do.

Versions (protokernels, torch, CUDA, Triton, the driver), the architectures the extension was
built for against the visible GPU, each backend's availability (with the reason when it is not),
what each backend can take per op (capabilities), and the Triton kernel cache: where it is and
how many of protokernels' kernels it holds compiled (`python -m protokernels.warmup` fills it).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import platform
import re
import sys

import torch

import protokernels
from protokernels import _backend


def _driver_version() -> str:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver found"
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return "unknown"
    return f"{version.value // 1000}.{version.value % 1000 // 10} (CUDA API)"


def triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels (TRITON_CACHE_DIR, default ~/.triton/cache)."""
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton",
                                                              "cache")


def compiled_kernels(cache: str | None = None) -> dict[str, int]:
    """Kernel name -> compiled variants of protokernels' Triton kernels in the cache."""
    cache = cache or triton_cache_dir()
    names = set()
    spec = importlib.util.find_spec("protokernels.triton_kernels")
    kernels_dir = spec.submodule_search_locations[0] if spec else ""
    for file in os.listdir(kernels_dir) if os.path.isdir(kernels_dir) else ():
        if file.endswith(".py"):
            with open(os.path.join(kernels_dir, file), encoding="utf-8") as f:
                names |= set(re.findall(r"@triton\.jit\ndef (_\w+_kernel)\(", f.read()))
    counts = dict.fromkeys(sorted(names), 0)
    if os.path.isdir(cache):
        for entry in os.scandir(cache):
            if entry.is_dir():
                for file in os.listdir(entry.path):
                    stem = file.split(".")[0]
                    if stem in counts and file.endswith((".cubin", ".hsaco")):
                        counts[stem] += 1
    return counts


def report() -> str:
    lines = [f"protokernels {protokernels.__version__} ({os.path.dirname(protokernels.__file__)})",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA "
             f"{torch.version.cuda or 'none: a CPU build'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError as err:
        lines.append(f"triton: not importable ({err})")
    lines.append(f"driver: {_driver_version()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(f"GPU {index}: {torch.cuda.get_device_name(index)}, sm_{major}{minor}")
    else:
        lines.append("GPU: none visible")
    lines.append("")
    lines.append("backends:")
    for name, status in protokernels.available_backends().items():
        lines.append(f"  {name:<9} {status}")
    lines.append("")
    lines.append("capabilities (what `auto` and an explicit choice check before launching):")
    width = max(map(len, _backend.OP_FILES))
    for op in _backend.OP_FILES:
        parts = []
        for name in _backend.BACKENDS:
            capabilities = _backend.capabilities(op, name)
            if capabilities is not None:
                parts.append(f"{name}: {capabilities.describe()}")
        lines.append(f"  {op:<{width}} " + "; ".join(parts))
    lines.append("")
    cache = triton_cache_dir()
    counts = compiled_kernels(cache)
    compiled = sum(1 for n in counts.values() if n)
    lines.append(f"Triton cache: {cache} ({'exists' if os.path.isdir(cache) else 'not created'}"
                 f"), {compiled} of protokernels' {len(counts)} kernels compiled"
                 f" ({sum(counts.values())} variants); `python -m protokernels.warmup` compiles "
                 "them ahead of time")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protokernels.info", description=__doc__)
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
