"""Sweep the Triton kernels' launch configs at the spec's sizes on a GPU and print the fastest per
case: the evidence behind sqdist's forward_config() / grad_config() (B8 N4096 M4096 D128) and
nearest's search_config() (N65536 M8192 D256; dw_nearest: its grouped view, N65536 G8 K1024
Dg64), and kp_conv's tables (x (32, 64, 56, 56),
w (128, 64, 3, 3), padding 1).

    python scripts/tune_triton.py [--op sqdist|nearest|kp_conv|dw_nearest] [--budget SECONDS] [--case ...]
"""
import argparse
import itertools
import time

import torch
import triton.testing

from protokernels.triton_kernels import kp_conv as conv_kernels
from protokernels.triton_kernels import nearest as search_kernels
from protokernels.triton_kernels import sqdist as kernels

FORWARD = [dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=st, STREAM_STORES=cs)
           for (bn, bm), bd, w, st, cs in itertools.product(
               [(128, 128), (128, 256), (256, 128), (64, 256)], [16, 32, 64], [4, 8], [2, 3, 4],
               [False, True])]
GRAD = [dict(BLOCK_R=br, BLOCK_S=bs, BLOCK_D=bd, num_warps=w, num_stages=st, TRANSPOSE_B=tb)
        for br, bs, bd, w, st, tb in itertools.product([64, 128], [32, 64, 128], [128], [4, 8],
                                                       [2, 3], [False, True])]


def sweep(name, run, configs, deadline, top=5):
    results = []
    for config in configs:
        if time.time() > deadline:
            print(f"  {name}: time budget spent after {len(results)} configs")
            break
        try:
            run(config)
            ms = triton.testing.do_bench(lambda: run(config), warmup=10, rep=40)
        except Exception as err:  # out of shared memory / registers: not a candidate
            print(f"  {name} {config}: {type(err).__name__}")
            continue
        results.append((ms, config))
    results.sort(key=lambda r: r[0])
    for ms, config in results[:top]:
        print(f"{name:<24} {ms:8.4f} ms  {config}", flush=True)
    return results


def search_configs(depths):
    return [dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=st)
            for (bn, bm), bd, w, st in itertools.product(
                [(128, 128), (128, 256), (256, 128), (64, 256)], depths, [4, 8], [3, 4])]


def tune_nearest(cases, deadline):
    n, m, d = 65536, 8192, 256
    todo = [(c, dt, p, depths) for c, dt, p, depths in [
        ("tf32", torch.float32, "tf32", [32, 64]), ("tf32x3", torch.float32, "tf32x3", [16, 32]),
        ("bf16", torch.bfloat16, "ieee", [32, 64, 128])] if c in cases]
    for i, (case, dtype, precision, depths) in enumerate(todo):
        x = torch.randn(n, d, device="cuda", dtype=dtype)[None]
        y = torch.randn(m, d, device="cuda", dtype=dtype)[None]
        default = search_kernels.search_config(n, m, d, dtype, precision)
        ms = triton.testing.do_bench(lambda: search_kernels._search(x, y, precision))
        print(f"default search {case}: {ms:.4f} ms {default}", flush=True)
        share = (deadline - time.time()) / (len(todo) - i)
        sweep(f"search {case}", lambda c: search_kernels._search(x, y, precision, config=c),
              search_configs(depths), time.time() + share)


def tune_dw_nearest(cases, deadline):
    """nearest's search on depthwise VQ's grouped view (groups as the batch, D = Dg = 64)."""
    n, groups, size, depth = 65536, 8, 1024, 64
    todo = [(c, dt, p, depths) for c, dt, p, depths in [
        ("tf32", torch.float32, "tf32", [32, 64]), ("tf32x3", torch.float32, "tf32x3", [16, 32]),
        ("bf16", torch.bfloat16, "ieee", [32, 64])] if c in cases]
    for i, (case, dtype, precision, depths) in enumerate(todo):
        x = torch.randn(n, groups * depth, device="cuda", dtype=dtype)
        x = x.unflatten(1, (groups, depth)).transpose(0, 1)
        y = torch.randn(groups, size, depth, device="cuda", dtype=dtype)
        default = search_kernels.search_config(n, size, depth, dtype, precision)
        ms = triton.testing.do_bench(lambda: search_kernels._search(x, y, precision))
        print(f"default search {case}: {ms:.4f} ms {default}", flush=True)
        share = (deadline - time.time()) / (len(todo) - i)
        sweep(f"dw search {case}", lambda c: search_kernels._search(x, y, precision, config=c),
              search_configs(depths) +
              [dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=st)
               for bn, bm, bd, w, st in itertools.product([64, 128], [64, 128], depths, [4],
                                                          [2, 3])],
              time.time() + share)


# NHWC last: both layouts of the gathered operand get tried before the time budget runs out.
CONV_FORWARD = [dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_K=bk, num_warps=w, num_stages=st, NHWC=nhwc)
                for (bm, bp), bk, w, st, nhwc in itertools.product(
                    [(256, 128), (128, 128), (128, 256)], [16, 32], [8, 4], [3, 4],
                    [True, False])]
CONV_GRAD_INPUT = [dict(BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, num_warps=w, num_stages=st, NHWC=nhwc)
                   for bm, bc, bk, w, st, nhwc in itertools.product(
                       [128], [64, 128], [32, 16, 64], [4, 8], [2, 3], [True, False])]
CONV_GRAD_WEIGHT = [dict(BLOCK_P=bp, BLOCK_K=bk, BLOCK_M=bm, num_warps=w, num_stages=st)
                    for bp, bk, bm, w, st in itertools.product([64, 128], [64, 128], [32, 16, 64],
                                                               [4, 8], [2, 3])]


def tune_kp_conv(cases, deadline):
    geometry = ([1, 1], [1, 1], [1, 1])
    todo = [(c, dt, p) for c, dt, p in [("tf32", torch.float32, "tf32"),
                                        ("tf32x3", torch.float32, "tf32x3"),
                                        ("bf16", torch.bfloat16, "ieee")] if c in cases]
    for i, (case, dtype, precision) in enumerate(todo):
        x = torch.randn(32, 64, 56, 56, device="cuda", dtype=dtype)
        w = torch.randn(128, 64, 3, 3, device="cuda", dtype=dtype)
        out = torch.empty(32, 128, 56, 56, device="cuda", dtype=dtype)
        gx, gw = torch.empty_like(x), torch.empty_like(w)
        runs = [("forward", CONV_FORWARD,
                 lambda c: conv_kernels.kp_conv2d(x, w, *geometry, precision, out, c)),
                ("grad input", CONV_GRAD_INPUT,
                 lambda c: conv_kernels.kp_conv2d_grad_input(out, x, w, *geometry, precision, gx, c)),
                ("grad weight", CONV_GRAD_WEIGHT,
                 lambda c: conv_kernels.kp_conv2d_grad_weight(out, x, w, *geometry, precision, gw,
                                                              c))]
        for j, (name, configs, run) in enumerate(runs):
            print(f"default {name} {case}: {triton.testing.do_bench(lambda: run(None)):.4f} ms",
                  flush=True)
            share = (deadline - time.time()) / ((len(todo) - i) * len(runs) - j)
            sweep(f"{name} {case}", run, configs, time.time() + share)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", choices=["sqdist", "nearest", "kp_conv", "dw_nearest"],
                        default="sqdist")
    parser.add_argument("--budget", type=float, default=420, help="seconds for the whole sweep")
    parser.add_argument("--case", action="append", choices=["tf32", "tf32x3", "bf16"],
                        help="cases to sweep (repeatable; default: all)")
    args = parser.parse_args()
    cases = args.case or ["tf32", "tf32x3", "bf16"]
    deadline = time.time() + args.budget
    if args.op == "nearest":
        return tune_nearest(cases, deadline)
    if args.op == "kp_conv":
        return tune_kp_conv(cases, deadline)
    if args.op == "dw_nearest":
        return tune_dw_nearest(cases, deadline)
    b, n, m, d = 8, 4096, 4096, 128
    for case, dtype, precision in [("tf32", torch.float32, "tf32"),
                                   ("tf32x3", torch.float32, "tf32x3"),
                                   ("bf16", torch.bfloat16, "ieee")]:
        if case not in cases:
            continue
        x = torch.randn(b, n, d, device="cuda", dtype=dtype)
        y = torch.randn(b, m, d, device="cuda", dtype=dtype)
        g = torch.randn(b, n, m, device="cuda", dtype=dtype)
        default = kernels.forward_config(n, m, d, dtype, precision)
        print(f"default forward {precision} {dtype}: {triton.testing.do_bench(lambda: kernels.sqdist(x, y, precision)):.4f} ms {default}")
        share = (deadline - time.time()) / (1 if precision == "tf32x3" else 2)
        sweep(f"forward {precision} {str(dtype)[6:]}", lambda c: kernels.sqdist(x, y, precision, c),
              FORWARD, time.time() + share)
        if precision == "tf32x3":
            continue
        for transpose, (a, bb) in [(False, (x, y)), (True, (y, x))]:
            sweep(f"grad T={transpose} {precision} {str(dtype)[6:]}",
                  lambda c: kernels.sqdist_grad(g, a, bb, transpose, precision, c), GRAD,
                  time.time() + share / 2)


if __name__ == "__main__":
    main()
