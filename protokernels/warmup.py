"""`python -m protokernels.warmup`: compile protokernels' Triton kernels ahead of time.

The first call of an op in a fresh process compiles its Triton kernels for that call's
specialization (dtype, precision, and shape classes such as block sizes and 16-divisibility):
seconds per op (RESULTS.md "Cold start"). Triton keeps the compiled kernels on disk
(TRITON_CACHE_DIR, default ~/.triton/cache), so running this once while building a cluster image,
with the cache directory inside the image, spares every rank of every job that cost.

It runs each selected op forward and backward on the GPU, on every available backend, for the
sizes of the benchmark grids (`--cases model`: the sizes used inside models; `spec`: the large
reference sizes; both by default) and the dtypes asked for. A size of your own:
`--shape nearest:N=4096,M=512,D=128` (the names of that op's benchmark sizes).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

import protokernels
from protokernels.info import compiled_kernels, triton_cache_dir

# Ops with their own benchmark module (benchmarks/<op>.py): its make_inputs and fused are the
# one list of sample inputs and calls per op.
OPS = ("sqdist", "nearest", "kp_conv", "dw_nearest", "codebook_lookup", "codebook_stats",
       "sinkhorn", "sinkhorn_plan", "glvq_loss", "rslvq_loss", "dpnp_loss", "codes_cross_entropy",
       "sinkhorn_prototype_loss", "prototype_layer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cases(module, which: str):
    cases = []
    if which in ("spec", "both"):
        cases += module.cases(False)
    if which in ("model", "both") and hasattr(module, "model_cases"):
        cases += module.model_cases(False)
    return cases


def _run(module, sizes, dtype, precision, backend) -> None:
    """The op's calls (the module's WARMUP, else its fused call), forward and backward."""
    inputs = module.make_inputs(sizes, dtype, torch.device("cuda"))
    torch.set_float32_matmul_precision(precision)
    with protokernels.use_backend(backend):
        for call in getattr(module, "WARMUP", (module.fused,)):
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            out = call(sizes, *leaves)
            first = out[0] if isinstance(out, (tuple, list)) else out
            if first.requires_grad:
                first.sum().backward()


def warmup(ops, which, dtypes, precisions, shapes, log=print) -> int:
    """Run the cases; returns how many calls failed."""
    backends = [name for name, status in protokernels.available_backends().items()
                if status.available and name != "reference"]
    failures = 0
    for op in ops:
        module = importlib.import_module(f"protokernels.benchmarks.{op}")
        sizes_list = [sizes for _, _, _, sizes in _cases(module, which)] + shapes.get(op, [])
        # one entry per distinct size
        sizes_list = list({tuple(sorted(s.items())): s for s in sizes_list}.values())
        start = time.perf_counter()
        for sizes in sizes_list:
            for dtype in dtypes:
                for precision in precisions if dtype == torch.float32 else ("highest",):
                    for backend in backends:
                        try:
                            _run(module, sizes, dtype, precision, backend)
                        except Exception as err:  # noqa: BLE001 (report, keep warming)
                            failures += 1
                            log(f"  {op} {sizes} {dtype} {precision} {backend}: "
                                f"{type(err).__name__}: {str(err)[:160]}")
        torch.cuda.synchronize()
        log(f"{op}: {len(sizes_list)} sizes in {time.perf_counter() - start:.1f} s")
    return failures


def _parse_shape(text: str):
    op, _, assignments = text.partition(":")
    if op not in OPS or not assignments:
        raise argparse.ArgumentTypeError(f"expected OP:NAME=VALUE,... with OP one of {OPS}, got "
                                         f"{text!r}")
    try:
        return op, {k: int(v) for k, v in (a.split("=") for a in assignments.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be NAME=INT, got {assignments!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protokernels.warmup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=OPS, help="(repeatable; default: all)")
    parser.add_argument("--cases", choices=("model", "spec", "both"), default="both")
    parser.add_argument("--dtype", action="append", choices=tuple(DTYPES),
                        help="(repeatable; default: float32 and bfloat16)")
    parser.add_argument("--precision", action="append", choices=("highest", "high"),
                        help="float32 matmul precision (repeatable; default: both)")
    parser.add_argument("--shape", action="append", type=_parse_shape, default=[],
                        help="an extra size, OP:NAME=VALUE,... (repeatable)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("protokernels.warmup: no GPU visible; the Triton kernels compile for a GPU, so "
              "run this where the jobs run (or in the image build with a GPU)", file=sys.stderr)
        return 1
    shapes: dict[str, list] = {}
    for op, sizes in args.shape:
        shapes.setdefault(op, []).append(sizes)
    start = time.perf_counter()
    failures = warmup(args.op or OPS, args.cases,
                      [DTYPES[d] for d in args.dtype or ("float32", "bfloat16")],
                      args.precision or ("highest", "high"), shapes)
    counts = compiled_kernels()
    print(f"warmed up in {time.perf_counter() - start:.0f} s: {sum(counts.values())} compiled "
          f"kernel variants in {triton_cache_dir()}" + (f"; {failures} calls failed"
                                                          if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
