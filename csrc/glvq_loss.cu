// glvq_loss's epilogue in CUDA: one launch turns nearest_by_label's (d+, i+, d-, i-) into GLVQ's
// transfer values, their derivatives w.r.t. (d+, d-) and the loss (formulas:
// protokernels/reference/glvq_loss.py). At the heads' in-model sizes a training step is host
// time, and this replaces ~50 launches of torch ops (RESULTS.md "GLVQ in one op").
// The sum is deterministic (losses.cuh's finish_sum).
#include <cmath>
#include <string>

#include "common.h"
#include "losses.cuh"

namespace protokernels {
namespace {

constexpr int kEpilogueThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int kRowsPerBlock = kEpilogueThreads * kRowsPerThread;

enum Transfer { kIdentity = 0, kSigmoid = 1, kSwish = 2 };

template <typename A>
__global__ void __launch_bounds__(kEpilogueThreads)
    epilogue_kernel(const A* __restrict__ dist, const int64_t* __restrict__ idx, int64_t n,
                    int transfer, A beta, int reduction, A* __restrict__ loss,
                    A* __restrict__ coef, A* __restrict__ scale, A* partial,
                    long long* tickets) {
  A sum = 0;
  long long count = 0;
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t i = int64_t{blockIdx.x} * kRowsPerBlock + r * kEpilogueThreads + threadIdx.x;
    if (i >= n) break;
    const A d_plus = dist[2 * i], d_minus = dist[2 * i + 1];
    const bool counted = idx[2 * i] >= 0, rival = idx[2 * i + 1] >= 0;
    const A total = d_plus + d_minus;
    const bool live = rival && total != A(0);  // NaN != 0: a NaN total stays live
    const A safe = live ? total : A(1);
    A mu = live ? (d_plus - d_minus) / safe : A(0);
    if (!rival) mu = d_plus * A(0) - A(1);  // NaN d+ stays NaN
    A value = mu, slope = 1;
    if (transfer != kIdentity) {
      const A s = A(1) / (A(1) + exp(-beta * mu));
      slope = beta * s * (A(1) - s);
      value = transfer == kSigmoid ? s : mu * s;
      if (transfer == kSwish) slope = s + mu * slope;
    }
    const bool grad = counted && live;
    const A twice = A(2) / (safe * safe);
    coef[2 * i] = grad ? slope * d_minus * twice : A(0);
    coef[2 * i + 1] = grad ? -slope * d_plus * twice : A(0);
    value = counted ? value : A(0);
    if (reduction == kNone) {
      loss[i] = value;
    } else {
      sum += value;
      count += counted;
    }
  }
  if (reduction != kNone) finish_sum(sum, count, reduction, loss, scale, partial, tickets);
}

int parse_transfer(const std::string& transfer, const char* op) {
  if (transfer == "identity") return kIdentity;
  if (transfer == "sigmoid") return kSigmoid;
  if (transfer == "swish") return kSwish;
  STD_TORCH_CHECK(false, op, ": transfer must be 'identity', 'sigmoid' or 'swish', got '",
                  transfer, "'");
}

}  // namespace

// dist (N >= 1, 2) float32/float64 and idx (N, 2) int64, contiguous, from nearest_by_label ->
// (loss, coef (N, 2), scale).
std::tuple<Tensor, Tensor, Tensor> glvq_epilogue_cuda(Tensor dist, Tensor idx,
                                                       std::string transfer, double beta,
                                                       std::string reduction) {
  const char* op = "glvq_epilogue_cuda";
  PK_CHECK_CUDA(op, "dist", dist);
  PK_CHECK_CUDA(op, "idx", idx);
  PK_CHECK((dist.scalar_type() == ScalarType::Float || dist.scalar_type() == ScalarType::Double) &&
               dist.dim() == 2 && dist.size(1) == 2 && dist.size(0) >= 1 && dist.is_contiguous(),
           op, "argument 'dist' must be a contiguous float32 or float64 tensor (N >= 1, 2)");
  PK_CHECK(idx.scalar_type() == ScalarType::Long && idx.dim() == 2 && idx.size(0) == dist.size(0) &&
               idx.size(1) == 2 && idx.is_contiguous(),
           op, "argument 'idx' must be a contiguous int64 tensor shaped like 'dist'");
  const int transfer_code = parse_transfer(transfer, op);
  const int reduction_code = parse_reduction(reduction, op);
  torch::stable::accelerator::DeviceGuard guard(dist.get_device_index());
  const cudaStream_t stream = current_stream(dist);
  const int64_t n = dist.size(0);
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  PK_CHECK(blocks < (int64_t{1} << 31), op, "too many rows: ", n);
  LossOutputs out(dist, {n, 2}, n, reduction_code, blocks);
  auto launch = [&](auto tag) {
    using A = decltype(tag);
    epilogue_kernel<A><<<static_cast<unsigned>(blocks), kEpilogueThreads, 0, stream>>>(
        static_cast<const A*>(dist.const_data_ptr()),
        static_cast<const int64_t*>(idx.const_data_ptr()), n, transfer_code, static_cast<A>(beta),
        reduction_code, out.data<A>(out.loss), out.data<A>(out.derivatives),
        out.data<A>(out.scale), out.data<A>(out.partial), out.ticket_data());
    PK_CHECK_LAUNCH();
  };
  if (dist.scalar_type() == ScalarType::Double) {
    launch(double{});
  } else {
    launch(float{});
  }
  return {out.loss, out.derivatives, out.scale};
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("glvq_epilogue_cuda(Tensor dist, Tensor idx, str transfer, float beta, str reduction) "
        "-> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("glvq_epilogue_cuda", TORCH_BOX(&protokernels::glvq_epilogue_cuda));
}
