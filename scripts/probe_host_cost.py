"""Where a call's host time goes, on the GPU machine: dispatch layers and Triton launch paths.

Host microseconds per call (no sync inside the loop; tiny shapes so the GPU keeps up).
"""
import time

import torch
import triton
import triton.language as tl

import protokernels


def host_us(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


@triton.jit
def _tiny(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)


lib = torch.library.Library("probe", "DEF")
lib.define("noop(Tensor x, Tensor y, str p, str b) -> (Tensor, Tensor)")


def _noop(x, y, p, b):
    return torch.empty_like(x), torch.empty_like(x)


lib.impl("noop", _noop, "CUDA")


@torch.library.custom_op("probe::noop_custom", mutates_args=())
def _noop_custom(x: torch.Tensor, y: torch.Tensor, p: str, b: str) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def main():
    dev = "cuda"
    x = torch.randn(64, 32, device=dev)
    y = torch.randn(16, 32, device=dev)
    rows = {}
    rows["torch.empty"] = host_us(lambda: torch.empty(4, device=dev))
    rows["x + 1"] = host_us(lambda: x + 1)
    rows["cdist(x, y).argmin(1)"] = host_us(lambda: torch.cdist(x, y).argmin(1))
    rows["addmm+argmin"] = host_us(
        lambda: torch.addmm(y.square().sum(1), x, y.T, alpha=-2).argmin(1))
    rows["Library op (CUDA key) no-op"] = host_us(lambda: torch.ops.probe.noop(x, y, "a", "b"))
    rows["custom_op no-op"] = host_us(lambda: torch.ops.probe.noop_custom(x, y, "a", "b"))
    out = torch.empty_like(x)
    n = x.numel()
    rows["triton tiny JIT launch"] = host_us(lambda: _tiny[(1,)](x, out, n, BLOCK=1024))
    compiled = _tiny[(1,)](x, out, n, BLOCK=1024)
    runner = compiled[(1, 1, 1)]
    rows["triton tiny compiled[grid](...)"] = host_us(lambda: runner(x, out, n, 1024))
    for backend in ("triton", "cuda", "reference"):
        with protokernels.use_backend(backend):
            for name, fn in (
                    ("sqdist", lambda: protokernels.sqdist(x, y)),
                    ("nearest", lambda: protokernels.nearest(x, y)),
                    ("nearest_k4", lambda: protokernels.nearest_k(x, y, 4)),
                    ("dw_nearest", lambda: protokernels.dw_nearest(x, y.view(2, 16, 16))),
                    ("sinkhorn", lambda: protokernels.sinkhorn(x)),
                    ("kp_conv2d", lambda: protokernels.kp_conv2d(x.view(2, 1, 32, 32),
                                                                  y.view(16, 1, 2, 16)[:, :, :, :2]))):
                try:
                    rows[f"{name} {backend}"] = host_us(fn, 200)
                except Exception as err:  # noqa: BLE001
                    rows[f"{name} {backend}"] = float("nan")
                    print(name, backend, err)
    # The search kernel's own launch: JIT path vs compiled[grid].
    from protokernels.triton_kernels import nearest as tn
    import cProfile
    import pstats
    with protokernels.use_backend("triton"):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            protokernels.nearest(x, y)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    for name, us in rows.items():
        print(f"{name:<40} {us:8.1f} us")


if __name__ == "__main__":
    main()
