"""dw_nearest + codebook_lookup and the VectorQuantizer training step on a GPU at the spec's
sizes (N 65536, G 8, K 1024, Dg 64): each step through its Triton host function, the ops in
eager mode and replayed in a CUDA graph (the gap is the host's per-call cost), and the CUDA
kernel times from torch.profiler.

    python scripts/profile_dw_nearest.py
"""
import torch
import triton.testing as tt
from torch.profiler import ProfilerActivity, profile

import protokernels as pk
from protokernels.nn import VectorQuantizer
from protokernels.triton_kernels import codebook_lookup as lookup_kernels
from protokernels.triton_kernels import codebook_stats as stats_kernels
from protokernels.triton_kernels import nearest as search_kernels

n, groups, size, depth = 65536, 8, 1024, 64
x = torch.randn(n, groups * depth, device="cuda")
codebooks = torch.randn(groups, size, depth, device="cuda")
grouped = x.unflatten(1, (groups, depth)).transpose(0, 1)
idx = torch.randint(0, size, (n, groups), device="cuda")
out = torch.empty_like(x)


def quantize():
    return pk.codebook_lookup(pk.dw_nearest(x, codebooks)[1], codebooks)


def timed(name, fn):
    print(f"{name:<40} {tt.do_bench(fn, quantiles=[0.5, 0.2, 0.8])}", flush=True)


for precision, matmul in [("tf32", "high"), ("tf32x3", "highest")]:
    torch.set_float32_matmul_precision(matmul)
    timed(f"search kernel {precision}", lambda: search_kernels._search(grouped, codebooks, precision))
    timed(f"search + finish {precision}", lambda: search_kernels.nearest(grouped, codebooks, None, 1,
                                                                          precision))
    timed(f"dw_nearest op {precision}", lambda: pk.dw_nearest(x, codebooks))
    timed(f"dw_nearest + lookup {precision}", quantize)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            quantize()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        quantize()
    timed(f"dw_nearest + lookup in a CUDA graph {precision}", graph.replay)
timed("lookup kernel", lambda: lookup_kernels.codebook_lookup(idx, codebooks, out))
timed("stats kernel (atomic)", lambda: stats_kernels.codebook_stats(x, idx, size, False))
timed("stats (deterministic)", lambda: stats_kernels.codebook_stats(x, idx, size, True))

torch.set_float32_matmul_precision("high")
vq = VectorQuantizer(groups * depth, size, groups).cuda()
inputs = x.view(64, 1024, -1).clone().requires_grad_()


def step():
    quantized, _, loss = vq(inputs)
    (quantized + loss).backward(torch.ones_like(quantized))


timed("VectorQuantizer training step", step)
for name, fn in [("dw_nearest + lookup tf32", quantize), ("VectorQuantizer step", step)]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(name)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
