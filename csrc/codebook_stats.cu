// codebook_stats in CUDA: per-code counts and sums of the rows assigned to each code.
//
// Default: one thread per element of x, float atomics into the sums (fast; the order of the
// additions, hence the last bits, varies between runs). Deterministic: a block owns a range of
// codes of one group and scans that group's indices in row order; the rows it owns are compacted
// in order (warp ballots), and thread d adds feature d of each, so every sum is taken in row
// order. Each block scans all N indices of its group, so the code ranges are sized to give about
// two blocks per SM in all (N indices per block, read from L2).
#include <algorithm>
#include <tuple>

#include "common.h"

namespace protokernels {
namespace {

template <typename T, typename Acc>
__global__ void scatter_stats_kernel(const T* __restrict__ x, int64_t sx_n, int64_t sx_f,
                                     const int64_t* __restrict__ idx, int64_t elements,
                                     int64_t groups, int64_t size, int64_t depth,
                                     unsigned long long* __restrict__ counts, Acc* __restrict__ sums) {
  // One thread per element of x, or per (row, group) when Dg = 0 (counts only).
  const int64_t per_group = depth > 0 ? depth : 1, features = groups * per_group;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < elements;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = e / features, f = e % features, g = f / per_group, d = f % per_group;
    const int64_t code = idx[n * groups + g];
    if (code < 0 || code >= size) continue;  // unchecked under torch.compile: ignored
    const int64_t slot = g * size + code;
    if (depth > 0) atomicAdd(sums + slot * depth + d, widen(x[n * sx_n + f * sx_f]));
    if (d == 0) atomicAdd(counts + slot, 1ULL);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) ordered_stats_kernel(
    const T* __restrict__ x, int64_t sx_n, int64_t sx_f, const int64_t* __restrict__ idx,
    int64_t rows, int64_t groups, int64_t size, int64_t depth, int64_t codes_per_block,
    unsigned long long* __restrict__ counts, Acc* __restrict__ sums) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int64_t owned_rows[kThreads];
  __shared__ int64_t owned_slots[kThreads];
  __shared__ int warp_owned[kWarps];
  const int64_t blocks_per_group = (size + codes_per_block - 1) / codes_per_block;
  const int64_t g = blockIdx.x / blocks_per_group;
  const int64_t first_code = (blockIdx.x % blocks_per_group) * codes_per_block;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t row0 = 0; row0 < rows; row0 += kThreads) {
    const int64_t n = row0 + threadIdx.x;
    const int64_t code = n < rows ? idx[n * groups + g] : -1;
    const bool owned = code >= first_code && code < first_code + codes_per_block && code < size;
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, owned);
    if (lane == 0) warp_owned[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_owned[w] : 0;
      total += warp_owned[w];
    }
    if (owned) {  // compacted in row order
      const int at = before + __popc(ballot & ((1u << lane) - 1u));
      owned_rows[at] = n;
      owned_slots[at] = g * size + code;
      atomicAdd(counts + g * size + code, 1ULL);  // integer adds: exact in any order
    }
    __syncthreads();
    for (int i = 0; i < total; ++i) {
      const T* row = x + owned_rows[i] * sx_n + g * depth * sx_f;
      Acc* sum = sums + owned_slots[i] * depth;
      for (int64_t d = threadIdx.x; d < depth; d += kThreads) sum[d] += widen(row[d * sx_f]);
    }
    __syncthreads();  // owned_rows / warp_owned are rewritten by the next chunk
  }
}

}  // namespace

// x (N, G*Dg), idx (N, G) int64 contiguous -> sums (G, K, Dg) in float32
// (float64 for float64 x), counts (G, K) int64.
std::tuple<Tensor, Tensor> codebook_stats_cuda(Tensor x, Tensor idx, int64_t size,
                                               bool deterministic) {
  const char* op = "codebook_stats_cuda";
  PK_CHECK_CUDA(op, "x", x);
  PK_CHECK_CUDA(op, "idx", idx);
  PK_CHECK_DIM(op, "x", x, 2);
  PK_CHECK_DIM(op, "idx", idx, 2);
  PK_CHECK(idx.scalar_type() == ScalarType::Long && idx.is_contiguous() &&
               idx.size(0) == x.size(0) && idx.size(1) > 0 && x.size(1) % idx.size(1) == 0,
           op, "argument 'idx' must be a contiguous int64 tensor (N, G) with G dividing x's "
           "last dimension");
  PK_CHECK(size > 0, op, "argument 'size' must be positive, got ", size);
  const int64_t rows = x.size(0), groups = idx.size(1), depth = x.size(1) / groups;
  const ScalarType acc_type =
      x.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor counts = new_zeroed(x, {groups, size}, ScalarType::Long);
  Tensor sums = new_zeroed(x, {groups, size, depth}, acc_type);
  if (rows == 0) return {sums, counts};
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accumulate<T>::type;
    const auto* data = static_cast<const T*>(x.const_data_ptr());
    const auto* codes = static_cast<const int64_t*>(idx.const_data_ptr());
    auto* count = static_cast<unsigned long long*>(counts.mutable_data_ptr());
    auto* sum = static_cast<Acc*>(sums.mutable_data_ptr());
    if (deterministic) {
      const int64_t blocks_per_group =
          std::max<int64_t>(1, std::min<int64_t>(size, 2 * sm_count(x) / groups));
      const int64_t codes_per_block = (size + blocks_per_group - 1) / blocks_per_group;
      const int64_t blocks = groups * ((size + codes_per_block - 1) / codes_per_block);
      PK_CHECK(blocks < (int64_t{1} << 31), op, "too many groups (", groups, ")");
      ordered_stats_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          data, x.stride(0), x.stride(1), codes, rows, groups, size, depth, codes_per_block,
          count, sum);
    } else {
      const int64_t elements = rows * groups * std::max<int64_t>(depth, 1);
      scatter_stats_kernel<T, Acc><<<blocks_for(elements), kThreads, 0, stream>>>(
          data, x.stride(0), x.stride(1), codes, elements, groups, size, depth, count, sum);
    }
    PK_CHECK_LAUNCH();
  });
  return {sums, counts};
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("codebook_stats_cuda(Tensor x, Tensor idx, int size, bool deterministic) "
        "-> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("codebook_stats_cuda", TORCH_BOX(&protokernels::codebook_stats_cuda));
}
