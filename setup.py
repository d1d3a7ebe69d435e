"""Build protokernels: the Python package, plus the CUDA extension protokernels._C when it can.

The extension is written against PyTorch's stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION
2.10) and built as an abi3 module, so one wheel per CUDA major serves every torch >= 2.10 and every
CPython >= 3.9. Build switches come from the environment, never from the build machine's GPU:

  PROTOKERNELS_SKIP_CUDA=1         build the pure-Python package (triton + reference backends)
  PROTOKERNELS_CUDA_ARCH_LIST      e.g. "8.0+PTX;9.0a" (the default), "9.0a", "80 90"; 9.0a
                                   (not 9.0) carries the Hopper kernels (wgmma, TMA), which are
                                   arch-specific: its code runs on 9.0 GPUs only
  CUDA_HOME                        the toolkit to build with (default /usr/local/cuda); its CUDA
                                   major names the distribution (scripts/build_wheels.sh builds
                                   the CUDA 12 wheel with nvcc 12 from PyPI this way)
  MAX_JOBS                         parallel nvcc jobs (ninja)

Distributions: "protokernels-cu13" / "protokernels-cu12" (with the extension for that CUDA
major) or "protokernels" (without it), all of the same version and all the import package
`protokernels`: install exactly one. Separate names rather than "+cu13" local versions, because a
package index refuses local versions.
"""
from __future__ import annotations

import os
import re
import subprocess

from setuptools import setup

with open(os.path.join("protokernels", "_version.py"), encoding="utf-8") as _f:
    VERSION = re.search(r'__version__ = "([^"]+)"', _f.read()).group(1)
# sm_80 code for Ampere and Ada, sm_90a for Hopper (its wgmma kernels), and compute_80 PTX that
# later GPUs compile at load time. Two device passes per file, as the old "8.0;9.0+PTX" was: the PTX
# comes from the sm_80 pass, where compute_90 PTX would cost a third.
DEFAULT_ARCHS = "8.0+PTX;9.0a"
# Oldest nvcc that knows each architecture; newer entries are dropped (with a note) on older nvcc.
MIN_NVCC = {"80": (11, 0), "86": (11, 1), "89": (11, 8), "90": (11, 8), "90a": (12, 0),
            "100": (12, 8), "120": (12, 8)}
PACKAGES = {
    "protokernels": "protokernels",
    "protokernels.nn": "protokernels/nn",
    "protokernels.ops": "protokernels/ops",
    "protokernels.reference": "protokernels/reference",
    # The top-level folders of the fixed layout, installed inside the package.
    "protokernels.triton_kernels": "triton_kernels",
    "protokernels.benchmarks": "benchmarks",
}


def _nvcc_version(cuda_home: str) -> tuple[int, int]:
    output = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                                     text=True)
    major, minor = re.search(r"release (\d+)\.(\d+)", output).groups()
    return int(major), int(minor)


def _gencode_flags(arch_list: str, nvcc: tuple[int, int]) -> tuple[list[str], list[str]]:
    """nvcc -gencode flags for PROTOKERNELS_CUDA_ARCH_LIST, and the architectures kept."""
    flags, kept = [], []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        arch = entry.removesuffix("+PTX").replace(".", "")
        if arch not in MIN_NVCC:
            raise SystemExit(f"protokernels: unknown architecture {entry!r} in "
                             f"PROTOKERNELS_CUDA_ARCH_LIST (known: {sorted(MIN_NVCC)})")
        if nvcc < MIN_NVCC[arch]:
            print(f"protokernels: nvcc {nvcc[0]}.{nvcc[1]} cannot build sm_{arch}; skipping it")
            continue
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
        kept.append(arch)
    if not kept:
        raise SystemExit(f"protokernels: no architecture of {arch_list!r} can be built")
    return flags, kept


def _find_cuda_home() -> None:
    """Point torch at a whole toolkit: its own guess (the folder above the first `nvcc` on PATH)
    fails where that nvcc is a wrapper, e.g. /usr/local/bin/nvcc, and then -lcudart is not found."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _allow_other_cuda_major(nvcc: tuple[int, int], torch_cuda: str) -> None:
    """Let torch's build helper compile with another CUDA major than torch's own. The extension
    touches torch only through the stable C ABI (tensors as handles, the stream as a pointer), so
    nothing CUDA-typed crosses between them: built with nvcc 12, it loads with a CUDA 12 torch."""
    from torch.utils import cpp_extension

    if int(torch_cuda.split(".")[0]) != nvcc[0]:
        print(f"protokernels: building for CUDA {nvcc[0]} with a CUDA {torch_cuda} torch (the "
              f"wheel loads with CUDA {nvcc[0]} builds of torch)")
        cpp_extension._check_cuda_version = lambda *args, **kwargs: None


def _extension():
    """(ext_modules, cmdclass, distribution suffix) for the CUDA extension, or the reason to skip
    it."""
    if os.environ.get("PROTOKERNELS_SKIP_CUDA") == "1":
        return "PROTOKERNELS_SKIP_CUDA=1"
    _find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return "torch is not importable at build time (build with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    nvcc = _nvcc_version(CUDA_HOME)
    _allow_other_cuda_major(nvcc, torch.version.cuda)
    gencode, archs = _gencode_flags(os.environ.get("PROTOKERNELS_CUDA_ARCH_LIST", DEFAULT_ARCHS),
                                    nvcc)
    defines = ["-DTORCH_TARGET_VERSION=0x020a000000000000",  # stable ABI of torch 2.10
               "-DUSE_CUDA",  # declares the CUDA part of the C shim (current stream)
               # Unquoted tokens (quotes do not survive ninja), stringized in protokernels.cpp.
               f"-DPROTOKERNELS_BUILD=cuda{nvcc[0]}_{nvcc[1]}_sm{'_sm'.join(archs)}",
               # The host launches the Hopper kernels only where their code was built.
               *(["-DPROTOKERNELS_HAS_SM90A"] if "90a" in archs else [])]
    # csrc/compat: the extension needs no glibc newer than 2.28 whatever the build machine has
    # (manylinux_2_28; see csrc/compat/glibc_2_28.h).
    compat = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "compat")
    glibc = [f"-I{compat}", "-include", os.path.join(compat, "glibc_2_28.h")]
    extension = CUDAExtension(
        "protokernels._C",
        sources=sorted(f"csrc/{f}" for f in os.listdir("csrc") if f.endswith((".cu", ".cpp"))),
        py_limited_api=True,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", *glibc, *defines],
            # -gencode flags here also stop torch from adding arch flags of the build machine's GPU.
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *glibc,
                     *defines, *gencode],
        },
    )
    print(f"protokernels: building the CUDA extension for sm_{', sm_'.join(archs)} "
          f"(nvcc {nvcc[0]}.{nvcc[1]}, torch {torch.__version__})")
    return [extension], {"build_ext": BuildExtension}, f"-cu{nvcc[0]}"


built = _extension()
if isinstance(built, str):
    print(f"protokernels: building without the CUDA extension ({built}); "
          "the triton and reference backends still work")
    built = [], {}, ""
ext_modules, cmdclass, cuda_suffix = built

setup(
    name="protokernels" + cuda_suffix,
    version=VERSION,
    license="MIT",
    license_files=["LICENSE"],
    description="Fused CUDA and Triton kernels for prototype-based deep learning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    install_requires=["torch>=2.10", "triton>=3.6; platform_system == 'Linux'"],
    # POT: the README's migration line from ot.sinkhorn is tested against it.
    extras_require={"test": ["pytest", "numpy", "POT"],
                    # examples/ (scikit-learn's bundled digits) and the bench's --sweep plots
                    "examples": ["scikit-learn", "matplotlib"],
                    # the anchors run side by side: benchmarks/vector_quantizer.py and
                    # benchmarks/sinkhorn_plan.py (POT with its torch backend)
                    "bench": ["vector-quantize-pytorch", "POT"]},
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["protokernels-bench = protokernels.bench:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
