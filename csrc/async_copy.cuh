// cp.async (sm_80 and later): copies from global to shared memory that run in the background
// while the thread goes on, grouped and waited for in order. The loaders of mma_pipeline.cuh and
// the persistent Sinkhorn kernel keep several steps' data in flight this way.
#pragma once

#include <cstdint>

namespace protokernels {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies BYTES (4, 8 or 16) from global to shared memory asynchronously; of them, the first
// `valid` are read and the rest zero-filled.
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, int valid) {
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
                 "l"(src), "r"(valid));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(dst)),
                 "l"(src), "n"(BYTES), "r"(valid));
  }
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// The same for a count known at run time, 0 to 7 (the instruction takes an immediate).
__device__ __forceinline__ void wait_async(int n) {
  switch (n) {
    case 0: return wait_async<0>();
    case 1: return wait_async<1>();
    case 2: return wait_async<2>();
    case 3: return wait_async<3>();
    case 4: return wait_async<4>();
    case 5: return wait_async<5>();
    case 6: return wait_async<6>();
    default: return wait_async<7>();
  }
}

}  // namespace protokernels
