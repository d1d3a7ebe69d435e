"""Cold start: the first call of each op in a fresh process, with an empty Triton cache and with a
warm one (after `python -m protokernels.warmup`-like first runs), on the GPU.

For each op: a fresh Python process imports protokernels, then times its first call (forward, at
an in-model size, auto backend) and a second call. Run twice per op: with an empty
TRITON_CACHE_DIR, then with the same directory (now holding the compiled kernels).

    python scripts/cold_start.py [--op sinkhorn ...] [--out cold_start.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

CALLS = {
    "sqdist": "x = torch.randn(4096, 128, device='cuda'); y = torch.randn(512, 128, device='cuda')"
              "\ncall = lambda: protokernels.sqdist(x, y)",
    "nearest": "x = torch.randn(4096, 128, device='cuda'); y = torch.randn(512, 128, device='cuda')"
               "\ncall = lambda: protokernels.nearest(x, y)",
    "nearest_k": "x = torch.randn(4096, 128, device='cuda'); y = torch.randn(512, 128, "
                 "device='cuda')\ncall = lambda: protokernels.nearest_k(x, y, 8)",
    "dw_nearest": "x = torch.randn(8192, 512, device='cuda'); c = torch.randn(8, 1024, 64, "
                  "device='cuda')\ncall = lambda: protokernels.dw_nearest(x, c)",
    "kp_conv2d": "x = torch.randn(32, 64, 56, 56, device='cuda'); w = torch.randn(128, 64, 3, 3, "
                 "device='cuda')\ncall = lambda: protokernels.kp_conv2d(x, w, padding=1)",
    "sinkhorn": "s = torch.randn(4096, 3000, device='cuda')\ncall = lambda: protokernels.sinkhorn(s)",
}

SCRIPT = """
import time
start = time.perf_counter()
import torch, protokernels
torch.cuda.init()
imported = time.perf_counter() - start
{setup}
torch.cuda.synchronize()
t0 = time.perf_counter(); call(); torch.cuda.synchronize(); first = time.perf_counter() - t0
t0 = time.perf_counter(); call(); torch.cuda.synchronize(); second = time.perf_counter() - t0
print(imported, first, second)
"""


def measure(op: str, cache: str) -> tuple[float, float, float]:
    env = {**os.environ, "TRITON_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(setup=CALLS[op])], env=env,
                         capture_output=True, text=True, check=True)
    return tuple(float(v) for v in out.stdout.split()[-3:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--op", action="append", choices=list(CALLS),
                        help="ops to measure (repeatable; default all)")
    args = parser.parse_args()
    rows = []
    print(f"{'op':<12} {'import s':>9} {'first call, empty cache s':>26} "
          f"{'first call, warm cache s':>25} {'second call ms':>15}")
    for op in args.op or CALLS:
        with tempfile.TemporaryDirectory() as cache:
            imported, cold, _ = measure(op, cache)
            _, warm, second = measure(op, cache)
        rows.append(dict(op=op, import_s=imported, first_empty_cache_s=cold,
                         first_warm_cache_s=warm, second_call_ms=second * 1e3))
        print(f"{op:<12} {imported:>9.2f} {cold:>26.2f} {warm:>25.3f} {second * 1e3:>15.3f}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
