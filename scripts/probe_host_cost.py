"""Where a call's host time goes, on the GPU machine: dispatch layers, Triton launch paths, the
pieces of a nearest call, and the in-model cases whose host cost exceeded the naive expression's
(VQ's quantization step: dw_quantize and its two-call form; sinkhorn). Host microseconds per call
(no sync inside the loop; small shapes, so the GPU keeps up). `--profile` adds a cProfile of the
Triton calls.

    python scripts/probe_host_cost.py [--profile]
"""
import argparse
import cProfile
import pstats

import torch
import triton
import triton.language as tl

import protokernels
from protokernels import bench
from protokernels.benchmarks import dw_nearest as dw_bench
from protokernels.benchmarks import sinkhorn as sinkhorn_bench
from protokernels.ops import dw_nearest as dw_op
from protokernels.ops import nearest as nearest_op
from protokernels.triton_kernels import _common
from protokernels.triton_kernels import nearest as nearest_kernels


@triton.jit
def _tiny(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)


lib = torch.library.Library("probe", "DEF")
lib.define("noop(Tensor x, Tensor y, str p, str b) -> (Tensor, Tensor)")
lib.impl("noop", lambda x, y, p, b: (torch.empty_like(x), torch.empty_like(x)), "CUDA")


@torch.library.custom_op("probe::noop_custom", mutates_args=())
def _noop_custom(x: torch.Tensor, y: torch.Tensor, p: str,
                 b: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    # The grid's precision: float32 products in TF32, for the ops and the naive forms alike (the
    # default "highest" makes dw_nearest split its operands for 3xTF32).
    torch.set_float32_matmul_precision("high")
    x = torch.randn(4096, 128, device="cuda")
    y = torch.randn(512, 128, device="cuda")
    x3, y3 = x[None], y[None]
    rows = {
        "torch.empty": lambda: torch.empty(4, device="cuda"),
        "cdist(x, y).argmin(1)": lambda: torch.cdist(x, y).argmin(1),
        "Library op no-op": lambda: torch.ops.probe.noop(x, y, "a", "b"),
        "custom_op no-op": lambda: torch.ops.probe.noop_custom(x, y, "a", "b"),
    }
    out = torch.empty_like(x)
    rows["triton tiny kernel[grid](...)"] = lambda: _tiny[(1,)](x, out, 4096, BLOCK=1024)
    runner = _tiny[(1,)](x, out, 4096, BLOCK=1024)[(1, 1, 1)]
    rows["triton tiny compiled[grid](...)"] = lambda: runner(x, out, 4096, 1024)
    tiny = _common.launcher(_tiny)
    rows["triton tiny via launcher"] = lambda: tiny((1,), x, out, 4096, BLOCK=1024)
    rows["nearest: validate + choose"] = lambda: nearest_op._choose(
        "nearest", *nearest_op._rows("nearest", x, y)[1:], None)
    dist, idx = nearest_op.new_results(x3, (1, 4096, 1))
    rows["nearest: outputs"] = lambda: nearest_op.new_results(x3, (1, 4096, 1))
    rows["nearest: triton _prepare"] = lambda: nearest_kernels._prepare(x3, y3, False, 256)
    rows["nearest: triton implementation"] = lambda: nearest_kernels.nearest(
        x3, y3, None, 1, "tf32", dist, idx)
    if protokernels.available_backends()["cuda"].available:
        rows["nearest: cuda implementation"] = lambda: torch.ops.protokernels.nearest_cuda(
            x3, y3, None, 1, "tf32", dist, idx)
    for backend in ("triton", "cuda"):
        with protokernels.use_backend(backend):
            rows[f"nearest public, {backend}"] = lambda: protokernels.nearest(x, y,
                                                                            precision="tf32")
    # The in-model cases (RESULTS.md "The in-model grid"), per backend against the naive form.
    vq_sizes = dw_bench._sizes(8192, 1, 512, 64)
    vq = dw_bench.make_inputs(vq_sizes, torch.float32, torch.device("cuda"))
    _, vq_idx = protokernels.dw_nearest(*vq)
    in_model = {
        "dw_quantize N8192 K512 D64": lambda: protokernels.dw_quantize(*vq),
        "  dw_nearest + codebook_lookup": lambda: dw_bench.two_calls(vq_sizes, *vq),
        "  of which dw_nearest": lambda: protokernels.dw_nearest(*vq),
        "  of which codebook_lookup": lambda: protokernels.codebook_lookup(vq_idx, vq[1]),
    }
    for backend in ("triton", "cuda"):  # the op without its public wrapper
        rows[f"  dw_quantize's op alone, {backend}"] = (
            lambda b=backend: dw_op._dw_quantize(vq[0], vq[1], "tf32", False, b, "triton"))
    naive = {"dw_quantize N8192 K512 D64": lambda: dw_bench.naive(vq_sizes, *vq)}
    for b in (256, 1024):
        scores = torch.randn(b, 3000, device="cuda")
        in_model[f"sinkhorn B{b} K3000"] = (
            lambda s=scores: protokernels.sinkhorn(s, eps=0.05, n_iters=3))
        naive[f"sinkhorn B{b} K3000"] = lambda s=scores: sinkhorn_bench.swav_sinkhorn(s, 0.05, 3)
    for name, fn in in_model.items():
        for backend in ("triton", "cuda", "auto"):
            rows[f"{name}, {backend}"] = fn
        if name in naive:
            rows[f"{name}, naive"] = naive[name]
    results = {}
    for name, fn in rows.items():
        # The backend a row names after its last comma (triton for rows naming none).
        backend = name.rsplit(", ", 1)[-1]
        with protokernels.use_backend(backend if backend in ("cuda", "auto") else "triton"):
            results[name] = bench.host_us(fn, torch.device("cuda"), repeats=30)
    if args.profile:
        profiled = {"nearest": lambda: protokernels.nearest(x, y, precision="tf32"),
                    **{name: in_model[name] for name in in_model if not name.startswith(" ")}}
        for name, fn in profiled.items():
            with protokernels.use_backend("triton"):
                fn()
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(300):
                    fn()
                profile.disable()
                print(f"== cProfile, 300 calls: {name}, triton")
                pstats.Stats(profile).sort_stats("tottime").print_stats(22)
    for name, us in results.items():
        print(f"{name:<40} {us:8.1f} us")


if __name__ == "__main__":
    main()
