// codebook_lookup in CUDA: out[n, g*Dg + d] = codebooks[g, idx[n, g], d], one thread per output
// element (grid-stride, 64-bit offsets). The writes are coalesced; the codebooks are read from L2.
#include <cmath>

#include "common.h"

namespace protokernels {
namespace {

template <typename T>
__global__ void lookup_kernel(const int64_t* __restrict__ idx, const T* __restrict__ books,
                              int64_t sb_g, int64_t sb_k, int64_t sb_d, T* __restrict__ out,
                              int64_t elements, int64_t groups, int64_t size, int64_t depth) {
  const int64_t features = groups * depth;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < elements;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = e / features, g = (e % features) / depth, d = e % depth;
    const int64_t code = idx[n * groups + g];
    // The wrapper checks the range; under torch.compile / CUDA graphs it cannot, and an
    // out-of-range code then reads as NaN instead of faulting.
    out[e] = code >= 0 && code < size ? books[g * sb_g + code * sb_k + d * sb_d]
                                      : narrow<T>(NAN);
  }
}

}  // namespace

// idx (N, G) int64 contiguous, codebooks (G, K, Dg), out (N, G*Dg) contiguous.
void codebook_lookup_cuda(Tensor idx, Tensor codebooks, Tensor out) {
  const char* op = "codebook_lookup_cuda";
  PK_CHECK_CUDA(op, "idx", idx);
  PK_CHECK_CUDA(op, "codebooks", codebooks);
  PK_CHECK_CUDA(op, "out", out);
  PK_CHECK_DIM(op, "idx", idx, 2);
  PK_CHECK_DIM(op, "codebooks", codebooks, 3);
  PK_CHECK(idx.scalar_type() == ScalarType::Long && idx.is_contiguous() &&
               idx.size(1) == codebooks.size(0),
           op, "argument 'idx' must be a contiguous int64 tensor (N, G)");
  PK_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == idx.size(0) &&
               out.size(1) == codebooks.size(0) * codebooks.size(2) &&
               out.scalar_type() == codebooks.scalar_type(),
           op, "argument 'out' must be a contiguous (N, G*Dg) tensor of the codebooks' dtype");
  if (out.numel() == 0) return;
  torch::stable::accelerator::DeviceGuard guard(codebooks.get_device_index());
  const cudaStream_t stream = current_stream(codebooks);
  dispatch_floating(codebooks.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    lookup_kernel<T><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        static_cast<const int64_t*>(idx.const_data_ptr()),
        static_cast<const T*>(codebooks.const_data_ptr()), codebooks.stride(0),
        codebooks.stride(1), codebooks.stride(2), static_cast<T*>(out.mutable_data_ptr()),
        out.numel(), codebooks.size(0), codebooks.size(1), codebooks.size(2));
    PK_CHECK_LAUNCH();
  });
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("codebook_lookup_cuda(Tensor idx, Tensor codebooks, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("codebook_lookup_cuda", TORCH_BOX(&protokernels::codebook_lookup_cuda));
}
