"""The Triton kernels' kit: launching, tile helpers, operand splitting and launch-config tables,
shared by every op file in triton_kernels/ (no op file imports another's private names).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._numerics import accumulate_dtype
from ..reference._losses import REDUCTIONS  # noqa: F401  (the kernels' REDUCTION codes)

# Triton's interpreter (3.8) returns garbage from tl.dot on bfloat16 operands (float16 is right);
# there the operands go through float32 instead, which gives the same exact products.
UPCAST_BF16 = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Programs wanted per launch: a few per SM of the largest GPU (132 SMs on the H100), so that a
# small problem still spreads over the GPU.
TARGET_PROGRAMS = 4 * 132
FLOAT32_MAX = 3.4028234663852886e38


def accumulator(dtype: torch.dtype):
    """The Triton accumulate type of `dtype` inputs (protokernels/_numerics.py)."""
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


# -- launching ---------------------------------------------------------------------------------

class _Launcher:
    """Launches one @triton.jit kernel, skipping the JIT's per-call work after the first call.

    `kernel[grid](...)` re-derives the kernel's specialization from every argument on every call
    (binding, alignment and divisibility checks, cache key): 101 us of host time per launch of a
    3-argument kernel on the H100 machine with triton 3.6, against 20 us for launching the compiled
    kernel directly (scripts/probe_host_cost.py; RESULTS.md "Host cost per call"). Here the first
    call of each specialization goes through the JIT, which compiles and launches; the compiled
    kernel is kept under a key that determines the JIT's specialization (every int argument's
    value, every tensor's dtype and 16-byte alignment, the constexprs, the grid, the device), and
    later calls with the same key launch it directly.
    """

    _LIMIT = 4096  # entries per kernel; a workload of ever-new shapes starts over

    def __init__(self, kernel, options: dict):
        self.kernel = kernel
        self.options = options
        self.names = kernel.arg_names
        self.compiled: dict = {}

    def __call__(self, grid, *args, **constexprs):
        if INTERPRETING:
            self.kernel[grid](*args, **constexprs, **self.options)
            return
        # A flat key, built with as little Python per argument as possible (~40 arguments for the
        # search kernel): tensors by dtype and address mod 16, floats by type (the JIT does not
        # specialize on their values), everything else by value.
        key = [grid, _current_device()]
        append = key.append
        for a in args:
            if isinstance(a, torch.Tensor):
                append(a.dtype)
                append(a.data_ptr() & 15)
            elif type(a) is float:
                append(float)
            else:
                append(a)
        key.extend(constexprs.values())
        key = tuple(key)
        entry = self.compiled.get(key)
        if entry is not None:
            run, tail = entry
            run(*args, *tail)
            return
        if any(isinstance(v, torch.Tensor) for v in constexprs.values()):
            raise TypeError(f"{self.kernel.__name__}: pass tensors positionally (the launcher "
                            "keys keyword arguments by value)")
        compiled = self.kernel[grid](*args, **constexprs, **self.options)
        if hasattr(compiled, "result"):  # triton's asynchronous compile mode
            compiled = compiled.result()
        if len(self.compiled) >= self._LIMIT:
            self.compiled.clear()
        # The compiled kernel takes every parameter positionally, constexprs included (what the
        # JIT passes it); launch options (num_warps, num_stages) are not parameters.
        tail = tuple(constexprs[name] for name in self.names[len(args):])
        self.compiled[key] = (compiled[grid if len(grid) == 3 else (*grid, 1, 1)[:3]], tail)


_current_device = torch._C._cuda_getDevice if torch.cuda.is_available() else (lambda: 0)


def launcher(kernel, **options) -> _Launcher:
    """A direct launcher for `kernel`: `launcher(k)(grid, *args, **constexprs_and_options)`;
    `options` are compile options of every launch (see SUMS_OF_SQUARES)."""
    return _Launcher(kernel, options)


# For kernels that reduce sums of squares (tl.sum(v * v)): without FMA contraction. With it, the
# butterfly of the reduction fuses a lane's own product into its first add (fma(v, v, shuffled))
# while its partner adds the rounded product, so the lanes holding one row's sum disagree in the
# last bit; all of them then write that sum to one shared-memory word (the layout conversion
# before the epilogue) and which one wins is undefined. compute-sanitizer's racecheck reported
# these writes on the H100 (sqdist, nearest; 2026-11-26, RESULTS.md "GPU checks").
SUMS_OF_SQUARES = dict(enable_fp_fusion=False)


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# -- host-side integers ------------------------------------------------------------------------
# In plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions whose host calls
# cost ~5.5 us each (measured), ten of them per nearest call.

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def block(extent: int, largest: int) -> int:
    """Power-of-two block for `extent`, at least 16 (tl.dot's minimum) and at most `largest`."""
    return max(16, min(largest, next_power_of_2(extent)))


def fitted_config(table: dict, dtype: torch.dtype, precision: str, **extents: int) -> dict:
    """table's launch config for dtype (its "tf32x3" entry for split float32), with each block
    named in `extents` (e.g. BLOCK_N=n) shrunk to fit its extent in small problems."""
    split = dtype == torch.float32 and precision == "tf32x3"
    config = dict(table["tf32x3" if split else dtype])
    for name, extent in extents.items():
        config[name] = block(extent, config[name])
    return config


# -- device helpers ----------------------------------------------------------------------------

@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    if UPCAST_BF16 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    # input_precision only applies to float32 operands; half types and float64 have one mode.
    # out_dtype: float64 products must accumulate in float64 (the default is float32).
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def tile_coordinates(pid, tiles_0, tiles_1, GROUP: tl.constexpr):
    """Batch and 2-D tile of program `pid`, GROUP row tiles at a time so that neighbouring
    programs share their column tiles in L2."""
    per_batch = tiles_0 * tiles_1
    batch = pid // per_batch
    t = pid % per_batch
    per_group = GROUP * tiles_1
    first = (t // per_group) * GROUP
    group_rows = tl.minimum(tiles_0 - first, GROUP)
    return batch.to(tl.int64), first + (t % per_group) % group_rows, (t % per_group) // group_rows


# -- operands ----------------------------------------------------------------------------------

def per_distinct_element(function, t: torch.Tensor):
    """Apply an elementwise `function` (tensor -> tensors) once per distinct element of t: a
    broadcast (stride-0) dimension stays broadcast instead of being materialized, which for x (N, D)
    against y (B, M, D) would cost B copies of x."""
    distinct = t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]
    return tuple(part.expand(t.shape) for part in function(distinct))


def _split_tf32(t: torch.Tensor):
    """t = hi + lo exactly, hi with TF32's 10 mantissa bits (truncated), lo the remainder."""
    def split(u):
        hi = (u.view(torch.int32) & -8192).view(torch.float32)
        return hi, u - hi
    return per_distinct_element(split, t)


def split_operands(x: torch.Tensor, y: torch.Tensor, precision: str):
    """(split, kernel precision, (x, x_lo), (y, y_lo)): for float32 "tf32x3" the operands are
    split once here into TF32 hi/lo parts and the kernel runs three "tf32" products; otherwise
    x_lo, y_lo are unused stand-ins. Splitting per tile in the kernel (Triton's own tf32x3) writes
    B's low part back to shared memory: 0.81 ms against 0.58 for sqdist at the spec size."""
    if precision == "tf32x3" and x.dtype == torch.float32:
        return True, "tf32", _split_tf32(x), _split_tf32(y)
    return False, precision, (x, x), (y, y)


def float32_pair(value: float) -> tuple[float, float]:
    """value = hi + lo with hi and lo float32 (to ~2^-48 relative): Triton passes a Python float
    as a float32 argument, and a float64 kernel rebuilds the value from the pair."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, value - hi


# -- losses: a deterministic sum over programs ---------------------------------------------------

BLOCK_PARTIALS = 1024


def loss_outputs(like: torch.Tensor, derivative_shape, rows: int, programs: int,
                 reduction: str):
    """The outputs of a loss kernel over `rows` samples in `programs` programs that ends in
    `finish_sum`, in the accumulate dtype of `like`: (each sample's derivatives of
    `derivative_shape`, the loss ((rows,) for "none", else 0-d), the scale (1 for "none";
    finish_sum writes it otherwise), a partial sum per program, and the int32 ticket then a count
    per program, zeroed; for "none" the last two are unused stand-ins)."""
    derivatives = torch.empty(derivative_shape, dtype=accumulate_dtype(like.dtype),
                              device=like.device)
    if reduction == "none":
        return derivatives, derivatives.new_empty((rows,)), derivatives.new_ones(()), like, like
    return (derivatives, derivatives.new_empty(()), derivatives.new_empty(()),
            derivatives.new_empty((programs,)),
            torch.zeros(programs + 1, dtype=torch.int32, device=like.device))


@triton.jit
def finish_sum(total, count, LOSS, SCALE, PARTIAL, TICKETS, MEAN: tl.constexpr,
               BLOCK_PARTIALS: tl.constexpr):
    """The loss of a kernel whose program holds `total` (its samples' values) and `count` (how many
    count): LOSS = the sum, or the mean over the counted samples for MEAN (0 when none count), and
    SCALE = what the backward multiplies the per-sample derivatives by (1 or 1 / count). Each
    program writes its partials; the one that arrives last (an acq_rel ticket: the partials are
    visible before it) adds them in program order, so the sum is the same every run."""
    pid = tl.program_id(0)
    tl.store(PARTIAL + pid, total)
    tl.store(TICKETS + 1 + pid, count)
    programs = tl.num_programs(0)
    if tl.atomic_add(TICKETS, 1) == programs - 1:
        sums = tl.zeros((BLOCK_PARTIALS,), PARTIAL.dtype.element_ty)
        counts = tl.zeros((BLOCK_PARTIALS,), tl.int64)
        for p0 in range(0, programs, BLOCK_PARTIALS):
            p = p0 + tl.arange(0, BLOCK_PARTIALS)
            sums += tl.load(PARTIAL + p, mask=p < programs, other=0.0, volatile=True)
            counts += tl.load(TICKETS + 1 + p, mask=p < programs, other=0, volatile=True)
        counted = tl.sum(counts, 0)
        sum_all = tl.sum(sums, 0)
        scale = (counted * 0 + 1).to(sum_all.dtype)
        if MEAN:
            scale = scale / tl.maximum(counted, 1).to(sum_all.dtype)
        tl.store(LOSS, sum_all * scale)
        tl.store(SCALE, scale)

