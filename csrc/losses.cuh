// The loss ops' reduction (glvq_loss, rslvq_loss): per-sample values, their sum, or their mean
// over the samples that count, formed deterministically in the kernel that computes the values
// (the same rule as protokernels/reference/_losses.py and triton_kernels/_common.finish_sum).
#pragma once

#include <initializer_list>
#include <string>

#include "common.h"

namespace protokernels {

enum Reduction { kNone = 0, kSum = 1, kMean = 2 };

inline int parse_reduction(const std::string& reduction, const char* op) {
  if (reduction == "none") return kNone;
  if (reduction == "sum") return kSum;
  if (reduction == "mean") return kMean;
  STD_TORCH_CHECK(false, op, ": reduction must be 'none', 'sum' or 'mean', got '", reduction, "'");
}

// a * b rounded once and never contracted into a later add: a logit scaled this way is the same
// number in every pass over a row, so exp(logit - max) is exactly 1 at the maximum. With
// contraction, `logit - top` became fma(s, inv_t, -top), the product's rounding error (5e-7 at
// a logit of 8.5): a one-column row's softmax weight came out 5e-6 instead of 0 (H200,
// test_sinkhorn_prototype_loss, in codes_cross_entropy's kernel, which now shifts by the
// maximum score before scaling: exact at the maximum with or without contraction).
__device__ __forceinline__ float logit_product(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double logit_product(double a, double b) { return __dmul_rn(a, b); }

// Over the 32 lanes of a warp (xor butterflies: every lane gets the result). fmax skips NaN; a
// row's NaN reaches its value through the sums instead.
template <typename A>
__device__ A warp_max(A v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v = fmax(v, __shfl_xor_sync(0xFFFFFFFF, v, offset));
  }
  return v;
}

template <typename V>
__device__ V warp_sum(V v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFF, v, offset);
  return v;
}

// Sum over the block in a fixed order (the same result for the same input every run); valid in
// thread 0. `shared` holds one value per warp.
template <typename V>
__device__ V block_sum(V v, V* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFF, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : V(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFF, v, offset);
  }
  __syncthreads();  // the caller may reuse `shared`
  return v;
}

// The outputs of a loss kernel over `rows` samples in `blocks` blocks, in the accumulate dtype of
// `like`: each sample's derivatives (derivative_sizes), the loss ((rows,) for "none", else 0-d),
// the scale (1 for "none"; finish_sum writes it otherwise), and finish_sum's buffers: a partial
// sum per block and (int64, zeroed) the ticket then a count per block (empty for "none").
struct LossOutputs {
  Tensor derivatives, loss, scale, partial, tickets;
  LossOutputs(const Tensor& like, std::initializer_list<int64_t> derivative_sizes, int64_t rows,
              int reduction, int64_t blocks)
      : derivatives(torch::stable::new_empty(like, derivative_sizes, accumulate(like))),
        loss(reduction == kNone ? torch::stable::new_empty(like, {rows}, accumulate(like))
                                : torch::stable::new_empty(like, {}, accumulate(like))),
        scale(torch::stable::new_empty(like, {}, accumulate(like))),
        partial(torch::stable::new_empty(like, {reduction == kNone ? 0 : blocks},
                                         accumulate(like))),
        tickets(new_zeroed(like, {reduction == kNone ? 0 : blocks + 1}, ScalarType::Long)) {
    if (reduction == kNone) torch::stable::fill_(scale, 1.0);
  }
  static ScalarType accumulate(const Tensor& t) {
    return t.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  }
  template <typename A> A* data(Tensor& t) { return static_cast<A*>(t.mutable_data_ptr()); }
  long long* ticket_data() { return static_cast<long long*>(tickets.mutable_data_ptr()); }
};

// Called by every thread of every block with its own (sum, count): the loss and the scale the
// backward multiplies the per-sample derivatives by (1, or 1 / count for kMean). Each block writes
// its partials; the block that arrives last (its ticket taken after a fence, so every partial is
// visible) adds them in block order.
template <typename A>
__device__ void finish_sum(A sum, long long count, int reduction, A* loss, A* scale, A* partial,
                           long long* tickets) {
  constexpr int kMaxWarps = 32;
  __shared__ A shared_sums[kMaxWarps];
  __shared__ long long shared_counts[kMaxWarps];
  __shared__ bool last;
  sum = block_sum(sum, shared_sums);
  count = block_sum(count, shared_counts);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = sum;
    tickets[1 + blockIdx.x] = count;
    __threadfence();
    last = atomicAdd(reinterpret_cast<unsigned long long*>(tickets), 1ULL) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  sum = 0;
  count = 0;
  for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) {  // L2 reads, block order
    sum += __ldcg(partial + b);
    count += __ldcg(tickets + 1 + b);
  }
  sum = block_sum(sum, shared_sums);
  count = block_sum(count, shared_counts);
  if (threadIdx.x == 0) {
    const A factor = reduction == kMean ? A(1) / A(count > 0 ? count : 1) : A(1);
    *loss = sum * factor;
    *scale = factor;
  }
}

}  // namespace protokernels
