"""protokernels' benchmark CLI: `python -m protokernels.bench` (or `protokernels-bench`).

For every case of every selected op (benchmarks/<op>.py), in one process: the naive formula in
eager mode and under torch.compile, and each available backend of the fused op, forward and
forward+backward. Prints each row as it finishes, then a table; writes CSV and JSON rows with the
device, versions and date. Times are medians with p20/p80 (triton.testing.do_bench on CUDA, a
wall-clock loop on the CPU); peak extra memory is what the call allocates beyond its inputs (CUDA);
"roofline" is the fraction of the H100 floor (FLOPs at the precision's peak, or bytes at copy
bandwidth, whichever is larger) that the measured time reaches. `--sweep` runs each op's
sweep_cases (forward only) instead and plots time against the swept size.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch

import protokernels

OPS = ("sqdist", "nearest", "kp_conv", "dw_nearest", "codebook_lookup", "codebook_stats",
       "vector_quantizer", "sinkhorn", "sinkhorn_plan")
# H100 ceilings measured in SPEC.md: FFMA, TF32 (a third of it for 3xTF32), bf16 tensor cores,
# device-to-device copy (bytes read + written).
PEAK_FLOPS = {"ieee": 51.6e12, "tf32x3": 375e12 / 3, "tf32": 375e12, "half": 679e12}
PEAK_BYTES = 3.0e12


def _time_cuda(fn, grad_to_none):
    import triton.testing
    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100,
                                            grad_to_none=grad_to_none)
    return p50, p20, p80


def _time_cpu(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), quantiles[1], quantiles[7]


def _peak_extra_bytes(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _roofline_precision(dtype):
    """The PEAK_FLOPS entry the fused op runs at, under the matmul precision set for the case."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return protokernels._backend.resolve_precision("bench", None, dtype)


def _environment(device):
    import triton
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "protokernels": protokernels.__version__,
    }


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _runnable_backends(backends, device, log):
    statuses = protokernels.available_backends()
    runnable = []
    for name in backends:
        if statuses[name].available and (device.type == "cuda" or name != "cuda"):
            runnable.append(name)
        else:
            log(f"skipping backend {name}: {statuses[name].detail}")
    return runnable


def _measure(function, backend, sizes, inputs, backward, device, repeats):
    """(p50, p20, p80, extra bytes, error) of function(sizes, *inputs) [+ backward of its first
    output] under `backend`."""
    leaves = [t.detach().requires_grad_(backward) if t.is_floating_point() else t for t in inputs]

    def forward():
        with protokernels.use_backend(backend):
            return function(sizes, *leaves)

    try:
        grad = torch.randn_like(_first(forward())) if backward else None

        def call():
            out = forward()
            if backward:
                _first(out).backward(grad)

        call()
        if device.type == "cuda":
            p50, p20, p80 = _time_cuda(call, [t for t in leaves if t.requires_grad] or None)
        else:
            p50, p20, p80 = _time_cpu(call, repeats)
        return p50, p20, p80, _peak_extra_bytes(call, device), ""
    except Exception as err:  # a failing runner is reported, not fatal
        nan = float("nan")
        return nan, nan, nan, None, f"{type(err).__name__}: {str(err)[:200]}"


def _run_case(cases, op, case, matmul_precision, dtype, sizes, runners, modes, device, repeats,
              log):
    torch.set_float32_matmul_precision(matmul_precision)
    # cuDNN convolutions (the naive kp_conv) have their own TF32 switch; keep it in step.
    torch.backends.cudnn.allow_tf32 = matmul_precision != "highest"
    inputs = cases.make_inputs(sizes, dtype, device)
    precision = _roofline_precision(dtype)
    rows = []
    for mode in modes:
        backward = mode == "fwd+bwd"
        flops, moved = cases.work(sizes, dtype, backward)
        floor_ms = max(flops / PEAK_FLOPS[precision], moved / PEAK_BYTES) * 1e3
        for label, backend, function in runners:
            p50, p20, p80, extra, error = _measure(function, backend, sizes, inputs, backward,
                                                   device, repeats)
            row = {"op": op, "case": case, "mode": mode, "impl": label, **sizes,
                   "dtype": str(dtype).split(".")[1], "precision": precision, "median_ms": p50,
                   "p20_ms": p20, "p80_ms": p80,
                   "extra_MB": None if extra is None else extra / 2**20,
                   "roofline": floor_ms / p50 if p50 == p50 else float("nan"), "error": error}
            rows.append(row)
            log(_format_row(row))
    return rows


def _runners(cases, runnable, compile_naive, with_baselines=True):
    runners = [("naive eager", "reference", cases.naive)]
    if compile_naive:
        runners.append(("naive compiled", "reference", torch.compile(cases.naive)))
    if with_baselines:
        runners += [(label, "reference", fn) for label, fn in cases.BASELINES.items()]
    return runners + [(f"protokernels {name}", name, cases.fused) for name in runnable]


def run(ops, quick, backends, compile_naive, device, repeats, log=print):
    """The spec-size cases of each op: every runner, forward and forward+backward."""
    runnable = _runnable_backends(backends, device, log)
    rows = []
    for op in ops:
        cases = importlib.import_module(f"protokernels.benchmarks.{op}")
        runners = _runners(cases, runnable, compile_naive)
        for case, matmul_precision, dtype, sizes in cases.cases(quick):
            rows += _run_case(cases, op, case, matmul_precision, dtype, sizes, runners,
                              getattr(cases, "MODES", ("fwd", "fwd+bwd")), device, repeats, log)
    return rows


def sweep(ops, quick, backends, compile_naive, device, repeats, out_dir, log=print):
    """Each op's sweep_cases (forward only): rows, and a PNG per op of time against the swept
    size, so that users see where the fused op wins and where it does not."""
    runnable = _runnable_backends(backends, device, log)
    rows = []
    for op in ops:
        cases = importlib.import_module(f"protokernels.benchmarks.{op}")
        if not hasattr(cases, "sweep_cases"):
            continue
        runners = _runners(cases, runnable, compile_naive, with_baselines=False)
        panels = []
        for panel, variable, panel_cases in cases.sweep_cases(quick):
            panel_rows = []
            for case, matmul_precision, dtype, sizes in panel_cases:
                panel_rows += _run_case(cases, op, case, matmul_precision, dtype, sizes, runners,
                                        ("fwd",), device, repeats, log)
            panels.append((panel, variable, panel_rows))
            rows += [{**row, "sweep": panel} for row in panel_rows]
        _plot(op, panels, os.path.join(out_dir, f"sweep_{op}.png"), log)
    return rows


def _plot(op, panels, path, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no plot for {op} (the rows are in the CSV)")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (panel, variable, rows) in zip(axes[0], panels):
        for impl in dict.fromkeys(row["impl"] for row in rows):
            points = [(row[variable], row["median_ms"]) for row in rows if row["impl"] == impl]
            ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(variable)
        ax.set_ylabel("median ms")
        ax.set_title(f"{op}: {panel}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def _format_row(row):
    extra = "-" if row["extra_MB"] is None else f"{row['extra_MB']:.1f}"
    text = (f"{row['op']:<16} {row['case']:<8} {row['mode']:<8} {row['impl']:<22} "
            f"{row['median_ms']:>9.4f} [{row['p20_ms']:.4f}, {row['p80_ms']:.4f}] ms "
            f"{extra:>9} MB  {row['roofline']:>6.1%}")
    return text + (f"  {row['error']}" if row["error"] else "")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="protokernels-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=OPS,
                        help="op to benchmark (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, also on CPU)")
    parser.add_argument("--backend", action="append", choices=protokernels._backend.BACKENDS,
                        help="backends of the fused op (repeatable; default: all available)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline")
    parser.add_argument("--out", default="bench_out", help="folder for results.csv/.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats on the CPU")
    parser.add_argument("--sweep", action="store_true",
                        help="run the ops' size sweeps instead and plot them (sweep_<op>.png)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = _environment(device)
    print(f"protokernels-bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, {env['date']}")
    if device.type == "cpu":
        print("No GPU: running on the CPU, slowly; roofline fractions refer to an H100 and mean "
              "little here. Pass --quick for small sizes.")
    print(f"{'op':<16} {'case':<8} {'mode':<8} {'implementation':<22} {'median':>9} [p20, p80]"
          f"        peak extra  roofline", flush=True)
    os.makedirs(args.out, exist_ok=True)
    common = (args.op or OPS, args.quick, args.backend or protokernels._backend.BACKENDS,
              not args.no_compile, device, args.repeats)
    log = lambda line: print(line, flush=True)  # noqa: E731
    rows = sweep(*common, args.out, log=log) if args.sweep else run(*common, log=log)
    rows = [{**env, **row} for row in rows]
    name = "sweep" if args.sweep else "results"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, f"{name}.csv"), "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}/{name}.csv and {name}.json")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
