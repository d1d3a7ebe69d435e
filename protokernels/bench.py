"""protokernels' benchmark CLI: `python -m protokernels.bench` (or `protokernels-bench`).

For every case of every selected op (benchmarks/<op>.py), in one process: the naive formula in
eager mode and under torch.compile, the anchor baselines, protokernels with `auto` (what users get)
and each available backend, forward and forward+backward. Prints each row as it finishes, then a
summary table with the speedup of `auto` over naive eager and compiled in every row; writes CSV
and JSON rows with the device, versions and date.

Times are medians with p20/p80 (triton.testing.do_bench on CUDA, a wall-clock loop on the CPU);
peak extra memory is what the call allocates beyond its inputs (CUDA); "roofline" is the fraction
of the H100 floor (FLOPs at the precision's peak, or bytes at copy bandwidth, whichever is larger)
that the measured time reaches. `--host` adds the host microseconds per call (the time to enqueue
a call, without waiting for the GPU) and the forward's GPU time as a CUDA-graph replay, which
separates the Python and launch cost from the kernels'.

`--regime spec` (default) runs the ops' large reference sizes, `--regime model` the grid of sizes
used inside models (prototype heads, VQ layers, SwAV batches, small images) and plots the speedups;
`--sweep` runs each op's size sweep instead and plots time against the swept size.
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
       "vector_quantizer", "sinkhorn", "sinkhorn_plan", "glvq_loss", "rslvq_loss",
       "dpnp_loss", "codes_cross_entropy", "sinkhorn_prototype_loss", "prototype_layer",
       "heads")
# H100 ceilings, measured on the benchmark machine (README, "Benchmarks"): FFMA, TF32 (a third
# of it for 3xTF32), bf16 tensor cores, device-to-device copy (bytes read + written).
PEAK_FLOPS = {"ieee": 51.6e12, "tf32x3": 375e12 / 3, "tf32": 375e12, "half": 679e12}
PEAK_BYTES = 3.0e12


class DoesNotApply(Exception):
    """Raised by an anchor baseline for a case it has no counterpart of (prototorch has no DPNP
    head): the row is left out, not reported as an error."""


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


def host_us(fn, device, calls=10, repeats=15):
    """Host microseconds per call: the wall time of issuing `calls` calls back to back, with the
    GPU idle at the start (few enough launches that the queue never blocks); median of
    `repeats`."""
    if device.type != "cuda":
        return float("nan")
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def _graph_ms(fn, device):
    """The GPU time of a call: a CUDA graph of it replayed (no host cost), median ms."""
    if device.type != "cuda":
        return float("nan")
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, quantiles=[0.5])
    except Exception:  # noqa: BLE001 (a runner that cannot be captured reports no GPU time)
        return float("nan")


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
    """The fused op's runners: "auto" (what users get) and each requested backend that runs
    here."""
    statuses = protokernels.available_backends()
    runnable = []
    for name in backends:
        if name == "auto" or (statuses[name].available
                              and (device.type == "cuda" or name != "cuda")):
            runnable.append(name)
        else:
            log(f"skipping backend {name}: {statuses[name].detail}")
    return runnable


def _measure(function, backend, sizes, inputs, backward, device, repeats, host=False):
    """(p50, p20, p80, extra bytes, host us, graph ms, error) of function(sizes, *inputs)
    [+ backward of its first output] under `backend`; None if the function does not apply."""
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
        nan = float("nan")
        host_time = host_us(call, device) if host else nan
        graph_ms = _graph_ms(forward, device) if host and not backward else nan
        return p50, p20, p80, _peak_extra_bytes(call, device), host_time, graph_ms, ""
    except DoesNotApply:
        return None
    except Exception as err:  # a failing runner is reported, not fatal
        nan = float("nan")
        return nan, nan, nan, None, nan, nan, f"{type(err).__name__}: {str(err)[:200]}"


def _run_case(cases, op, case, matmul_precision, dtype, sizes, runners, modes, device, repeats,
              log, host=False):
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
            measured = _measure(function, backend, sizes, inputs, backward, device, repeats,
                                host)
            if measured is None:
                continue
            p50, p20, p80, extra, host_us, graph_ms, error = measured
            row = {"op": op, "case": case, "mode": mode, "impl": label, "sizes": sizes, **sizes,
                   "dtype": str(dtype).split(".")[1], "precision": precision, "median_ms": p50,
                   "p20_ms": p20, "p80_ms": p80,
                   "extra_MB": None if extra is None else extra / 2**20,
                   "roofline": floor_ms / p50 if p50 == p50 else float("nan"),
                   "host_us": host_us, "graph_ms": graph_ms, "error": error}
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


def run(ops, quick, backends, compile_naive, device, repeats, log=print, regime="spec",
        host=False):
    """The cases of each op (`regime` "spec": cases(), "model": model_cases()): every runner,
    forward and forward+backward."""
    runnable = _runnable_backends(backends, device, log)
    rows = []
    for op in ops:
        cases = importlib.import_module(f"protokernels.benchmarks.{op}")
        grid = cases.cases if regime == "spec" else getattr(cases, "model_cases", None)
        if grid is None:
            log(f"{op}: no in-model cases (its sizes are covered by another op's rows)")
            continue
        runners = _runners(cases, runnable, compile_naive)
        for case, matmul_precision, dtype, sizes in grid(quick):
            rows += _run_case(cases, op, case, matmul_precision, dtype, sizes, runners,
                              getattr(cases, "MODES", ("fwd", "fwd+bwd")), device, repeats, log,
                              host)
    return rows


def summary(rows) -> list[dict]:
    """One line per (op, case, mode): sizes, naive eager and compiled, protokernels auto and the
    fastest backend, and auto's speedup over naive eager, naive compiled and the better of the two
    (>= 1.0: at least as fast as what it replaces)."""
    lines = []
    for key in dict.fromkeys((r["op"], r["case"], r["mode"]) for r in rows):
        group = {r["impl"]: r for r in rows if (r["op"], r["case"], r["mode"]) == key}
        ms = {impl: r["median_ms"] for impl, r in group.items()}
        auto = ms.get("protokernels auto", float("nan"))
        eager, compiled = ms.get("naive eager", float("nan")), ms.get("naive compiled",
                                                                     float("nan"))
        backends = {impl: t for impl, t in ms.items()
                    if impl.startswith("protokernels ") and impl != "protokernels auto"}
        best = min(backends, key=lambda impl: backends[impl] if backends[impl] == backends[impl]
                   else float("inf"), default="-")
        naive_best = min((t for t in (eager, compiled) if t == t), default=float("nan"))
        lines.append({
            "op": key[0], "case": key[1], "mode": key[2],
            "sizes": " ".join(f"{k}{v}" for k, v in next(iter(group.values()))["sizes"].items()),
            "naive_eager_ms": eager, "naive_compiled_ms": compiled, "auto_ms": auto,
            "best_backend": best.removeprefix("protokernels "),
            "best_ms": backends.get(best, float("nan")),
            "speedup_vs_eager": eager / auto, "speedup_vs_compiled": compiled / auto,
            "speedup": naive_best / auto,
            "auto_host_us": group.get("protokernels auto", {}).get("host_us", float("nan")),
            "naive_host_us": group.get("naive eager", {}).get("host_us", float("nan")),
            "auto_graph_ms": group.get("protokernels auto", {}).get("graph_ms", float("nan"))})
    return lines


def _best_backend_cell(line) -> str:
    # Without per-backend rows (the default: auto only) there is no best backend to name.
    if line["best_backend"] == "-":
        return "-"
    return f"{line['best_backend']} {line['best_ms']:.4f}"


def _format_summary(lines) -> str:
    header = (f"{'op':<16} {'case':<26} {'mode':<8} {'naive':>8} {'compiled':>9} {'auto':>8} "
              f"{'x eager':>8} {'x comp.':>8} {'best backend':>16} {'host us auto/naive':>19} "
              f"{'GPU ms':>8}")
    out = [header, "-" * len(header)]
    for line in lines:
        out.append(
            f"{line['op']:<16} {line['case'][:26]:<26} {line['mode']:<8} "
            f"{line['naive_eager_ms']:>8.4f} {line['naive_compiled_ms']:>9.4f} "
            f"{line['auto_ms']:>8.4f} {line['speedup_vs_eager']:>7.2f}x "
            f"{line['speedup_vs_compiled']:>7.2f}x "
            f"{_best_backend_cell(line):>16} "
            f"{line['auto_host_us']:>9.0f}/{line['naive_host_us']:<9.0f} "
            f"{line['auto_graph_ms']:>8.4f}")
    return "\n".join(out)


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


def _write(rows, path_stem):
    with open(path_stem + ".json", "w") as f:
        json.dump(rows, f, indent=1, default=str)
    with open(path_stem + ".csv", "w", newline="") as f:
        fields = [k for k in dict.fromkeys(key for row in rows for key in row) if k != "sizes"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _plot_speedups(lines, path, log):
    """Bar chart of auto's speedup over the better of naive eager and compiled, per row."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no speedup plot (the rows are in the CSV)")
        return
    labels = [f"{line['op']} {line['case']} {line['mode']}" for line in lines]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(lines) + 1))
    ax.barh(range(len(lines)), [line["speedup"] for line in lines],
            color=["tab:green" if line["speedup"] >= 1 else "tab:red" for line in lines])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(lines)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup of protokernels auto over min(naive eager, naive compiled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="protokernels-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=OPS,
                        help="op to benchmark (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, also on CPU)")
    parser.add_argument("--regime", choices=("spec", "model"), default="spec",
                        help="spec: the large reference sizes; model: the grid of sizes used "
                             "inside models (prototype heads, VQ, SwAV, small images)")
    parser.add_argument("--host", action="store_true",
                        help="also measure host microseconds per call and the forward's GPU time "
                             "(CUDA-graph replay)")
    parser.add_argument("--backend", action="append",
                        choices=protokernels._backend.BACKENDS + ("auto",),
                        help="runners of the fused op (repeatable; default: auto and every "
                             "available backend)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline")
    parser.add_argument("--out", default="bench_out", help="folder for results.csv/.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats on the CPU")
    parser.add_argument("--sweep", action="store_true",
                        help="run the ops' size sweeps instead and plot them (sweep_<op>.png)")
    args = parser.parse_args(argv)
    ops = args.op or OPS
    if args.sweep:
        with_sweep = [op for op in OPS if hasattr(
            importlib.import_module(f"protokernels.benchmarks.{op}"), "sweep_cases")]
        without = [op for op in ops if op not in with_sweep]
        if without:  # argparse's error: a message and exit status 2
            parser.error(f"--sweep: no size sweep for {', '.join(without)} (ops with one: "
                         f"{', '.join(with_sweep)})")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = _environment(device)
    print(f"protokernels-bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, {env['date']}")
    if device.type == "cpu":
        print("No GPU: running on the CPU, slowly; roofline fractions refer to an H100 and mean "
              "little here." + ("" if args.quick else " Pass --quick for small sizes."))
    print(f"{'op':<16} {'case':<8} {'mode':<8} {'implementation':<22} {'median':>9} [p20, p80]"
          f"        peak extra  roofline", flush=True)
    os.makedirs(args.out, exist_ok=True)
    common = (ops, args.quick, args.backend or ("auto",) + protokernels._backend.BACKENDS,
              not args.no_compile, device, args.repeats)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.sweep:
        rows = sweep(*common, args.out, log=log)
    else:
        rows = run(*common, log=log, regime=args.regime, host=args.host)
    rows = [{**env, **row} for row in rows]
    name = "sweep" if args.sweep else ("results" if args.regime == "spec" else "model")
    _write(rows, os.path.join(args.out, name))
    print(f"wrote {len(rows)} rows to {args.out}/{name}.csv and {name}.json")
    if not args.sweep:
        lines = summary(rows)
        print("\nSummary (median ms; speedup of protokernels auto over naive eager and naive "
              "compiled; host us per call of auto and of naive eager; auto's GPU time in a CUDA "
              "graph):")
        print(_format_summary(lines))
        _write([{**env, **line} for line in lines], os.path.join(args.out, f"{name}_summary"))
        if args.regime == "model":
            _plot_speedups(lines, os.path.join(args.out, "model_speedups.png"), log)
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
