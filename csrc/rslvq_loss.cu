// rslvq_loss's epilogue in CUDA: a warp per sample reads its row of distances three times
// (maxima, sums, derivatives; the row stays in L1/L2) and writes the row's derivatives w.r.t. the
// distances and its value or its share of the deterministic sum (losses.cuh). Formulas:
// protokernels/reference/rslvq_loss.py. At the heads' in-model sizes a training step is host
// time; this replaces RSLVQ's epilogue of torch ops (RESULTS.md "GLVQ and RSLVQ in one op").
#include <cmath>
#include <string>

#include "common.h"
#include "losses.cuh"

namespace protokernels {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp each

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    epilogue_kernel(const T* __restrict__ dist, int64_t sd_n, const int64_t* __restrict__ x_labels,
                    const int64_t* __restrict__ y_labels, int64_t n, int64_t m,
                    typename Accumulate<T>::type factor, int reduction,
                    typename Accumulate<T>::type* __restrict__ loss,
                    typename Accumulate<T>::type* __restrict__ weights,
                    typename Accumulate<T>::type* __restrict__ scale,
                    typename Accumulate<T>::type* partial, long long* tickets) {
  using A = typename Accumulate<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  A value = 0;
  long long counted = 0;
  if (row < n) {
    const T* d = dist + row * sd_n;
    const int64_t label = x_labels[row];
    A top_all = -INFINITY, top_same = -INFINITY;
    int same_count = 0;
    for (int64_t j = lane; j < m; j += 32) {  // fmax skips NaN; the sums below carry it
      const A logit = logit_product(widen(d[j]), factor);
      top_all = fmax(top_all, logit);
      if (y_labels[j] == label) {
        top_same = fmax(top_same, logit);
        ++same_count;
      }
    }
    top_all = warp_max(top_all);
    top_same = warp_max(top_same);
    const bool is_counted = warp_sum(same_count) > 0;
    A sum_all = 0, sum_same = 0;
    for (int64_t j = lane; j < m; j += 32) {
      const A logit = logit_product(widen(d[j]), factor);
      sum_all += exp(logit - top_all);
      if (y_labels[j] == label) sum_same += exp(logit - top_same);
    }
    const A whole = top_all + log(warp_sum(sum_all));
    const A correct = top_same + log(warp_sum(sum_same));
    A* w = weights + row * m;
    for (int64_t j = lane; j < m; j += 32) {
      A weight = 0;
      if (is_counted) {
        const A logit = logit_product(widen(d[j]), factor);
        const A within = y_labels[j] == label ? exp(logit - correct) : A(0);
        weight = (exp(logit - whole) - within) * factor;
      }
      w[j] = weight;
    }
    if (lane == 0) {
      value = is_counted ? whole - correct : A(0);
      counted = is_counted;
      if (reduction == kNone) loss[row] = value;
    }
  }
  if (reduction != kNone) finish_sum(value, counted, reduction, loss, scale, partial, tickets);
}

}  // namespace

// dist (N >= 1, M >= 1) with unit column stride, labels (N,) and (M,) int64 contiguous ->
// (loss, weights (N, M), scale) in the accumulate dtype.
std::tuple<Tensor, Tensor, Tensor> rslvq_epilogue_cuda(Tensor dist, Tensor x_labels,
                                                        Tensor y_labels, double sigma,
                                                        std::string reduction) {
  const char* op = "rslvq_epilogue_cuda";
  PK_CHECK_CUDA(op, "dist", dist);
  PK_CHECK_DIM(op, "dist", dist, 2);
  PK_CHECK(dist.size(0) >= 1 && dist.size(1) >= 1 && dist.stride(1) == 1, op,
           "argument 'dist' must be (N >= 1, M >= 1) with unit column stride");
  PK_CHECK(x_labels.is_cuda() && x_labels.scalar_type() == ScalarType::Long &&
               x_labels.dim() == 1 && x_labels.size(0) == dist.size(0) && x_labels.is_contiguous(),
           op, "argument 'x_labels' must be a contiguous int64 CUDA tensor (N,)");
  PK_CHECK(y_labels.is_cuda() && y_labels.scalar_type() == ScalarType::Long &&
               y_labels.dim() == 1 && y_labels.size(0) == dist.size(1) && y_labels.is_contiguous(),
           op, "argument 'y_labels' must be a contiguous int64 CUDA tensor (M,)");
  const int reduction_code = parse_reduction(reduction, op);
  torch::stable::accelerator::DeviceGuard guard(dist.get_device_index());
  const cudaStream_t stream = current_stream(dist);
  const int64_t n = dist.size(0), m = dist.size(1);
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  PK_CHECK(blocks < (int64_t{1} << 31), op, "too many rows: ", n);
  LossOutputs out(dist, {n, m}, n, reduction_code, blocks);
  dispatch_floating(dist.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    epilogue_kernel<T><<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(dist.const_data_ptr()), dist.stride(0),
        static_cast<const int64_t*>(x_labels.const_data_ptr()),
        static_cast<const int64_t*>(y_labels.const_data_ptr()), n, m,
        static_cast<A>(-0.5 / (sigma * sigma)), reduction_code, out.data<A>(out.loss),
        out.data<A>(out.derivatives), out.data<A>(out.scale), out.data<A>(out.partial),
        out.ticket_data());
    PK_CHECK_LAUNCH();
  });
  return {out.loss, out.derivatives, out.scale};
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("rslvq_epilogue_cuda(Tensor dist, Tensor x_labels, Tensor y_labels, float sigma, "
        "str reduction) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("rslvq_epilogue_cuda", TORCH_BOX(&protokernels::rslvq_epilogue_cuda));
}
