// sinkhorn in CUDA: the two sweeps of the log-domain iteration (see reference/sinkhorn.py).
//
// Column log-sum: a thread per column streams a range of rows with an online (max, sum), so the
// loads of a warp are one row's consecutive columns; the ranges' partials are combined in order
// by the finish kernel. Row sweep: a block per row at a time (blocks stride over rows); pass 1
// takes the row's log-sum-exp (per-thread online (max, sum), then a block reduction), pass 2
// re-reads the row (from L1/L2) and folds each column's log-term into the block's own row of
// partial column log-sums. No atomics: every result is the same each run.
//
// sinkhorn_iterate_cuda runs all the sweeps of a call in one cooperative launch where the
// columns fit (below, "the whole iteration"), and these sweeps one by one from C++ otherwise.
#include <cooperative_groups.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "async_copy.cuh"
#include "common.h"

namespace protokernels {
namespace {

constexpr int kSweepThreads = 512;

template <typename A>
struct LogSum {
  A top, mass;  // sum of exp(z) = mass * exp(top)
};

// scale * s clamped to +-kScoreLimit (SCORE_LIMIT in protokernels/_numerics.py), NaN kept: an
// infinite score acts as an overwhelming finite one instead of making inf - inf = NaN.
constexpr double kScoreLimit = 1e30;
constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;

// 2^x, results below 2^-126 flushed to zero: one MUFU.EX2 (exp2f adds ~3 instructions for
// subnormal results). The persistent kernel's terms are relative to a row's or column's maximum;
// one this small is far below float32's resolution of the sums it joins, and a column made only
// of such terms is redone exactly anyway (underflow_logsum).
__device__ __forceinline__ float exp2_flushed(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double exp2_flushed(double x) { return exp2(x); }

template <typename A>
__device__ __forceinline__ A scaled(A s, A scale) {
  const A z = s * scale;
  return z > A(kScoreLimit) ? A(kScoreLimit) : (z < A(-kScoreLimit) ? A(-kScoreLimit) : z);
}
// The same in float32 on the NaN-keeping max and min (sm_80): 2 instructions where the
// comparisons take 3, once per element of every sweep.
__device__ __forceinline__ float scaled(float s, float scale) {
  float z = s * scale, low;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(low) : "f"(z), "f"(-float(kScoreLimit)));
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(z) : "f"(low), "f"(float(kScoreLimit)));
  return z;
}

template <typename A>
__device__ __forceinline__ LogSum<A> add_term(LogSum<A> acc, A z) {
  if (z == -INFINITY) return acc;
  if (z > acc.top) return {z, acc.mass * exp(acc.top - z) + A(1)};
  return {acc.top, acc.mass + exp(z - acc.top)};  // NaN z lands here and makes mass NaN
}

template <typename A>
__device__ __forceinline__ LogSum<A> combine(LogSum<A> a, LogSum<A> b) {
  const A top = a.top > b.top ? a.top : b.top;
  if (top == -INFINITY) return {top, A(0)};
  return {top, a.mass * exp(a.top - top) + b.mass * exp(b.top - top)};
}

// The block's combined (max, sum); every thread gets it.
template <typename A>
__device__ LogSum<A> block_logsum(LogSum<A> value) {
  __shared__ A tops[kSweepThreads / 32], masses[kSweepThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    value = combine(value, LogSum<A>{__shfl_xor_sync(0xffffffffu, value.top, offset),
                                     __shfl_xor_sync(0xffffffffu, value.mass, offset)});
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous row's readers are done with tops/masses
  if (lane == 0) {
    tops[warp] = value.top;
    masses[warp] = value.mass;
  }
  __syncthreads();
  LogSum<A> total{tops[0], masses[0]};
  for (int w = 1; w < kSweepThreads / 32; ++w) total = combine(total, LogSum<A>{tops[w], masses[w]});
  return total;
}

template <typename T, typename A>
__global__ void column_logsum_kernel(const T* __restrict__ s, int64_t ss_b, int64_t ss_k,
                                     int64_t rows, int64_t cols, int64_t rows_per_part, A scale,
                                     A* __restrict__ part_top, A* __restrict__ part_mass) {
  const int64_t j = blockIdx.y * int64_t{blockDim.x} + threadIdx.x;
  if (j >= cols) return;
  const int64_t start = blockIdx.x * rows_per_part;
  const int64_t stop = start + rows_per_part < rows ? start + rows_per_part : rows;
  LogSum<A> acc{A(-INFINITY), A(0)};
  for (int64_t i = start; i < stop; ++i)
    acc = add_term(acc, scaled(widen(s[i * ss_b + j * ss_k]), scale));
  part_top[blockIdx.x * cols + j] = acc.top;
  part_mass[blockIdx.x * cols + j] = acc.mass;
}

// l = log of the parts' column sums (part_top given: parts are (max, sum) log-sums), in part
// order; v_next = v + log c - l when asked (a zero-mass column keeps v = -inf).
template <typename A>
__global__ void finish_kernel(const A* __restrict__ part_mass, const A* __restrict__ part_top,
                              int64_t parts, int64_t cols, const A* __restrict__ v,
                              const A* __restrict__ log_c, A log_c_const, A* __restrict__ l,
                              A* __restrict__ v_next) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= cols) return;
  LogSum<A> total{A(0), A(0)};
  if (part_top != nullptr) {
    total.top = A(-INFINITY);
    for (int64_t p = 0; p < parts; ++p)
      total = combine(total, LogSum<A>{part_top[p * cols + j], part_mass[p * cols + j]});
  } else {
    for (int64_t p = 0; p < parts; ++p) total.mass += part_mass[p * cols + j];
  }
  const A logsum = total.top + log(total.mass);
  l[j] = logsum;
  if (v_next != nullptr) {
    const A lc = log_c != nullptr ? log_c[j] : log_c_const;
    v_next[j] = lc == A(-INFINITY) ? lc : (v != nullptr ? v[j] : A(0)) + lc - logsum;
  }
}

// Row sweep: the block's online log-sums per column (own_top, own_mass) of the plan's log-entries
// scale s + u + v. Log-sums, not sums: a column can get all its mass from rows where it is e^-200
// below the row's best (a zero-mass row elsewhere, a tiny eps), which a float sum would drop.
template <typename T, typename A>
__global__ void __launch_bounds__(kSweepThreads)
row_sweep_kernel(const T* __restrict__ s, int64_t ss_b, int64_t ss_k, int64_t rows, int64_t cols,
                 A scale, const A* __restrict__ v, const A* __restrict__ log_r, A log_r_const,
                 A* __restrict__ u_out, T* __restrict__ plan, int64_t sp_b, int64_t sp_k,
                 A* __restrict__ part_top, A* __restrict__ part_mass) {
  // This block's row of the partials: only its threads touch it.
  A* own_top = part_top + blockIdx.x * cols;
  A* own_mass = part_mass + blockIdx.x * cols;
  for (int64_t j = threadIdx.x; j < cols; j += kSweepThreads) {
    own_top[j] = A(-INFINITY);
    own_mass[j] = A(0);
  }
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const T* row = s + i * ss_b;
    LogSum<A> acc{A(-INFINITY), A(0)};
    for (int64_t j = threadIdx.x; j < cols; j += kSweepThreads)
      acc = add_term(acc, scaled(widen(row[j * ss_k]), scale) + v[j]);
    const LogSum<A> lse = block_logsum(acc);
    const A lr = log_r != nullptr ? log_r[i] : log_r_const;
    const A u = lr - lse.top - log(lse.mass);
    if (u_out != nullptr && threadIdx.x == 0) u_out[i] = u;
    for (int64_t j = threadIdx.x; j < cols; j += kSweepThreads) {
      const A t = scaled(widen(row[j * ss_k]), scale) + v[j] + u;
      const LogSum<A> column = add_term(LogSum<A>{own_top[j], own_mass[j]}, t);
      own_top[j] = column.top;
      own_mass[j] = column.mass;
      if (plan != nullptr) plan[i * sp_b + j * sp_k] = narrow<T>(exp(t));
    }
  }
}

// -- the whole iteration in one cooperative launch ------------------------------------------
//
// At SwAV's sizes (B <= 4096, K = 3000) a sweep is 3-49 MB, a few microseconds of HBM time, and
// launching the sweeps one by one (two kernels each, eight for three iterations) costs more
// host time than the GPU needs (RESULTS.md, "In-model sizes": sinkhorn B256 K3000 took 0.26 ms
// eager for 0.04 ms of GPU time). Here the whole iteration is one persistent kernel: every block
// owns a range of rows and every column of them; the blocks' partial column sums meet through
// global memory between two grid barriers per sweep.
//
// A block's threads form G groups; a group takes one of the block's rows at a time (group g rows
// g, g + G, ...), each of its threads C columns of it (16, or 24 for SwAV's K = 3000), and keeps
// those columns' running sums in registers. A row's maximum and sum are reduced
// over the group only (warp shuffles, then a named barrier of the group's warps), so the per-row
// cost of the reductions is spread over 16-24 elements a thread and the groups never wait for
// each other inside a sweep. (The previous layout, 512 threads a row at 6 columns each with two
// block barriers per step of 2 rows, issued ~45 instructions per element and was bound by them:
// ncu on the H200, B4096 K3000, 144 us at 0.50 instructions per scheduler per cycle, DRAM 33 %
// busy; RESULTS.md.) At the end of a sweep group 0 gathers the other groups' sums in group order.
// The row steps' column potentials sit in shared memory, read a run of them at a time.
//
// The scores reach a group through a ring of shared-memory stages, a row each, filled by
// cp.async (stages - 1) rows ahead: the loads stay in flight across the reductions' barriers and
// the grid barriers between sweeps. A thread copies and reads back only its own columns, so the
// ring needs no barrier of its own. Where all of a group's rows fit in its ring (B up to ~2100
// at K = 3000 on 132 SMs) they stay there: the scores are read from HBM once per call. Otherwise
// every other sweep walks the rows backwards, so that it starts on the rows the last one read,
// which the L2 still holds.
//
// One exp per element: a row step takes the row's maximum, then e = exp(z - max) and its sum S,
// and adds e * r / S (the plan's entry) to the column's linear sum. Plan entries are at most r,
// so the sums never overflow; a column whose every entry underflows (all its mass from rows
// where it is e^-100 below the row's best: a zero-mass row elsewhere, a tiny eps) comes out
// below exp(-69), and its log-sum is then taken again, exactly, from the row potentials
// (the rule of the Triton sweeps, triton_kernels/sinkhorn.py). The first sweep (the column
// log-sums of a s, which do overflow) keeps an online (maximum, sum) per column.
constexpr int kPersistentThreads = 512;
constexpr int kPersistentWarps = kPersistentThreads / 32;
constexpr int kColumnsPerChunk = 32;  // columns a block combines at a time in the reduction
constexpr int kPartBatch = 16;        // partial sums a thread of the reduction loads at once

// The launch shape of C columns a thread in G groups of rows, for scores of T.
template <typename T, typename A, int C, int G>
struct Persistent {
  static constexpr int kGroupThreads = kPersistentThreads / G;
  static constexpr int kColumns = C * kGroupThreads;  // the most columns it takes
  // A thread's columns come in runs of kVector adjacent ones (one copy of up to 16 bytes each:
  // the largest power of two dividing C), the runs kRunStride apart: a warp's copy covers 32
  // runs side by side.
  static constexpr int kVector = (C & -C) < 16 / int(sizeof(T)) ? (C & -C) : 16 / int(sizeof(T));
  static constexpr int kRunStride = kVector * kGroupThreads;
  static constexpr int kStageBytes = kColumns * int(sizeof(T));  // a stage holds a row
  // Stages: as many as the device's shared memory per block holds (4 a group for SwAV's K = 3000
  // on the H100's 227 KB, 2 on the A100's 163), at most kMaxStages (wait_async's count is 0-7);
  // at least 2, one in flight beside the one in use, or the sweeps run one by one.
  static constexpr int kMaxStages = 8;
  // Beside the ring, a value a column: the row steps' column potentials; with more than one
  // group also a group's column state on its way to group 0 (two values a column, the first
  // sweep's in both halves).
  static constexpr int kColumnStateBytes = (G > 1 ? 2 : 1) * kColumns * int(sizeof(A));

  static __device__ __forceinline__ int group() { return int(threadIdx.x) / kGroupThreads; }
  static __device__ __forceinline__ int lane() { return int(threadIdx.x) % kGroupThreads; }
  // Position of the thread's column c in a row (and in a stage).
  static __device__ __forceinline__ int column(int c) {
    return (c / kVector) * kRunStride + lane() * kVector + c % kVector;
  }
  // Whether rows of this layout can be copied kVector elements at a time.
  static bool vectorizable(const void* data, int64_t row_stride, int64_t col_stride,
                           int64_t cols) {
    constexpr int bytes = kVector * int(sizeof(T));
    return bytes >= 4 && col_stride == 1 && row_stride % kVector == 0 &&
           cols % kVector == 0 && reinterpret_cast<uintptr_t>(data) % bytes == 0;
  }
};

template <typename T, int W>
struct alignas(W * sizeof(T)) Run {
  T v[W];
};

template <typename T, typename A>
struct IterationArgs {
  const T* s;
  int64_t ss_b, ss_k, rows, cols, rows_per_block;
  A scale;
  int n_iters;
  const A* log_r;
  A log_r_const;
  const A* log_c;
  A log_c_const;
  T* plan;
  int64_t sp_b, sp_k;
  A* l_out;
  A* u_history;  // (n_iters, rows) or null
  A* v_history;  // (n_iters, cols) or null
  A* v;          // (cols,): the current column potentials
  A* u;          // (rows,): the current row potentials (for the exact fallback)
  A* part_top;   // (blocks, cols): each block's partial column log-sums (first sweep)
  A* part_mass;  // (blocks, cols): and sums
  int stages;    // of a group's ring (Persistent)
  bool vector_scores, vector_plan;  // Persistent::vectorizable
};

// Below this a column's linear sum may have lost every term (exp(-69) in float32, exp(-690) in
// float64, as in the Triton finish kernel).
template <typename A>
__device__ __forceinline__ A underflow_logsum() { return sizeof(A) == 4 ? A(-69) : A(-690); }

// The barrier of the calling thread's group of THREADS (named barrier 1 + group; 0 is
// __syncthreads').
template <int THREADS>
__device__ __forceinline__ void group_barrier() {
  if constexpr (THREADS == kPersistentThreads) {
    __syncthreads();
  } else if constexpr (THREADS > 32) {
    asm volatile("bar.sync %0, %1;" ::"r"(1 + int(threadIdx.x) / THREADS), "n"(THREADS)
                 : "memory");
  }
}

// The maximum (MAX) or the sum of a value over the calling thread's group of THREADS; every
// thread gets the same bits (xor butterflies: a + b == b + a). One group barrier per call; the
// two kinds use different shared arrays, so a fast thread's next write never meets a slow
// thread's read.
template <typename A, int THREADS, bool MAX>
__device__ __forceinline__ A group_reduce(A x) {
  auto butterfly = [](A value, int from) {
    for (int offset = from; offset > 0; offset /= 2) {
      const A other = __shfl_xor_sync(0xffffffffu, value, offset);
      value = MAX ? (other > value ? other : value) : value + other;
    }
    return value;
  };
  x = butterfly(x, 16);
  if constexpr (THREADS > 32) {
    constexpr int kWarps = THREADS / 32;
    __shared__ A warp_values[kPersistentWarps];
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    if (lane == 0) warp_values[warp] = x;
    group_barrier<THREADS>();
    x = butterfly(warp_values[warp / kWarps * kWarps + lane % kWarps], kWarps / 2);
  }
  return x;
}

// A row's values a thread holds are folded in kChains chains (C is a multiple of it).
constexpr int kChains = 4;
template <typename A>
__device__ __forceinline__ A chains_max(const A (&x)[kChains]) {
  return fmax(fmax(x[0], x[1]), fmax(x[2], x[3]));
}
template <typename A>
__device__ __forceinline__ A chains_sum(const A (&x)[kChains]) {
  return (x[0] + x[1]) + (x[2] + x[3]);
}

// Group 0 gathers the other groups' values of its columns (their maximum, MAX, or their sum, in
// group order: the same result every run), two groups at a time through the two halves of
// `staging`. The first barrier also waits for every group's rows: the second half holds the row
// steps' potentials.
template <typename T, typename A, int C, int G, bool MAX>
__device__ __forceinline__ void gather_groups(A (&x)[C], A* staging) {
  using Shape = Persistent<T, A, C, G>;
  constexpr int kGroupThreads = Shape::kGroupThreads;
  const int group = Shape::group(), lane = Shape::lane();
  for (int first = 1; first < G; first += 2) {
    __syncthreads();  // the halves' previous readers are done
    if (group == first || group == first + 1) {
      A* half = staging + (group - first) * Shape::kColumns;
#pragma unroll
      for (int c = 0; c < C; ++c) half[c * kGroupThreads + lane] = x[c];
    }
    __syncthreads();
    if (group == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (first + half >= G) break;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const A other = staging[half * Shape::kColumns + c * kGroupThreads + lane];
          x[c] = MAX ? fmax(x[c], other) : x[c] + other;
        }
      }
    }
  }
}

// The first sweep's column log-sums (base 2: sum = mass * 2^top) of the groups, to group 0: the
// columns' maxima first, then every group's sums rescaled to them at once, then summed: the
// exponentials spread over every group, one a column, on the gathers of the sums. (Combining
// the pairs group by group in group 0, two exponentials a column, measured the same: 2.9 us a
// call at K 3000 on the H200, RESULTS.md.)
template <typename T, typename A, int C, int G>
__device__ __forceinline__ void gather_logsums(A (&top)[C], A (&mass)[C], A* staging) {
  using Shape = Persistent<T, A, C, G>;
  if constexpr (G > 1) {
    constexpr int kGroupThreads = Shape::kGroupThreads;
    const int lane = Shape::lane();
    A high[C];
#pragma unroll
    for (int c = 0; c < C; ++c) high[c] = top[c];
    gather_groups<T, A, C, G, true>(high, staging);
    if (Shape::group() == 0) {
#pragma unroll
      for (int c = 0; c < C; ++c) staging[c * kGroupThreads + lane] = high[c];
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const A column_top = staging[c * kGroupThreads + lane];
      // An empty column (top -inf everywhere) keeps mass 0; an empty group's mass is 0 anyway.
      mass[c] *= exp2_flushed(top[c] - (column_top == A(-INFINITY) ? A(0) : column_top));
      top[c] = column_top;
    }
    gather_groups<T, A, C, G, false>(mass, staging);
  }
}

// A column's log-sum from the 16 groups' partial (max, sum) pairs in shared memory: their
// maximum, then the sums rescaled to it (independent exponentials, where combining the pairs
// one by one chained them).
template <typename A>
__device__ __forceinline__ A groups_logsum(const A (*tops)[kColumnsPerChunk],
                                           const A (*masses)[kColumnsPerChunk], int lane) {
  A high = tops[0][lane];
  for (int g = 1; g < kPersistentWarps; ++g) high = fmax(high, tops[g][lane]);
  if (high == A(-INFINITY)) return high;
  A sum = A(0);
  for (int g = 0; g < kPersistentWarps; ++g) sum += masses[g][lane] * exp(tops[g][lane] - high);
  return high + log(sum);
}

// After a sweep's partials are written (and a grid barrier): the column log-sums l, combined
// over the parts in a fixed order (a row step's underflowed columns redone exactly); then
// v <- v + log c - l (first sweep: v = log c - l), or, after the last sweep, l_out <- l.
// The first sweep's parts are (max, sum) log-sums; a row step's are linear sums (top 0).
template <typename T, typename A>
__device__ void reduce_columns(const IterationArgs<T, A>& p, int64_t parts, int sweep,
                               bool last) {
  __shared__ A tops[kPersistentWarps][kColumnsPerChunk], masses[kPersistentWarps][kColumnsPerChunk];
  __shared__ A logsums[kColumnsPerChunk];
  const int group = threadIdx.x / kColumnsPerChunk, lane = threadIdx.x % kColumnsPerChunk;
  const int64_t chunks = (p.cols + kColumnsPerChunk - 1) / kColumnsPerChunk;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int64_t j = chunk * kColumnsPerChunk + lane;
    const bool real = j < p.cols;
    const A v_j = real && sweep > 0 ? p.v[j] : A(0);
    LogSum<A> total{sweep > 0 ? A(0) : A(-INFINITY), A(0)};
    // The parts' loads in batches of kBatch a thread, each batch in flight at once: one
    // round trip to L2 for up to 16 * kBatch parts (132 on an H100, a block per SM; in float64
    // half as many, for registers).
    constexpr int kBatch = kPartBatch * 4 / int(sizeof(A));
    for (int64_t part0 = group; real && part0 < parts; part0 += kPersistentWarps * kBatch) {
      A batch_mass[kBatch], batch_top[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t part = part0 + int64_t{b} * kPersistentWarps;
        batch_mass[b] = part < parts ? p.part_mass[part * p.cols + j] : A(0);
        if (sweep == 0) batch_top[b] = part < parts ? p.part_top[part * p.cols + j] : A(-INFINITY);
      }
      if (sweep > 0) {
#pragma unroll
        for (int b = 0; b < kBatch; ++b) total.mass += batch_mass[b];
      } else {  // the batch's maximum, then its sums rescaled to it
        A high = total.top;
#pragma unroll
        for (int b = 0; b < kBatch; ++b) high = fmax(high, batch_top[b]);
        if (high != A(-INFINITY)) {
          A sum = total.mass * exp(total.top - high);
#pragma unroll
          for (int b = 0; b < kBatch; ++b) sum += batch_mass[b] * exp(batch_top[b] - high);
          total = {high, sum};
        }
      }
    }
    tops[group][lane] = total.top;
    masses[group][lane] = total.mass;
    __syncthreads();
    if (group == 0 && sweep > 0) {  // linear sums: no exponentials
      A sum = total.mass;
      for (int g = 1; g < kPersistentWarps; ++g) sum += masses[g][lane];
      logsums[lane] = log(sum);
    } else if (group == 0) {
      logsums[lane] = groups_logsum(tops, masses, lane);
    }
    __syncthreads();
    A logsum = logsums[lane];
    // logsum < limit is false for NaN: a NaN column stays NaN.
    if (sweep > 0 && real && logsum < underflow_logsum<A>()) {
      // Exactly, from the row potentials: the column's online log-sum, rows split over groups.
      LogSum<A> exact{A(-INFINITY), A(0)};
      for (int64_t i = group; i < p.rows; i += kPersistentWarps)
        exact = add_term(exact, scaled(widen(p.s[i * p.ss_b + j * p.ss_k]), p.scale) + v_j + p.u[i]);
      tops[group][lane] = exact.top;
      masses[group][lane] = exact.mass;
    }
    __syncthreads();
    if (group == 0 && real) {
      if (sweep > 0 && logsum < underflow_logsum<A>())
        logsum = groups_logsum(tops, masses, lane);
      if (last) {
        p.l_out[j] = logsum;
      } else {
        const A lc = p.log_c != nullptr ? p.log_c[j] : p.log_c_const;
        const A v = lc == A(-INFINITY) ? lc : v_j + lc - logsum;
        p.v[j] = v;
        if (p.v_history != nullptr) p.v_history[sweep * p.cols + j] = v;
      }
    }
    __syncthreads();  // the shared arrays are rewritten by the next chunk
  }
}

// Copies the thread's columns of row i into a stage: asynchronously where the rows allow whole
// runs, element by element otherwise. `runs`: how many of the thread's runs start inside the
// row. (The address math is a few adds a copy: an earlier version worked out every copy's
// 64-bit address and branches, ~25 instructions per element, 40 % of the kernel's.)
template <typename T, typename A, int C, int G>
__device__ __forceinline__ void load_row(const IterationArgs<T, A>& p, T* stage, int64_t i,
                                         int runs) {
  using Shape = Persistent<T, A, C, G>;
  constexpr int W = Shape::kVector, kRunStride = Shape::kRunStride;
  const int first_column = Shape::column(0);
  stage += first_column;
  if constexpr (W * sizeof(T) >= 4) {
    if (p.vector_scores) {
      const T* row = p.s + i * p.ss_b + first_column;
#pragma unroll
      for (int run = 0; run < C / W; ++run)
        if (run < runs)
          copy_async<W * sizeof(T)>(stage + run * kRunStride, row + run * kRunStride,
                                    W * sizeof(T));
      return;
    }
  }
  const T* row = p.s + i * p.ss_b;
#pragma unroll
  for (int run = 0; run < C / W; ++run) {
    const int j = first_column + run * kRunStride;
#pragma unroll
    for (int w = 0; w < W; ++w)
      if (run < runs)  // a run's columns past the row read as 0 (see iteration_kernel)
        stage[run * kRunStride + w] = j + w < p.cols ? row[(j + w) * p.ss_k] : narrow<T>(A(0));
  }
}

// Writes the thread's columns of plan row i.
template <typename T, typename A, int C, int G>
__device__ __forceinline__ void store_plan_row(const IterationArgs<T, A>& p, const A (&entry)[C],
                                               int64_t i) {
  using Shape = Persistent<T, A, C, G>;
  constexpr int W = Shape::kVector;
  T* row = p.plan + i * p.sp_b;
#pragma unroll
  for (int c = 0; c < C; c += W) {
    const int j = Shape::column(c);
    if (j >= p.cols) continue;
    if (p.vector_plan) {
      Run<T, W> run;
#pragma unroll
      for (int w = 0; w < W; ++w) run.v[w] = narrow<T>(entry[c + w]);
      *reinterpret_cast<Run<T, W>*>(row + j) = run;
    } else {
#pragma unroll
      for (int w = 0; w < W; ++w)
        if (j + w < p.cols) row[(j + w) * p.sp_k] = narrow<T>(entry[c + w]);
    }
  }
}

// Sweep 0: the column log-sums of scale s. Sweep t = 1..n_iters: row step t - 1 with the column
// potentials v (its row potentials to u_history), the column log-sums of its plan; the last one
// writes the plan.
template <typename T, typename A, int C, int G>
// One block per SM at up to 128 registers, none spilled in float32 (float64 spills 100-300
// bytes): with two blocks (64 registers, spilling up to 170 bytes) B4096 K3000 took 194 us
// against 159 (H200, RESULTS.md).
__global__ void __launch_bounds__(kPersistentThreads, 1)
iteration_kernel(const IterationArgs<T, A> p) {
  using Shape = Persistent<T, A, C, G>;
  static_assert(C % kChains == 0, "a thread's columns fold in kChains chains");
  constexpr int W = Shape::kVector, kGroupThreads = Shape::kGroupThreads;
  constexpr int kStageElements = Shape::kColumns;
  const int S = p.stages, group = Shape::group();
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* const ring = reinterpret_cast<T*>(shared_bytes) + group * S * kStageElements;
  A* const staging = reinterpret_cast<A*>(shared_bytes + G * S * Shape::kStageBytes);
  // The row steps' potentials (base 2, -inf past the columns) by position in a row: in shared
  // memory, not in registers, which are then left for the row's values (with 24 columns a
  // thread, 128 registers spilled; a run of them is one 16-byte read).
  A* const v_shared = staging + (G > 1 ? Shape::kColumns : 0);
  // The sweeps work in base 2 (z = log2 e * scale * s + ..., 2^z): 2^z is one multifunction
  // instruction where exp takes about eight; the potentials stay natural logs.
  const A scale2 = p.scale * A(kLog2e);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int64_t first = blockIdx.x * p.rows_per_block;
  const int64_t stop = first + p.rows_per_block < p.rows ? first + p.rows_per_block : p.rows;
  const int64_t parts = (p.rows + p.rows_per_block - 1) / p.rows_per_block;
  // The group's rows, a sweep's steps: first + group + G k for k < steps (a block's rows are at
  // most (rows / blocks) + 1, so the counts fit 32 bits).
  const int steps = stop - first > group ? static_cast<int>((stop - first - group + G - 1) / G) : 0;
  const int group0_steps = stop > first ? static_cast<int>((stop - first + G - 1) / G) : 0;
  auto row_of = [&](int k) { return first + group + int64_t{G} * k; };
  // Of the thread's runs of columns, how many start inside a row.
  const int runs = Shape::column(0) < p.cols
                       ? min(C / W, int((p.cols - 1 - Shape::column(0)) / Shape::kRunStride) + 1)
                       : 0;
  // The loads in order: row by row, sweep after sweep (every other one backwards), stage after
  // stage of the ring. Resident (steps <= S): the ring holds every row, loaded once.
  const bool resident = steps <= S;
  const int loads = resident ? steps : (p.n_iters + 1) * steps;
  int issued = 0, load_step = 0, load_stage = 0;
  bool load_backward = false;
  auto issue = [&]() {
    asm volatile("" ::: "memory");  // the stage's reads before (in program order) its refill
    if (issued < loads) {
      load_row<T, A, C, G>(p, ring + load_stage * kStageElements,
                           row_of(load_backward ? steps - 1 - load_step : load_step), runs);
      if (++load_step == steps) {
        load_step = 0;
        load_backward = !load_backward;
      }
      load_stage = load_stage + 1 == S ? 0 : load_stage + 1;
    }
    ++issued;
    commit_async();  // empty groups too: wait_async counts groups
  };
  // The thread's runs past the row are never loaded: zeros in every stage, so that the steps
  // read every run without a test (the row steps' potentials of those columns are -inf, which
  // keeps them out of the row sums; the first sweep's sums of them are never written).
  for (int stage = 0; stage < S; ++stage)
#pragma unroll
    for (int run = 0; run < C / W; ++run)
      if (run >= runs)
        *reinterpret_cast<Run<T, W>*>(ring + stage * kStageElements + Shape::column(0) +
                                       run * Shape::kRunStride) = Run<T, W>{};
#pragma unroll 1
  for (int load = 0; load < S - 1; ++load) issue();
  int use_stage = 0;
  // Runs consume(z, i) on each of the group's rows i, backwards if asked, z[c] = log2 e * scale
  // * s of the thread's column c (0 past the row's columns).
  auto each_row = [&](bool backward, auto&& consume) {
    for (int step = 0; step < steps; ++step) {
      issue();            // into the stage the previous row used
      wait_async(S - 1);  // this row's copies have landed
      const int k = backward ? steps - 1 - step : step;
      const T* stage = ring + (resident ? k : use_stage) * kStageElements + Shape::column(0);
      use_stage = use_stage + 1 == S ? 0 : use_stage + 1;
      A z[C];
#pragma unroll
      for (int run = 0; run < C / W; ++run) {
        const Run<T, W> values =
            *reinterpret_cast<const Run<T, W>*>(stage + run * Shape::kRunStride);
#pragma unroll
        for (int w = 0; w < W; ++w) z[run * W + w] = scaled(widen(values.v[w]), scale2);
      }
      consume(z, row_of(k));
    }
  };
  for (int sweep = 0; sweep <= p.n_iters; ++sweep) {
    const bool last = sweep == p.n_iters, backward = sweep % 2 == 1;
    A mass[C];
#pragma unroll
    for (int c = 0; c < C; ++c) mass[c] = A(0);
    if (sweep == 0) {  // the column log-sums of scale s, online (maximum, sum) in base 2
      A top[C];
#pragma unroll
      for (int c = 0; c < C; ++c) top[c] = A(-INFINITY);
      each_row(backward, [&](A (&z)[C], int64_t) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          // One 2^x an element: 2^-|z - top| scales whichever of the two is smaller. z is
          // finite or NaN (scaled), so d is +inf only while the column is empty; a NaN z makes
          // the sum NaN.
          const A d = z[c] - top[c];
          const A e = exp2_flushed(-fabs(d));
          mass[c] = d > A(0) ? mass[c] * e + A(1) : mass[c] + e;
          top[c] = fmax(top[c], z[c]);
        }
      });
      gather_logsums<T, A, C, G>(top, mass, staging);
      if (group == 0 && blockIdx.x < parts) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int j = Shape::column(c);
          if (j < p.cols) p.part_top[blockIdx.x * p.cols + j] = top[c] * A(kLn2);
        }
      }
    } else {  // row step sweep - 1, the linear column sums of its plan
      for (int j = threadIdx.x; j < Shape::kColumns; j += kPersistentThreads)
        v_shared[j] = j < p.cols ? p.v[j] * A(kLog2e) : A(-INFINITY);  // -inf: no column
      __syncthreads();
      const A* const v = v_shared + Shape::column(0);
      each_row(backward, [&](A (&z)[C], int64_t i) {
        // The thread's maximum and sum in kChains independent chains: a chain of C dependent
        // instructions a row would leave the warp waiting on each.
        A high[kChains], sum[kChains];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          if (c % W == 0) {
            const Run<A, W> potentials =
                *reinterpret_cast<const Run<A, W>*>(v + (c / W) * Shape::kRunStride);
#pragma unroll
            for (int w = 0; w < W; ++w) z[c + w] += potentials.v[w];
          }
          high[c % kChains] = c < kChains ? z[c] : fmax(high[c % kChains], z[c]);  // skips NaN
        }
        const A row_high = group_reduce<A, kGroupThreads, true>(chains_max(high));
#pragma unroll
        for (int c = 0; c < C; ++c) {
          z[c] = exp2_flushed(z[c] - row_high);  // from here on z holds e; NaN z: NaN sum
          sum[c % kChains] = c < kChains ? z[c] : sum[c % kChains] + z[c];
        }
        const A row_sum = group_reduce<A, kGroupThreads, false>(chains_sum(sum));
        const A lr = p.log_r != nullptr ? p.log_r[i] : p.log_r_const;
        const A weight = exp(lr) / row_sum;  // the plan's entry is e * r / S
        if (Shape::lane() == 0) {
          const A u = lr - row_high * A(kLn2) - log(row_sum);
          p.u[i] = u;
          if (p.u_history != nullptr) p.u_history[(sweep - 1) * p.rows + i] = u;
        }
        if (last) {
#pragma unroll
          for (int c = 0; c < C; ++c) {
            z[c] *= weight;
            mass[c] += z[c];
          }
          store_plan_row<T, A, C, G>(p, z, i);
        } else {
#pragma unroll
          for (int c = 0; c < C; ++c) mass[c] = fma(z[c], weight, mass[c]);
        }
      });
      // A row step passes its group's barrier twice (group_reduce); groups with fewer rows than
      // group 0 pass it as often. They would not wait there (the barrier is their own), but
      // compute-sanitizer's racecheck, where the groups' barrier counts differed, reported
      // hazards between accesses that the block barriers order (H200: B 2111, 5, 700 against
      // none at B 2112, 1056; RESULTS.md "The Hopper gradient").
      for (int step = steps; step < group0_steps; ++step) {
        group_barrier<kGroupThreads>();
        group_barrier<kGroupThreads>();
      }
      gather_groups<T, A, C, G, false>(mass, staging);
    }
    if (group == 0 && blockIdx.x < parts) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int j = Shape::column(c);
        if (j < p.cols) p.part_mass[blockIdx.x * p.cols + j] = mass[c];
      }
    }
    grid.sync();  // every part (and row potential) written
    reduce_columns(p, parts, sweep, last);
    if (!last) grid.sync();  // v written before the next sweep reads it
  }
}

ScalarType accumulate_type(const Tensor& scores) {
  return scores.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& scores,
                  int64_t size) {
  PK_CHECK(t.is_cuda() && t.get_device_index() == scores.get_device_index() && t.dim() == 1 &&
               t.size(0) == size && t.is_contiguous() &&
               t.scalar_type() == accumulate_type(scores),
           op, "argument '", name, "' must be a contiguous (", size,
           ",) tensor of the accumulate dtype on the scores' device");
}

void check_history(const char* op, const char* name, const Tensor& t, const Tensor& scores,
                   int64_t n_iters, int64_t size) {
  PK_CHECK(t.is_cuda() && t.get_device_index() == scores.get_device_index() && t.dim() == 2 &&
               t.size(0) == n_iters && t.size(1) == size && t.is_contiguous() &&
               t.scalar_type() == accumulate_type(scores),
           op, "argument '", name, "' must be a contiguous (", n_iters, ", ", size,
           ") tensor of the accumulate dtype on the scores' device");
}

template <typename A>
const A* optional_data(const std::optional<Tensor>& t) {
  return t ? static_cast<const A*>(t->const_data_ptr()) : nullptr;
}

template <typename A>
A* optional_mutable(const std::optional<Tensor>& t) {
  return t ? static_cast<A*>(t->mutable_data_ptr()) : nullptr;
}

// The launches of the sweeps on raw pointers: the sweep ops and the whole iteration's
// fallback (columns beyond the persistent kernel) share them.
template <typename T, typename A>
struct Sweeps {
  const Tensor& scores;  // allocations come from its device
  cudaStream_t stream;
  const T* s;
  int64_t ss_b, ss_k, rows, cols;
  A scale;

  void finish(const A* part_mass, const A* part_top, int64_t parts, const A* v, const A* log_c,
              A log_c_const, A* l_out, A* v_next) const {
    finish_kernel<A><<<blocks_for(cols), kThreads, 0, stream>>>(
        part_mass, part_top, parts, cols, v, log_c, log_c_const, l_out, v_next);
    PK_CHECK_LAUNCH();
  }

  void column_logsum(const A* log_c, A log_c_const, A* l_out, A* v_next) const {
    // Enough row ranges to fill the GPU 4 times over with the column blocks.
    const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
    int64_t parts = (4 * int64_t{sm_count(scores)} + col_blocks - 1) / col_blocks;
    parts = rows < parts ? (rows > 0 ? rows : 1) : parts;
    const int64_t rows_per_part = rows > 0 ? (rows + parts - 1) / parts : 1;
    Tensor part = torch::stable::new_empty(scores, {2, parts, cols}, accumulate_type(scores));
    A* part_top = static_cast<A*>(part.mutable_data_ptr());
    A* part_mass = part_top + parts * cols;
    column_logsum_kernel<T, A><<<dim3(parts, col_blocks), kThreads, 0, stream>>>(
        s, ss_b, ss_k, rows, cols, rows_per_part, scale, part_top, part_mass);
    PK_CHECK_LAUNCH();
    finish(part_mass, part_top, parts, nullptr, log_c, log_c_const, l_out, v_next);
  }

  void row_sweep(const A* v, const A* log_r, A log_r_const, const A* log_c, A log_c_const,
                 A* l_out, A* v_next, A* u_out, T* plan, int64_t sp_b, int64_t sp_k) const {
    const int64_t resident = 2 * int64_t{sm_count(scores)};  // 512 threads: 2 blocks per SM
    const int64_t parts = rows < resident ? (rows > 0 ? rows : 1) : resident;
    Tensor part = torch::stable::new_empty(scores, {2, parts, cols}, accumulate_type(scores));
    A* part_top = static_cast<A*>(part.mutable_data_ptr());
    A* part_mass = part_top + parts * cols;
    row_sweep_kernel<T, A><<<parts, kSweepThreads, 0, stream>>>(
        s, ss_b, ss_k, rows, cols, scale, v, log_r, log_r_const, u_out, plan, sp_b, sp_k,
        part_top, part_mass);
    PK_CHECK_LAUNCH();
    finish(part_mass, part_top, parts, v, log_c, log_c_const, l_out, v_next);
  }
};

template <typename T>
Sweeps<T, typename Accumulate<T>::type> sweeps(const Tensor& scores, double scale) {
  using A = typename Accumulate<T>::type;
  return {scores, current_stream(scores), static_cast<const T*>(scores.const_data_ptr()),
          scores.stride(0), scores.stride(1), scores.size(0), scores.size(1),
          static_cast<A>(scale)};
}

// The persistent kernel's layout: C columns a thread, G groups of rows.
template <int C, int G>
struct Layout {
  static constexpr int kColumns = C, kGroups = G;
};

// One cooperative launch of iteration_kernel<T, A, C, G> over every co-resident block. Returns
// false, launching nothing, where the device cannot run it (no cooperative launch).
template <typename T, typename A, int C, int G>
bool launch_iteration(IterationArgs<T, A> args, const Tensor& scores, cudaStream_t stream) {
  using Shape = Persistent<T, A, C, G>;
  const auto kernel = iteration_kernel<T, A, C, G>;
  // Blocks per SM (0: cannot launch cooperatively) and the rings' stages, asked once per device:
  // the queries cost more host time than the rest of the launch.
  struct Launch {
    int per_sm = 0, stages = 0, shared = 0;
  };
  const int device = scores.get_device_index();
  const Launch launch = per_device(device, [&] {
    int cooperative = 0, shared = 0;
    cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
    cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaFuncAttributes attributes{};
    cudaFuncGetAttributes(&attributes, kernel);
    const int64_t stages = (shared - static_cast<int64_t>(attributes.sharedSizeBytes) -
                            Shape::kColumnStateBytes) / (int64_t{G} * Shape::kStageBytes);
    Launch found;
    found.stages = static_cast<int>(stages < Shape::kMaxStages ? stages : Shape::kMaxStages);
    found.shared = G * found.stages * Shape::kStageBytes + Shape::kColumnStateBytes;
    if (cooperative && found.stages >= 2 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             found.shared) == cudaSuccess) {
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&found.per_sm, kernel, kPersistentThreads,
                                                    found.shared);
    }
    cudaGetLastError();  // a device that cannot run it: the sweeps run one by one
    return found;
  });
  if (launch.per_sm < 1) return false;
  const int64_t blocks = int64_t{launch.per_sm} * sm_count(scores);
  args.rows_per_block = (args.rows + blocks - 1) / blocks;
  Tensor scratch = torch::stable::new_empty(
      scores, {(2 * blocks + 1) * args.cols + args.rows}, accumulate_type(scores));
  args.v = static_cast<A*>(scratch.mutable_data_ptr());
  args.u = args.v + args.cols;
  args.part_top = args.u + args.rows;
  args.part_mass = args.part_top + blocks * args.cols;
  args.stages = launch.stages;
  args.vector_scores = Shape::vectorizable(args.s, args.ss_b, args.ss_k, args.cols);
  args.vector_plan = Shape::vectorizable(args.plan, args.sp_b, args.sp_k, args.cols);
  void* params[] = {&args};
  const cudaError_t error = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(kernel), dim3(blocks), dim3(kPersistentThreads), params,
      launch.shared, stream);
  STD_TORCH_CHECK(error == cudaSuccess, "protokernels: CUDA kernel launch failed: ",
                  cudaGetErrorString(error));
  return true;
}

// Calls f(Layout<C, G>{}) with the layout of the fewest columns C * 512 / G covering `cols`;
// false if none does (more than 8192 columns, 4096 in float64). A thread takes 16 columns (8 in
// float64: their sums and a row's scores stay in registers), and the groups shrink as the
// columns grow; up to 3072 columns a thread takes 1.5 times as many, for SwAV's K = 3000, which
// would leave 27 % of the next layout idle.
template <typename A, typename F>
bool dispatch_layout(int64_t cols, F&& f) {
  if constexpr (sizeof(A) == 4) {
    if (cols <= 512) return f(Layout<16, 16>{});
    if (cols <= 1024) return f(Layout<16, 8>{});
    if (cols <= 2048) return f(Layout<16, 4>{});
    if (cols <= 3072) return f(Layout<24, 4>{});
    if (cols <= 4096) return f(Layout<16, 2>{});
    if (cols <= 8192) return f(Layout<16, 1>{});
  } else {
    if (cols <= 256) return f(Layout<8, 16>{});
    if (cols <= 512) return f(Layout<8, 8>{});
    if (cols <= 1024) return f(Layout<8, 4>{});
    if (cols <= 2048) return f(Layout<8, 2>{});
    if (cols <= 3072) return f(Layout<12, 2>{});
    if (cols <= 4096) return f(Layout<8, 1>{});
  }
  return false;
}

void check_common(const char* op, const Tensor& scores, const std::optional<Tensor>& log_c,
                  const Tensor& l_out, const std::optional<Tensor>& v_next) {
  PK_CHECK_CUDA(op, "scores", scores);
  PK_CHECK_DIM(op, "scores", scores, 2);
  check_vector(op, "l_out", l_out, scores, scores.size(1));
  if (log_c) check_vector(op, "log_c", *log_c, scores, scores.size(1));
  if (v_next) check_vector(op, "v_next", *v_next, scores, scores.size(1));
}

void check_plan(const char* op, const Tensor& plan, const Tensor& scores) {
  PK_CHECK(plan.is_cuda() && plan.get_device_index() == scores.get_device_index() &&
               plan.dim() == 2 && plan.size(0) == scores.size(0) &&
               plan.size(1) == scores.size(1) && plan.scalar_type() == scores.scalar_type(),
           op, "argument 'plan' must be a CUDA tensor of the scores' shape and dtype");
}

}  // namespace

// l_out (K,) = logsumexp_i(scores_ij * scale); v_next (optional) = log c - l_out.
void sinkhorn_column_logsum_cuda(Tensor scores, double scale, std::optional<Tensor> log_c,
                                 double log_c_const, Tensor l_out, std::optional<Tensor> v_next) {
  const char* op = "sinkhorn_column_logsum_cuda";
  check_common(op, scores, log_c, l_out, v_next);
  const int64_t cols = scores.size(1);
  if (cols == 0) return;
  PK_CHECK((cols + kThreads - 1) / kThreads <= 65535, op, "at most ", 65535 * kThreads,
           " columns, got ", cols);
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    sweeps<T>(scores, scale).column_logsum(optional_data<A>(log_c), static_cast<A>(log_c_const),
                                           static_cast<A*>(l_out.mutable_data_ptr()),
                                           optional_mutable<A>(v_next));
  });
}

// The row step with column potentials v: u = log r - logsumexp_j(scale s + v) (to u_out), the
// plan exp(scale s + u + v) (to plan), l_out = log of its column sums, v_next = v + log c - l_out.
void sinkhorn_row_sweep_cuda(Tensor scores, double scale, Tensor v, std::optional<Tensor> log_r,
                             double log_r_const, std::optional<Tensor> log_c, double log_c_const,
                             Tensor l_out, std::optional<Tensor> v_next,
                             std::optional<Tensor> u_out, std::optional<Tensor> plan) {
  const char* op = "sinkhorn_row_sweep_cuda";
  check_common(op, scores, log_c, l_out, v_next);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  check_vector(op, "v", v, scores, cols);
  if (log_r) check_vector(op, "log_r", *log_r, scores, rows);
  if (u_out) check_vector(op, "u_out", *u_out, scores, rows);
  if (plan) check_plan(op, *plan, scores);
  if (cols == 0) return;
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    sweeps<T>(scores, scale).row_sweep(
        static_cast<const A*>(v.const_data_ptr()), optional_data<A>(log_r),
        static_cast<A>(log_r_const), optional_data<A>(log_c), static_cast<A>(log_c_const),
        static_cast<A*>(l_out.mutable_data_ptr()), optional_mutable<A>(v_next),
        optional_mutable<A>(u_out), plan ? static_cast<T*>(plan->mutable_data_ptr()) : nullptr,
        plan ? plan->stride(0) : 0, plan ? plan->stride(1) : 0);
  });
}

// n_iters iterations (ops/sinkhorn.py's _iterate without a tolerance or a cross-rank combine):
// the plan after the last row step, l_out = log of its column sums, and with the histories each
// row step's u (n_iters, B) and column potentials v (n_iters, K). One cooperative launch where
// the columns fit the persistent kernel (K <= 8192, 4096 in float64); the sweeps one by one
// otherwise.
void sinkhorn_iterate_cuda(Tensor scores, double scale, int64_t n_iters,
                           std::optional<Tensor> log_r, double log_r_const,
                           std::optional<Tensor> log_c, double log_c_const, Tensor plan,
                           Tensor l_out, std::optional<Tensor> u_history,
                           std::optional<Tensor> v_history) {
  const char* op = "sinkhorn_iterate_cuda";
  check_common(op, scores, log_c, l_out, std::nullopt);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  PK_CHECK(n_iters >= 1, op, "argument 'n_iters' must be >= 1, got ", n_iters);
  check_plan(op, plan, scores);
  if (log_r) check_vector(op, "log_r", *log_r, scores, rows);
  if (u_history) check_history(op, "u_history", *u_history, scores, n_iters, rows);
  if (v_history) check_history(op, "v_history", *v_history, scores, n_iters, cols);
  if (rows == 0 || cols == 0) return;
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    const Sweeps<T, A> sweep = sweeps<T>(scores, scale);
    A* u_hist = optional_mutable<A>(u_history);
    A* v_hist = optional_mutable<A>(v_history);
    const IterationArgs<T, A> args{
        sweep.s, sweep.ss_b, sweep.ss_k, rows, cols, 0, sweep.scale, static_cast<int>(n_iters),
        optional_data<A>(log_r), static_cast<A>(log_r_const), optional_data<A>(log_c),
        static_cast<A>(log_c_const), static_cast<T*>(plan.mutable_data_ptr()), plan.stride(0),
        plan.stride(1), static_cast<A*>(l_out.mutable_data_ptr()), u_hist, v_hist};
    const bool launched = dispatch_layout<A>(cols, [&](auto layout) {
      using L = decltype(layout);
      return launch_iteration<T, A, L::kColumns, L::kGroups>(args, scores, sweep.stream);
    });
    if (launched) return;
    // The loop of ops/sinkhorn.py's _iterate: v_t in the history or two buffers in turn.
    Tensor buffers = torch::stable::new_empty(scores, {2, cols}, accumulate_type(scores));
    A* potentials = v_hist != nullptr ? v_hist : static_cast<A*>(buffers.mutable_data_ptr());
    auto v_of = [&](int64_t t) { return potentials + (v_hist != nullptr ? t : t % 2) * cols; };
    auto u_of = [&](int64_t t) { return u_hist != nullptr ? u_hist + t * rows : nullptr; };
    const A* lr = optional_data<A>(log_r);
    const A* lc = optional_data<A>(log_c);
    A* l = static_cast<A*>(l_out.mutable_data_ptr());
    sweep.column_logsum(lc, args.log_c_const, l, v_of(0));
    for (int64_t t = 1; t < n_iters; ++t)
      sweep.row_sweep(v_of(t - 1), lr, args.log_r_const, lc, args.log_c_const, l, v_of(t),
                      u_of(t - 1), nullptr, 0, 0);
    sweep.row_sweep(v_of(n_iters - 1), lr, args.log_r_const, lc, args.log_c_const, l, nullptr,
                    u_of(n_iters - 1), args.plan, args.sp_b, args.sp_k);
  });
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("sinkhorn_column_logsum_cuda(Tensor scores, float scale, Tensor? log_c, float log_c_const, "
        "Tensor(a!) l_out, Tensor(b!)? v_next) -> ()");
  m.def("sinkhorn_row_sweep_cuda(Tensor scores, float scale, Tensor v, Tensor? log_r, "
        "float log_r_const, Tensor? log_c, float log_c_const, Tensor(a!) l_out, "
        "Tensor(b!)? v_next, Tensor(c!)? u_out, Tensor(d!)? plan) -> ()");
  m.def("sinkhorn_iterate_cuda(Tensor scores, float scale, int n_iters, Tensor? log_r, "
        "float log_r_const, Tensor? log_c, float log_c_const, Tensor(a!) plan, Tensor(b!) l_out, "
        "Tensor(c!)? u_history, Tensor(d!)? v_history) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("sinkhorn_column_logsum_cuda", TORCH_BOX(&protokernels::sinkhorn_column_logsum_cuda));
  m.impl("sinkhorn_row_sweep_cuda", TORCH_BOX(&protokernels::sinkhorn_row_sweep_cuda));
  m.impl("sinkhorn_iterate_cuda", TORCH_BOX(&protokernels::sinkhorn_iterate_cuda));
}
