"""sinkhorn with a process group on several GPUs (NCCL): every rank's codes equal its rows of the
single-GPU result, and the time per call. Run on a multi-GPU machine with
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 scripts/sinkhorn_nccl.py [--quick]
Rank 0 prints the table rows (markdown) for benchmarks/RESULTS.md."""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import triton.testing

import protokernels

CASES = [(4096, 3000, 3), (65536, 16384, 10)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--backend", action="append", choices=protokernels._backend.BACKENDS)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda")
    if rank == 0:
        print(f"{world} ranks on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
        print("| backend | B (total) | K | iters | max rel. error vs 1 GPU | 1 GPU ms | "
              f"{world} GPUs ms |\n|---|---|---|---|---|---|---|")
    cases = [(512, 300, 3)] if args.quick else CASES
    for backend in args.backend or ("triton", "cuda"):
        for b, k, iters in cases:
            generator = torch.Generator(device=device).manual_seed(0)
            scores = torch.randn(b, k, device=device, generator=generator) * 0.3
            rows = scores.tensor_split(world)[rank]  # each rank holds its own rows
            with protokernels.use_backend(backend):
                def split():
                    return protokernels.sinkhorn(rows, n_iters=iters,
                                                 process_group=dist.group.WORLD)

                def single():
                    return protokernels.sinkhorn(scores, n_iters=iters)

                codes = split()
                reference = single().tensor_split(world)[rank]
                error = ((codes - reference).norm() / reference.norm()).reshape(1)
                dist.all_reduce(error, op=dist.ReduceOp.MAX)
                ms_split = triton.testing.do_bench(split, warmup=10, rep=50)
                ms_single = triton.testing.do_bench(single, warmup=10, rep=50)
            times = torch.tensor([ms_split], device=device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's median
            if rank == 0:
                print(f"| {backend} | {b} | {k} | {iters} | {error.item():.2e} | "
                      f"{ms_single:.3f} | {times.item():.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
