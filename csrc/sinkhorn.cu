// sinkhorn in CUDA: the two sweeps of the log-domain iteration (see reference/sinkhorn.py).
//
// Column log-sum: a thread per column streams a range of rows with an online (max, sum), so the
// loads of a warp are one row's consecutive columns; the ranges' partials are combined in order
// by the finish kernel. Row sweep: a block per row at a time (blocks stride over rows); pass 1
// takes the row's log-sum-exp (per-thread online (max, sum), then a block reduction), pass 2
// re-reads the row (from L1/L2) and folds each column's log-term into the block's own row of
// partial column log-sums. No atomics: every result is the same each run.
#include <cmath>
#include <optional>

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

template <typename A>
__device__ __forceinline__ A scaled(A s, A scale) {
  const A z = s * scale;
  return z > A(kScoreLimit) ? A(kScoreLimit) : (z < A(-kScoreLimit) ? A(-kScoreLimit) : z);
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

int sm_count(const Tensor& t) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device_index());
  return sms;
}

template <typename A>
const A* optional_data(const std::optional<Tensor>& t) {
  return t ? static_cast<const A*>(t->const_data_ptr()) : nullptr;
}

template <typename A>
void finish(const Tensor& part_mass, const Tensor* part_top, const A* v,
            const std::optional<Tensor>& log_c, double log_c_const, Tensor& l_out,
            std::optional<Tensor>& v_next, cudaStream_t stream) {
  const int64_t cols = l_out.size(0);
  finish_kernel<A><<<blocks_for(cols), kThreads, 0, stream>>>(
      static_cast<const A*>(part_mass.const_data_ptr()),
      part_top ? static_cast<const A*>(part_top->const_data_ptr()) : nullptr, part_mass.size(0),
      cols, v, optional_data<A>(log_c), static_cast<A>(log_c_const),
      static_cast<A*>(l_out.mutable_data_ptr()),
      v_next ? static_cast<A*>(v_next->mutable_data_ptr()) : nullptr);
  PK_CHECK_LAUNCH();
}

void check_common(const char* op, const Tensor& scores, const std::optional<Tensor>& log_c,
                  const Tensor& l_out, const std::optional<Tensor>& v_next) {
  PK_CHECK_CUDA(op, "scores", scores);
  PK_CHECK_DIM(op, "scores", scores, 2);
  check_vector(op, "l_out", l_out, scores, scores.size(1));
  if (log_c) check_vector(op, "log_c", *log_c, scores, scores.size(1));
  if (v_next) check_vector(op, "v_next", *v_next, scores, scores.size(1));
}

}  // namespace

// l_out (K,) = logsumexp_i(scores_ij * scale); v_next (optional) = log c - l_out.
void sinkhorn_column_logsum_cuda(Tensor scores, double scale, std::optional<Tensor> log_c,
                                 double log_c_const, Tensor l_out, std::optional<Tensor> v_next) {
  const char* op = "sinkhorn_column_logsum_cuda";
  check_common(op, scores, log_c, l_out, v_next);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  if (cols == 0) return;
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  const cudaStream_t stream = current_stream(scores);
  // Enough row ranges to fill the GPU 4 times over with the column blocks.
  const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
  PK_CHECK(col_blocks <= 65535, op, "at most ", 65535 * kThreads, " columns, got ", cols);
  int64_t parts = (4 * int64_t{sm_count(scores)} + col_blocks - 1) / col_blocks;
  parts = rows < parts ? (rows > 0 ? rows : 1) : parts;
  const int64_t rows_per_part = rows > 0 ? (rows + parts - 1) / parts : 1;
  Tensor part_top = torch::stable::new_empty(scores, {parts, cols}, accumulate_type(scores));
  Tensor part_mass = torch::stable::new_empty(scores, {parts, cols}, accumulate_type(scores));
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    column_logsum_kernel<T, A><<<dim3(parts, col_blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(scores.const_data_ptr()), scores.stride(0), scores.stride(1), rows,
        cols, rows_per_part, static_cast<A>(scale), static_cast<A*>(part_top.mutable_data_ptr()),
        static_cast<A*>(part_mass.mutable_data_ptr()));
    PK_CHECK_LAUNCH();
    finish<A>(part_mass, &part_top, nullptr, log_c, log_c_const, l_out, v_next, stream);
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
  if (plan) {
    PK_CHECK(plan->is_cuda() && plan->dim() == 2 && plan->size(0) == rows &&
                 plan->size(1) == cols && plan->scalar_type() == scores.scalar_type(),
             op, "argument 'plan' must be a CUDA tensor of the scores' shape and dtype");
  }
  if (cols == 0) return;
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  const cudaStream_t stream = current_stream(scores);
  const int64_t resident = 2 * int64_t{sm_count(scores)};  // 512 threads: 2 blocks per SM
  const int64_t parts = rows < resident ? (rows > 0 ? rows : 1) : resident;
  Tensor part_top = torch::stable::new_empty(scores, {parts, cols}, accumulate_type(scores));
  Tensor part_mass = torch::stable::new_empty(scores, {parts, cols}, accumulate_type(scores));
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    row_sweep_kernel<T, A><<<parts, kSweepThreads, 0, stream>>>(
        static_cast<const T*>(scores.const_data_ptr()), scores.stride(0), scores.stride(1), rows,
        cols, static_cast<A>(scale), static_cast<const A*>(v.const_data_ptr()),
        optional_data<A>(log_r), static_cast<A>(log_r_const),
        u_out ? static_cast<A*>(u_out->mutable_data_ptr()) : nullptr,
        plan ? static_cast<T*>(plan->mutable_data_ptr()) : nullptr, plan ? plan->stride(0) : 0,
        plan ? plan->stride(1) : 0, static_cast<A*>(part_top.mutable_data_ptr()),
        static_cast<A*>(part_mass.mutable_data_ptr()));
    PK_CHECK_LAUNCH();
    finish<A>(part_mass, &part_top, static_cast<const A*>(v.const_data_ptr()), log_c, log_c_const,
              l_out, v_next, stream);
  });
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("sinkhorn_column_logsum_cuda(Tensor scores, float scale, Tensor? log_c, float log_c_const, "
        "Tensor(a!) l_out, Tensor(b!)? v_next) -> ()");
  m.def("sinkhorn_row_sweep_cuda(Tensor scores, float scale, Tensor v, Tensor? log_r, "
        "float log_r_const, Tensor? log_c, float log_c_const, Tensor(a!) l_out, "
        "Tensor(b!)? v_next, Tensor(c!)? u_out, Tensor(d!)? plan) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("sinkhorn_column_logsum_cuda", TORCH_BOX(&protokernels::sinkhorn_column_logsum_cuda));
  m.impl("sinkhorn_row_sweep_cuda", TORCH_BOX(&protokernels::sinkhorn_row_sweep_cuda));
}
