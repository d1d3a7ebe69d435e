// codes_cross_entropy's epilogue in CUDA: a warp per row reads its scores and codes (maxima, sums,
// derivatives; the row stays in L1/L2) and writes the row's derivatives w.r.t. the scores and its
// value or its share of the deterministic sum (losses.cuh). Formulas:
// protokernels/reference/codes_cross_entropy.py. At the Sinkhorn head's in-model sizes the step is
// host time; this replaces SwAV's loss in torch ops (RESULTS.md "GLVQ and RSLVQ in one op").
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
                typename Accumulate<T>::type* __restrict__ weights,
                typename Accumulate<T>::type* __restrict__ scale,
                typename Accumulate<T>::type* partial, long long* tickets) {
  using A = typename Accumulate<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  A value = 0;
  if (row < rows) {
    const T* s = scores + row * ss_b;
    const T* c = codes + row * sc_b;
    A top = -INFINITY;
    for (int64_t j = lane; j < k; j += 32) top = fmax(top, logit_product(widen(s[j]), inv_t));
    top = warp_max(top);
    A sum_exp = 0, total = 0, products = 0;
    for (int64_t j = lane; j < k; j += 32) {
      const A logit = logit_product(widen(s[j]), inv_t), code = widen(c[j]);
      sum_exp += exp(logit - top);
      total += code;
      products += code * logit;
    }
    const A lse = top + log(warp_sum(sum_exp));
    total = warp_sum(total);
    products = warp_sum(products);
    A* w = weights + row * k;
    for (int64_t j = lane; j < k; j += 32) {
      const A logit = logit_product(widen(s[j]), inv_t);
      w[j] = (exp(logit - lse) * total - widen(c[j])) * inv_t;
    }
    if (lane == 0) {
      value = total * lse - products;
      if (reduction == kNone) loss[row] = value;
    }
  }
  if (reduction != kNone) {
    finish_sum(value, lane == 0 && row < rows ? 1LL : 0LL, reduction, loss, scale, partial,
               tickets);
  }
}

}  // namespace

// scores, codes (B >= 1, K >= 1) of one dtype with unit column stride -> (loss, weights (B, K),
// scale) in the accumulate dtype.
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
  LossOutputs out(scores, {rows, k}, rows, reduction_code, blocks);
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

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("codes_cross_entropy_rows_cuda(Tensor scores, Tensor codes, float temperature, "
        "str reduction) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("codes_cross_entropy_rows_cuda",
         TORCH_BOX(&protokernels::codes_cross_entropy_rows_cuda));
}
