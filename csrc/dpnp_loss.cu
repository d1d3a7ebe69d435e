// dpnp_loss's epilogue in CUDA: a warp per row, the N samples then the M prototypes. A row reads
// its logits (a sample's row of h C^T, a prototype's row of C C^T) for its rival and, for a
// sample, its log-sum-exp, then writes a sample's softmax weights over its logits; every row then
// walks its features once for the positive and L_1/2 terms and writes its gradient buffers; the
// values end in the deterministic sum (losses.cuh). Formulas: protokernels/reference/dpnp_loss.py.
// At the heads' in-model sizes a training step is host time; this replaces DPNP's loss in torch
// ops (~95 launches and two device syncs per step).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "losses.cuh"

namespace protokernels {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp each

// The lowest-index minimum of (key, index) over the warp (every lane gets it).
template <typename A>
__device__ void warp_argmin(A& key, int64_t& index) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const A other_key = __shfl_xor_sync(0xFFFFFFFF, key, offset);
    const int64_t other_index = __shfl_xor_sync(0xFFFFFFFF, index, offset);
    if (other_key < key || (other_key == key && other_index < index)) {
      key = other_key;
      index = other_index;
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    epilogue_kernel(A* __restrict__ scores, const A* __restrict__ gram, const A* __restrict__ h,
                    const A* __restrict__ c, const int64_t* __restrict__ labels, int64_t n,
                    int64_t m, int64_t d, A lambda_pos, A lambda_neg_sample, A lambda_neg_class,
                    A eps, A* __restrict__ own, A* __restrict__ scatter,
                    int64_t* __restrict__ targets, A* __restrict__ loss, A* __restrict__ scale,
                    A* partial, long long* tickets) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  A value = 0;
  if (row < n + m) {
    const bool is_sample = row < n, has_rival = m > 1;
    const A per_sample = A(1) / A(n > 0 ? n : 1);
    const int64_t own_col = is_sample ? labels[row] : row - n;
    A* logits = is_sample ? scores + row * m : nullptr;
    const A* row_logits = is_sample ? scores + row * m : gram + own_col * m;
    const A* features = is_sample ? h + row * d : c + own_col * d;
    const A negative = is_sample ? lambda_neg_sample * per_sample / 2 : lambda_neg_class / A(2 * m);
    // The rival: the lowest-index minimum of ||c_k||^2 - 2 s_k over k != own_col (NaN never
    // wins; without a finite candidate, the first allowed column).
    A best = INFINITY, top = -INFINITY;
    int64_t best_index = m;
    for (int64_t j = lane; j < m; j += 32) {
      const A s = row_logits[j];
      const A key = gram[j * (m + 1)] - 2 * s;
      if (j != own_col && key < best) {
        best = key;
        best_index = j;
      }
      top = fmax(top, s);
    }
    warp_argmin(best, best_index);
    const int64_t rival = best < INFINITY ? best_index : (own_col == 0 ? 1 : 0) % m;
    if (is_sample) {  // the cross-entropy and its weights (softmax - (1 + lambda_pos) onehot) / N
      top = warp_max(top);
      A total = 0;
      for (int64_t j = lane; j < m; j += 32) total += exp(row_logits[j] - top);
      const A lse = top + log(warp_sum(total));
      value = (lse - row_logits[own_col]) * per_sample;
      __syncwarp();  // every lane has read the label's logit before it is overwritten
      for (int64_t j = lane; j < m; j += 32) {
        logits[j] = (exp(logits[j] - lse) - (j == own_col ? 1 + lambda_pos : A(0))) * per_sample;
      }
    }
    // Features: the positive term (samples) and the L_1/2 repulsion from the rival.
    const A* positive = c + own_col * d;
    const A* opposite = c + rival * d;
    const A root_eps = sqrt(eps);
    A pull = 0, push = 0;
    for (int64_t k = lane; k < d; k += 32) {
      const A v = features[k];
      const A u = v - opposite[k];
      const A root = sqrt(fabs(u) + eps);
      A g = 0;
      if (has_rival) {
        push += root - root_eps;
        g = (u > 0 ? A(1) : u < 0 ? A(-1) : A(0)) / (2 * root);
      }
      A own_value = -negative * g;
      if (is_sample) {
        const A c_pos = positive[k];
        pull += (v - c_pos) * (v - c_pos);
        own_value += lambda_pos * per_sample * v;
        scatter[(n + m + row) * d + k] = lambda_pos * per_sample * c_pos;
      }
      own[row * d + k] = own_value;
      scatter[row * d + k] = negative * g;
    }
    pull = warp_sum(pull);
    push = warp_sum(push);
    value += (is_sample ? lambda_pos * per_sample / 2 * pull : A(0)) - negative * push;
    if (lane == 0) {
      targets[row] = rival;
      if (is_sample) targets[n + m + row] = own_col;
    } else {
      value = 0;  // the row's value counts once in the block's sum
    }
  }
  finish_sum(value, 0LL, kSum, loss, scale, partial, tickets);
}

}  // namespace

// scores (N, M) = h c^T (overwritten with the weights), gram (M, M) = c c^T, h (N, D), c (M >= 1,
// D), all contiguous in one floating dtype (float32 or float64), labels int64 (N,) in [0, M) ->
// (loss, own (N + M, D), scatter (2N + M, D), targets (2N + M,)); see reference/dpnp_loss.py.
std::tuple<Tensor, Tensor, Tensor, Tensor> dpnp_epilogue_cuda(Tensor scores, Tensor gram, Tensor h,
                                                              Tensor c, Tensor labels,
                                                              double lambda_pos,
                                                              double lambda_neg_sample,
                                                              double lambda_neg_class,
                                                              double eps) {
  const char* op = "dpnp_epilogue_cuda";
  PK_CHECK_CUDA(op, "scores", scores);
  PK_CHECK_DIM(op, "scores", scores, 2);
  PK_CHECK_DIM(op, "h", h, 2);
  PK_CHECK_DIM(op, "c", c, 2);
  const int64_t n = h.size(0), m = c.size(0), d = h.size(1);
  PK_CHECK(m >= 1 && c.size(1) == d, op, "argument 'c' must be (M >= 1, D) with h's D");
  PK_CHECK(scores.scalar_type() == ScalarType::Float || scores.scalar_type() == ScalarType::Double,
           op, "argument 'scores' must be float32 or float64");
  for (const Tensor* t : {&scores, &gram, &h, &c}) {
    PK_CHECK(t->is_cuda() && t->get_device_index() == scores.get_device_index() &&
                 t->scalar_type() == scores.scalar_type() && t->is_contiguous(),
             op, "arguments 'scores', 'gram', 'h' and 'c' must be contiguous CUDA tensors of "
             "one device and dtype");
  }
  PK_CHECK(scores.size(0) == n && scores.size(1) == m && gram.dim() == 2 && gram.size(0) == m &&
               gram.size(1) == m,
           op, "arguments 'scores' and 'gram' must be (N, M) and (M, M)");
  PK_CHECK(labels.is_cuda() && labels.scalar_type() == ScalarType::Long && labels.dim() == 1 &&
               labels.size(0) == n && labels.is_contiguous(),
           op, "argument 'labels' must be a contiguous int64 CUDA tensor (N,)");
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  const cudaStream_t stream = current_stream(scores);
  const int64_t rows = n + m;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  PK_CHECK(blocks < (int64_t{1} << 31), op, "too many rows: ", rows);
  LossOutputs out(h, {rows, d}, rows, kSum, blocks);
  Tensor scatter = torch::stable::new_empty(h, {rows + n, d}, h.scalar_type());
  Tensor targets = torch::stable::new_empty(labels, {rows + n}, ScalarType::Long);
  dispatch_floating(scores.scalar_type(), op, [&](auto tag) {
    using A = decltype(tag);
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
      epilogue_kernel<A><<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, stream>>>(
          static_cast<A*>(scores.mutable_data_ptr()), static_cast<const A*>(gram.const_data_ptr()),
          static_cast<const A*>(h.const_data_ptr()), static_cast<const A*>(c.const_data_ptr()),
          static_cast<const int64_t*>(labels.const_data_ptr()), n, m, d,
          static_cast<A>(lambda_pos), static_cast<A>(lambda_neg_sample),
          static_cast<A>(lambda_neg_class), static_cast<A>(eps), out.data<A>(out.derivatives),
          static_cast<A*>(scatter.mutable_data_ptr()),
          static_cast<int64_t*>(targets.mutable_data_ptr()), out.data<A>(out.loss),
          out.data<A>(out.scale), out.data<A>(out.partial), out.ticket_data());
      PK_CHECK_LAUNCH();
    }
  });
  return {out.loss, out.derivatives, scatter, targets};
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("dpnp_epilogue_cuda(Tensor(a!) scores, Tensor gram, Tensor h, Tensor c, Tensor labels, "
        "float lambda_pos, float lambda_neg_sample, float lambda_neg_class, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("dpnp_epilogue_cuda", TORCH_BOX(&protokernels::dpnp_epilogue_cuda));
}
