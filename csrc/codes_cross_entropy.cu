// codes_cross_entropy in CUDA: the forward is a warp per row reading its scores and codes once
// (each lane a running maximum and a running sum of the shifted exponentials, rescaled when its
// maximum grows, merged over the warp), writing the row's statistics and its value or its share
// of the deterministic sum (losses.cuh); the backward is one elementwise kernel from the
// statistics. Formulas: protokernels/reference/codes_cross_entropy.py. The forward used to write
// the (B, K) derivatives after three passes over each row and lost to the compiled naive forward
// at SwAV's B1024-4096 K3000 (0.059/0.123 ms against 0.018/0.050; RESULTS.md "DPNP in one op").
#include <cmath>
#include <string>

#include "common.h"
#include "losses.cuh"

namespace protokernels {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp each

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    rows_kernel(const T* __restrict__ scores, int64_t ss_b, const T* __restrict__ codes,
                int64_t sc_b, int64_t rows, int64_t k, typename Accumulate<T>::type inv_t,
                int reduction, typename Accumulate<T>::type* __restrict__ loss,
                typename Accumulate<T>::type* __restrict__ stats,
                typename Accumulate<T>::type* __restrict__ scale,
                typename Accumulate<T>::type* partial, long long* tickets) {
  using A = typename Accumulate<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  A value = 0;
  if (row < rows) {
    const T* s = scores + row * ss_b;
    const T* c = codes + row * sc_b;
    A top = -INFINITY, sum_exp = 0, total = 0, products = 0;
    for (int64_t j = lane; j < k; j += 32) {
      const A score = widen(s[j]), code = widen(c[j]);
      if (score > top) {  // the lane's sum moves to its new maximum (exp(-inf) = 0 at the first)
        sum_exp = sum_exp * exp((top - score) * inv_t) + A(1);
        top = score;
      } else {  // NaN lands here and carries into the sum
        sum_exp += exp((score - top) * inv_t);
      }
      total += code;
      products += code * score;
    }
    const A row_top = warp_max(top);
    // each lane's sum moved to the row's maximum; a lane that saw no score holds 0
    sum_exp = warp_sum(top == -INFINITY ? A(0) : sum_exp * exp((top - row_top) * inv_t));
    total = warp_sum(total);
    products = warp_sum(products);
    const A log_sum = log(sum_exp);
    if (lane == 0) {
      value = (total * row_top - products) * inv_t + total * log_sum;
      stats[row * 3] = row_top;
      stats[row * 3 + 1] = log_sum;
      stats[row * 3 + 2] = total;
      if (reduction == kNone) loss[row] = value;
    }
  }
  if (reduction != kNone) {
    finish_sum(value, lane == 0 && row < rows ? 1LL : 0LL, reduction, loss, scale, partial,
               tickets);
  }
}

// grad (B, K) contiguous = factor[b] (C e^((s - m) / T - L) - c) / T, one element per thread.
template <typename T>
__global__ void grad_kernel(const T* __restrict__ scores, int64_t ss_b,
                            const T* __restrict__ codes, int64_t sc_b,
                            const typename Accumulate<T>::type* __restrict__ stats,
                            const typename Accumulate<T>::type* __restrict__ factor, int64_t sf_b,
                            int64_t rows, int64_t k, typename Accumulate<T>::type inv_t,
                            T* __restrict__ grad) {
  using A = typename Accumulate<T>::type;
  const int64_t count = rows * k;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / k, col = i - row * k;
    const A* st = stats + row * 3;
    const A weight = exp((widen(scores[row * ss_b + col]) - st[0]) * inv_t - st[1]) * st[2] -
                     widen(codes[row * sc_b + col]);
    grad[i] = narrow<T>(weight * factor[row * sf_b] * inv_t);
  }
}

}  // namespace

// scores, codes (B >= 1, K >= 1) of one dtype with unit column stride -> (loss, stats (B, 3):
// each row's max score, log-sum of the shifted exponentials and codes' sum, scale) in the
// accumulate dtype.
std::tuple<Tensor, Tensor, Tensor> codes_cross_entropy_rows_cuda(Tensor scores, Tensor codes,
                                                                  double temperature,
                                                                  std::string reduction) {
  const char* op = "codes_cross_entropy_rows_cuda";
  PK_CHECK_CUDA(op, "scores", scores);
  PK_CHECK_CUDA(op, "codes", codes);
  PK_CHECK_DIM(op, "scores", scores, 2);
  PK_CHECK_DIM(op, "codes", codes, 2);
  PK_CHECK(scores.size(0) >= 1 && scores.size(1) >= 1 && scores.stride(1) == 1, op,
           "argument 'scores' must be (B >= 1, K >= 1) with unit column stride");
  PK_CHECK(codes.size(0) == scores.size(0) && codes.size(1) == scores.size(1) &&
               codes.stride(1) == 1 && codes.scalar_type() == scores.scalar_type(),
           op, "argument 'codes' must be shaped like 'scores', of its dtype, unit column stride");
  const int reduction_code = parse_reduction(reduction, op);
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  const cudaStream_t stream = current_stream(scores);
  const int64_t rows = scores.size(0), k = scores.size(1);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  PK_CHECK(blocks < (int64_t{1} << 31), op, "too many rows: ", rows);
  LossOutputs out(scores, {rows, 3}, rows, reduction_code, blocks);
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    rows_kernel<T><<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(scores.const_data_ptr()), scores.stride(0),
        static_cast<const T*>(codes.const_data_ptr()), codes.stride(0), rows, k,
        static_cast<A>(1.0 / temperature), reduction_code, out.data<A>(out.loss),
        out.data<A>(out.derivatives), out.data<A>(out.scale), out.data<A>(out.partial),
        out.ticket_data());
    PK_CHECK_LAUNCH();
  });
  return {out.loss, out.derivatives, out.scale};
}

// The gradient w.r.t. scores (B >= 1, K >= 1) of the rows' values weighted by factor (B,) (any
// stride), in scores' dtype; stats from codes_cross_entropy_rows_cuda.
Tensor codes_cross_entropy_grad_cuda(Tensor scores, Tensor codes, Tensor stats, Tensor factor,
                                     double temperature) {
  const char* op = "codes_cross_entropy_grad_cuda";
  PK_CHECK_CUDA(op, "scores", scores);
  PK_CHECK_DIM(op, "scores", scores, 2);
  const int64_t rows = scores.size(0), k = scores.size(1);
  PK_CHECK(rows >= 1 && k >= 1 && scores.stride(1) == 1, op,
           "argument 'scores' must be (B >= 1, K >= 1) with unit column stride");
  PK_CHECK(codes.is_cuda() && codes.dim() == 2 && codes.size(0) == rows && codes.size(1) == k &&
               codes.stride(1) == 1 && codes.scalar_type() == scores.scalar_type(),
           op, "argument 'codes' must be shaped like 'scores', of its dtype, unit column stride");
  const ScalarType acc = LossOutputs::accumulate(scores);
  PK_CHECK(stats.is_cuda() && stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 3 &&
               stats.is_contiguous() && stats.scalar_type() == acc,
           op, "argument 'stats' must be a contiguous (B, 3) tensor of the accumulate dtype");
  PK_CHECK(factor.is_cuda() && factor.dim() == 1 && factor.size(0) == rows &&
               factor.scalar_type() == acc,
           op, "argument 'factor' must be a (B,) tensor of the accumulate dtype");
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  const cudaStream_t stream = current_stream(scores);
  Tensor grad = torch::stable::new_empty(scores, {rows, k}, scores.scalar_type());
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    grad_kernel<T><<<blocks_for(rows * k), kThreads, 0, stream>>>(
        static_cast<const T*>(scores.const_data_ptr()), scores.stride(0),
        static_cast<const T*>(codes.const_data_ptr()), codes.stride(0),
        static_cast<const A*>(stats.const_data_ptr()),
        static_cast<const A*>(factor.const_data_ptr()), factor.stride(0), rows, k,
        static_cast<A>(1.0 / temperature), static_cast<T*>(grad.mutable_data_ptr()));
    PK_CHECK_LAUNCH();
  });
  return grad;
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("codes_cross_entropy_rows_cuda(Tensor scores, Tensor codes, float temperature, "
        "str reduction) -> (Tensor, Tensor, Tensor)");
  m.def("codes_cross_entropy_grad_cuda(Tensor scores, Tensor codes, Tensor stats, Tensor factor, "
        "float temperature) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("codes_cross_entropy_rows_cuda",
         TORCH_BOX(&protokernels::codes_cross_entropy_rows_cuda));
  m.impl("codes_cross_entropy_grad_cuda",
         TORCH_BOX(&protokernels::codes_cross_entropy_grad_cuda));
}
