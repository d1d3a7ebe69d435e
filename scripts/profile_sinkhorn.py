"""Time sinkhorn's sweeps alone (Triton and CUDA) and try row-sweep configs of the Triton kernel
(BLOCK_K, rows per step, warps, programs per SM), reporting the HBM bandwidth each reaches.
--iterate: only CUDA's whole iteration (one cooperative launch) at SwAV's sizes, for 1, 2, 3
and 5 iterations: the cost of an iteration and the fixed cost (RESULTS.md, "Sinkhorn's
persistent kernel through a shared-memory ring").
    python scripts/profile_sinkhorn.py [--quick] [--iterate]"""
from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton.testing

import protokernels
from protokernels.triton_kernels import sinkhorn as kernels


def bench(fn):
    """GPU time: replayed from a CUDA graph, without the launch overhead."""
    return triton.testing.do_bench_cudagraph(fn, rep=60)


def iterate():
    """GPU microseconds of sinkhorn_iterate_cuda (uniform marginals, scale 20) by n_iters."""
    protokernels.available_backends()  # loads the extension
    for b in (256, 1024, 4096):
        k = 3000
        scores = torch.randn(b, k, device="cuda") * 0.3
        plan, logsum = torch.empty_like(scores), torch.empty(k, device="cuda")
        times = []
        for iters in (1, 2, 3, 5):
            times.append(1000 * bench(lambda: torch.ops.protokernels.sinkhorn_iterate_cuda(
                scores, 20.0, iters, None, -math.log(b), None, -math.log(k), plan, logsum,
                None, None)))
        moved = (2 + 3) * scores.numel() * 4 / 1e6  # 4 reads and the plan's write, MB
        print(f"B{b} K{k} iterate_cuda n_iters 1/2/3/5: "
              + " / ".join(f"{t:.1f}" for t in times)
              + f" us; per iteration {(times[3] - times[1]) / 3:.1f} us; "
              f"{moved / times[2]:.2f} TB/s at 3 iterations (4 reads + the plan)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterate", action="store_true")
    args = parser.parse_args()
    if args.iterate:
        return iterate()
    shapes = [(4096, 3000), (4096, 4096), (65536, 16384)]
    for b, k in shapes[:1] if args.quick else shapes:
        scores = torch.randn(b, k, device="cuda") * 0.3
        gbytes = scores.numel() * 4 / 1e9
        v, v_next = torch.zeros(k, device="cuda"), torch.empty(k, device="cuda")
        logsum = torch.empty(k, device="cuda")
        protokernels.available_backends()  # loads the extension
        cuda = torch.ops.protokernels
        runs = {
            "triton column_logsum": lambda: kernels.sinkhorn_column_logsum(
                scores, 20.0, None, 0.0, logsum, v_next),
            "cuda column_logsum": lambda: cuda.sinkhorn_column_logsum_cuda(
                scores, 20.0, None, 0.0, logsum, v_next),
            "triton row_sweep": lambda: kernels.sinkhorn_row_sweep(
                scores, 20.0, v, None, 0.0, None, 0.0, logsum, v_next, None, None),
            "cuda row_sweep": lambda: cuda.sinkhorn_row_sweep_cuda(
                scores, 20.0, v, None, 0.0, None, 0.0, logsum, v_next, None, None),
        }
        for name, fn in runs.items():
            ms = bench(fn)
            print(f"B {b} K {k} {name:<22} {ms:.4f} ms  {gbytes / ms:.2f} TB/s")
        default = kernels.sweep_config
        block_k = default(k)[0]
        results = []
        for rows, warps, per_sm in itertools.product((1, 2, 4), (4, 8, 16, 32), (1, 2, 4)):
            if rows * block_k > 32768 or block_k // (32 * warps) < 1:
                continue
            kernels.sweep_config = lambda k, c=(block_k, rows, warps, per_sm): c
            try:
                ms = bench(runs["triton row_sweep"])
            except Exception as err:  # out of resources
                print(f"  rows {rows} warps {warps} per_sm {per_sm}: {type(err).__name__}")
                continue
            finally:
                kernels.sweep_config = default
            results.append((ms, rows, warps, per_sm))
        for ms, rows, warps, per_sm in sorted(results)[:6]:
            print(f"  row_sweep rows {rows} warps {warps} per_sm {per_sm}: {ms:.4f} ms "
                  f"{gbytes / ms:.2f} TB/s")
        for iters in (3, 10):
            for backend in ("triton", "cuda"):
                with protokernels.use_backend(backend):
                    def call():
                        return protokernels.sinkhorn(scores, n_iters=iters)
                    ms = triton.testing.do_bench(call, warmup=10, rep=60)
                    graph_ms = bench(call)
                print(f"B {b} K {k} sinkhorn {iters} iters {backend}: eager {ms:.4f} ms, "
                      f"GPU time (CUDA graph) {graph_ms:.4f} ms")
    cost = torch.rand(4096, 4096, device="cuda")
    for backend in ("triton", "cuda"):
        with protokernels.use_backend(backend):
            leaf = cost.clone().requires_grad_()

            def forward_backward():
                protokernels.sinkhorn_plan(leaf, eps=0.05, n_iters=100).sum().backward()
            ms = triton.testing.do_bench(forward_backward, warmup=2, rep=200)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"sinkhorn_plan 4096x4096 100 iters fwd+bwd {backend}: {ms:.3f} ms, {extra:.0f} MB")


if __name__ == "__main__":
    main()
