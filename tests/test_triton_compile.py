"""Every Triton kernel compiles for the H100 (sm_90), checked on a machine without a GPU: the
CPU suite runs the kernels in Triton's interpreter, which accepts code the GPU compiler rejects.
Found on the H100: an int argument equal to 1 reaches a kernel as a constexpr (a Python int), so
`(2 * M).to(...)` ran in the interpreter and failed to compile (dpnp_loss, M = 1; RESULTS.md
"DPNP in one op"). Here each op's first quick benchmark case runs on the Triton backend while the
launches' specializations are recorded; a process without the interpreter then compiles one
recorded specialization per kernel, and the same with every int argument equal to 1."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import protokernels
from protokernels import bench
from protokernels.info import compiled_kernels

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

# Kernels the CPU never launches: codebook_stats' atomic scatter (a CPU tensor takes the
# deterministic sorted path).
GPU_ONLY = {"_scatter_kernel"}
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
          torch.uint8: "u8", torch.bool: "i1"}


def _specialization(launcher, args, constexprs):
    """[module, kernel, signature, constexprs, options] as Triton's JIT would specialize it."""
    names = launcher.kernel.arg_names
    signature, fixed, options = {}, {}, dict(launcher.options)
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
        elif value is None or (type(value) is int and value == 1):  # the JIT's constexprs
            fixed[name] = value
        elif type(value) is bool:
            signature[name] = "i1"
        elif type(value) is int:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    for name, value in constexprs.items():
        if name in names:
            fixed[name] = value if isinstance(value, (int, float, type(None))) else str(value)
        else:
            options[name] = value
    return [launcher.kernel.fn.__module__, launcher.kernel.__name__, signature, fixed, options]


def _with_ints_equal_to_one(spec):
    module, name, signature, fixed, options = spec
    ints = [n for n, t in signature.items() if t in ("i32", "i64")]
    return [module, name, {n: t for n, t in signature.items() if n not in ints},
            {**fixed, **dict.fromkeys(ints, 1)}, options]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles every kernel itself")
def test_every_triton_kernel_compiles_for_sm90(monkeypatch, tmp_path):
    from protokernels.triton_kernels import _common as kit
    recorded = {}
    launch = kit._Launcher.__call__

    def recording(self, grid, *args, **constexprs):
        recorded.setdefault(self.kernel.__name__, _specialization(self, args, constexprs))
        return launch(self, grid, *args, **constexprs)

    monkeypatch.setattr(kit._Launcher, "__call__", recording)
    for op in bench.OPS:
        module = importlib.import_module(f"protokernels.benchmarks.{op}")
        cases = module.cases(True) + getattr(module, "model_cases", lambda quick: [])(True)
        _, _, dtype, sizes = cases[0]
        inputs = module.make_inputs(sizes, dtype, torch.device("cpu"))
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        with protokernels.use_backend("triton"):
            out = module.fused(sizes, *leaves)
            first = out[0] if isinstance(out, (tuple, list)) else out
            if first.requires_grad:
                first.sum().backward()
    kernels = set(compiled_kernels("/nonexistent"))  # every @triton.jit kernel, by name
    assert set(recorded) == kernels - GPU_ONLY, f"not launched: {kernels - set(recorded)}"
    specs = list(recorded.values()) + [_with_ints_equal_to_one(s) for s in recorded.values()]
    path = tmp_path / "specializations.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                          "_triton_compile.py"), str(path)],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
