"""Compile Triton kernels for sm_90 without a GPU (run in a process without TRITON_INTERPRET, so
that the kernels are JIT functions): `python _triton_compile.py specializations.json` reads a
list of [module, kernel, signature, constexprs, options] and prints one line per failure."""
import importlib
import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

TARGET = GPUTarget("cuda", 90, 32)


def _constexpr(value):
    """A recorded constexpr: numbers and strings as they are, Triton dtypes by name ("fp32")."""
    if isinstance(value, str):
        try:
            return tl.dtype(value)
        except AssertionError:  # not a dtype's name (e.g. a precision, "tf32")
            return value
    return value


def main(path: str) -> int:
    failures = 0
    for module, name, signature, constexprs, options in json.load(open(path)):
        kernel = getattr(importlib.import_module(module), name)
        names = kernel.arg_names
        source = triton.compiler.ASTSource(
            fn=kernel, signature={n: signature.get(n, "constexpr") for n in names},
            constexprs={(names.index(n),): _constexpr(v) for n, v in constexprs.items()})
        try:
            triton.compile(source, target=TARGET, options=options)
        except Exception as error:  # noqa: BLE001  (every compile error is a finding)
            failures += 1
            last = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
            print(f"{name} {json.dumps(constexprs)}: {last}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1]) else 0)
