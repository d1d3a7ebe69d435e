// Hopper (sm_90a) building blocks: TMA tensor loads into shared memory, mbarriers that count the
// bytes landing, and warpgroup MMAs (wgmma) that read both operands from shared memory laid out
// with the 128-byte swizzle. The GEMM-shaped searches' fast path on H100/H200 (nearest.cu's
// hopper_search_kernel); mma_pipeline.cuh is the portable (sm_80) one.
//
// The device code exists only in the compute_90a pass (__CUDA_ARCH_FEAT_SM90_ALL: wgmma and
// setmaxnreg are arch-specific, not part of sm_90's forward-compatible PTX); elsewhere these
// functions are empty. The host launches the kernels that use them only where hopper_available()
// says so: a 9.x device and a build whose PROTOKERNELS_CUDA_ARCH_LIST held 9.0a.
#pragma once

#include <cuda.h>           // CUtensorMap and its enums (types only: no driver library is linked)
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "async_copy.cuh"
#include "common.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_HOPPER_DEVICE 1
#endif

namespace protokernels {
namespace hopper {

// One TMA box: kBoxRows rows of 128 bytes (32 float32 or 64 half elements), stored with the
// 128-byte swizzle. wgmma reads such a box as a K-major operand through descriptor(); 128 bytes is
// the widest row the swizzle takes, and the fewest boxes per depth.
constexpr int kBoxRows = 128, kRowBytes = 128, kBoxBytes = kBoxRows * kRowBytes;
template <typename T>
constexpr int box_depth() { return kRowBytes / static_cast<int>(sizeof(T)); }

// ---- Host ----

// The device is a Hopper GPU and this build carries sm_90a code for it.
// PROTOKERNELS_CUDA_PORTABLE=1 (read per call, so that a test can set it) forces the portable
// kernels, to test them on a Hopper GPU.
inline bool hopper_available(int device) {
#if defined(PROTOKERNELS_HAS_SM90A)
  const char* portable = std::getenv("PROTOKERNELS_CUDA_PORTABLE");
  if (portable && *portable && std::strcmp(portable, "0") != 0) return false;
  return per_device(device, [&] {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    return major == 9;
  });
#else
  (void)device;
  return false;
#endif
}

// cuTensorMapEncodeTiled from the driver the runtime loaded: the extension links no driver library.
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault,
                                     &found);
#else
    cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &function, cudaEnableDefault, &found);
#endif
    return found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function)
               : nullptr;
  }();
  return encode;
}

template <typename T> constexpr CUtensorMapDataType tensor_map_type();
template <> constexpr CUtensorMapDataType tensor_map_type<float>() {
  return CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
}
template <> constexpr CUtensorMapDataType tensor_map_type<__half>() {
  return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}
template <> constexpr CUtensorMapDataType tensor_map_type<__nv_bfloat16>() {
  return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// A TMA map of a tensor of kRank dimensions, listed innermost first (sizes and strides in
// elements; the innermost of unit stride), read in boxes of `box` elements, stored with the
// 128-byte swizzle (box[0] elements must span at most 128 bytes) or, `swizzled` false, densely
// (box[0] elements a multiple of 16 bytes), and zero-filled outside the tensor (negative
// coordinates included). A box's innermost coordinate must be a multiple of 16 bytes (TMA moves
// 16-byte pieces: an odd float offset is an illegal instruction). False where TMA cannot address
// the tensor: its start and its outer strides must be multiples of 16 bytes (the stride of a
// size-1 dimension does not matter: it is made dense), or the driver refuses the map.
template <typename T, int kRank>
bool tensor_map_tiled(CUtensorMap* map, const void* data, const int64_t (&sizes)[kRank],
                      const int64_t (&strides)[kRank], const uint32_t (&box)[kRank],
                      bool swizzled = true) {
  constexpr int64_t kSize = sizeof(T);
  const auto encode = encode_tiled();
  int64_t elements = 1;
  for (int d = 0; d < kRank; ++d) elements *= sizes[d];
  if (encode == nullptr || elements == 0 || reinterpret_cast<uintptr_t>(data) % 16 != 0)
    return false;
  if (sizes[0] > 1 && strides[0] != 1) return false;
  cuuint64_t dims[kRank], stride_bytes[kRank - 1];
  cuuint32_t boxes[kRank], unit[kRank];
  int64_t dense = ((sizes[0] * kSize + 15) / 16) * 16;  // a size-1 dimension's stride
  for (int d = 0; d < kRank; ++d) {
    dims[d] = static_cast<cuuint64_t>(sizes[d]);
    boxes[d] = box[d];
    unit[d] = 1;
    if (d == 0) continue;
    const int64_t bytes = sizes[d] > 1 ? strides[d] * kSize : dense;
    if (bytes <= 0 || bytes % 16 != 0) return false;
    stride_bytes[d - 1] = static_cast<cuuint64_t>(bytes);
    dense = bytes * sizes[d];
  }
  return encode(map, tensor_map_type<T>(), kRank, const_cast<void*>(data), dims, stride_bytes,
                boxes, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzled ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
         CUDA_SUCCESS;
}

// A TMA map of t (B, R, D) read in boxes of (one batch, box_rows rows, box_depth() elements):
// rows past R and depth past D read as 0 (tensor_map_tiled's conditions).
template <typename T>
bool tensor_map(CUtensorMap* map, const Tensor& t, int box_rows = kBoxRows) {
  return tensor_map_tiled<T, 3>(
      map, t.const_data_ptr(), {t.size(2), t.size(1), t.size(0)},
      {t.stride(2), t.stride(1), t.stride(0)},
      {static_cast<uint32_t>(box_depth<T>()), static_cast<uint32_t>(box_rows), 1});
}

// x (B, N, D) against one y that every batch shares (a 0 batch stride, as a broadcast leaves it):
// where x's batches continue its rows, x becomes one batch of B N rows and y one batch, so that
// tensor_map() can address both (it refuses a 0 batch stride) and one walk covers every batch. A
// caller's (B, N, ...) outputs of unit-stride rows are laid out as (1, B N, ...) already.
inline void fold_shared_batch(Tensor& x, Tensor& y) {
  const int64_t batch = x.size(0), rows = x.size(1), depth = x.size(2);
  const int64_t row_stride = rows > 1 ? x.stride(1) : x.stride(0);
  if (batch <= 1 || y.stride(0) != 0 || (rows > 1 && x.stride(0) != rows * row_stride)) return;
  x = reinterpret(x, {1, batch * rows, depth}, {batch * rows * row_stride, row_stride, x.stride(2)});
  y = reinterpret(y, {1, y.size(1), depth}, {y.size(1) * y.stride(1), y.stride(1), y.stride(2)});
}

// ---- Device ----

// mbarriers: a phase completes when its arrivals and its expected bytes are all in; waiters name
// the parity of the phase they wait for.
__device__ __forceinline__ void barrier_init(uint64_t* bar, int arrivals) {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)),
               "r"(arrivals));
#endif
}
// Makes the initializations visible to the TMA unit (the async proxy); a block barrier follows.
__device__ __forceinline__ void barrier_init_fence() {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// The ring of a producer thread and two consumer warpgroups: full[s] completes on the producer's
// arrival and its TMA bytes, empty[s] on the arrivals of the consumers' 8 warps. Thread 0
// initializes the `stages` pairs; the whole block meets after.
__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty, int stages) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      barrier_init(&full[s], 1);
      barrier_init(&empty[s], 8);
    }
    barrier_init_fence();
  }
  __syncthreads();
}
// One arrival, and `bytes` more to come from TMA in this phase.
__device__ __forceinline__ void arrive_expecting(uint64_t* bar, uint32_t bytes) {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   shared_address(bar)),
               "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void arrive(uint64_t* bar) {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
#endif
}
__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
#if defined(PK_HOPPER_DEVICE)
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// TMA: the box of `map` at coordinates (depth c0, row c1, batch c2) into dst (1024-byte aligned,
// for the swizzle), its bytes counted on bar.
__device__ __forceinline__ void load_box(void* dst, const CUtensorMap* map, uint64_t* bar, int c0,
                                         int c1, int c2) {
#if defined(PK_HOPPER_DEVICE)
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#endif
}

// The same for a 4-D map: the box at coordinates (c0, c1, c2, c3), innermost first.
__device__ __forceinline__ void load_box(void* dst, const CUtensorMap* map, uint64_t* bar, int c0,
                                         int c1, int c2, int c3) {
#if defined(PK_HOPPER_DEVICE)
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2),
      "r"(c3)
      : "memory");
#endif
}

// The wgmma descriptor of a K-major operand in a swizzled box, starting at `tile` (a row that is a
// multiple of 8, plus a depth offset of a multiple of 32 bytes within the 128-byte row: the
// swizzle is a function of the address bits, so stepping along the depth inside a row is adding
// to the start). Fields: start >> 4; leading offset (unused with swizzling, 1); stride offset
// 1024 bytes >> 4 (from one 8-row group to the next); layout 1 = 128-byte swizzle.
// A descriptor is built in two halves: the low word (start, leading offset) from the address, the
// high word (stride offset, layout) a constant.
__device__ __forceinline__ uint32_t descriptor_low(const void* tile) {
  return ((shared_address(tile) & 0x3FFFF) >> 4) | (1u << 16);
}
__device__ __forceinline__ uint64_t descriptor_of_low(uint32_t low) {
  return low | (uint64_t{(1024 >> 4) | (1u << 30)} << 32);
}
__device__ __forceinline__ uint64_t descriptor(const void* tile) {
  return descriptor_of_low(descriptor_low(tile));
}
// The descriptor `bytes` (a multiple of 16) past the one whose low word is `low`: the start field
// is address bits 4-17 and shared memory ends below 2^18, so the sum never carries out of it.
// Built from one address a box, a wgmma's descriptor is an add; each built from its own address
// (a conversion, a mask, a shift, an OR, and the constant high word each time), they and the ring
// slot's divisions made ~180 instructions a box of 8 wgmmas, 87 since (RESULTS.md "The walk's
// instructions").
__device__ __forceinline__ uint64_t descriptor_at(uint32_t low, int bytes) {
  return descriptor_of_low(low + static_cast<uint32_t>(bytes >> 4));
}

// wgmma.fence: the accumulators' registers, written by other instructions, are ready for the MMAs.
__device__ __forceinline__ void mma_fence() {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mma_commit() {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed groups of this warpgroup's MMAs are in flight.
template <int N>
__device__ __forceinline__ void mma_wait() {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// The compiler does not know that wgmma writes its registers asynchronously: this ties each
// accumulator register to this point, so that no read of it moves above the wait before it.
template <int N>
__device__ __forceinline__ void hold_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Likewise for A fragments that wgmma reads from registers: they keep their registers, unchanged,
// up to this point (after the wait), so that nothing reuses them while the MMAs read them.
template <int N, int M, int K>
__device__ __forceinline__ void hold_fragments(uint32_t (&a)[N][M][K]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j)
#pragma unroll
      for (int k = 0; k < K; ++k) asm volatile("" : "+r"(a[i][j][k])::"memory");
}

#define PK_WGMMA_64x128_OPERANDS                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "  \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "   \
  "%56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1"
#define PK_WGMMA_64x128_REGISTERS(d)                                                            \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),           \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),   \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),             \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),             \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),             \
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),             \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),             \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),             \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),             \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),             \
      "+f"(d[62]), "+f"(d[63])

// d (64 x 128, float32, wgmma's accumulator layout) = A (64 rows x 32 bytes of depth) . B (128
// rows x 32 bytes)^T, + d if `accumulate`: one k8 step for float32 (read as TF32: the tensor cores
// take the top 19 bits), one k16 step for the half types.
template <typename T>
__device__ __forceinline__ void mma_64x128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
#if defined(PK_HOPPER_DEVICE)
  if constexpr (std::is_same_v<T, float>) {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 " PK_WGMMA_64x128_OPERANDS
                 ";\n}\n"
                 : PK_WGMMA_64x128_REGISTERS(d)
                 : "l"(a), "l"(b), "r"(accumulate));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " PK_WGMMA_64x128_OPERANDS
                 ", 0, 0;\n}\n"
                 : PK_WGMMA_64x128_REGISTERS(d)
                 : "l"(a), "l"(b), "r"(accumulate));
  } else {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " PK_WGMMA_64x128_OPERANDS
                 ", 0, 0;\n}\n"
                 : PK_WGMMA_64x128_REGISTERS(d)
                 : "l"(a), "l"(b), "r"(accumulate));
  }
#endif
}
// The same TF32 step with A from registers: a[4] holds the thread's elements of A's 64 x 8 slice
// in wgmma's register layout (warp w, lane 4 g + t: rows 16 w + g and 16 w + g + 8, columns t and
// t + 4, in the order (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)). wgmma reads them
// asynchronously: they must keep their values until the group's wait (hold_fragments). d = the
// product, without d's value, where `accumulate` is 0.
__device__ __forceinline__ void mma_64x128_tf32_rs(float (&d)[64], const uint32_t (&a)[4],
                                                   uint64_t b, int accumulate = 1) {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 "
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
               "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "
               "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "
               "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
               "{%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
               : PK_WGMMA_64x128_REGISTERS(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
#endif
}
// The same with 64 columns of B (a 64-row box): d holds the thread's 32 accumulators, column
// 8 j + 2 (lane % 4) + e in d[4 j + 2 h + e] (as in the 128-column form).
__device__ __forceinline__ void mma_64x64_tf32_rs(float (&d)[32], const uint32_t (&a)[4],
                                                  uint64_t b, int accumulate = 1) {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
               "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
               "{%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
                 "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
                 "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
                 "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
                 "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
                 "+f"(d[31])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
#endif
}
#undef PK_WGMMA_64x128_OPERANDS
#undef PK_WGMMA_64x128_REGISTERS

// One step of a consumer's MMAs with A from registers: for each k8 step j (B's 32 bytes of depth
// in K-major swizzled boxes from b_box: a box row holds 4 such steps, the next 4 are the next
// box's) and each accumulator set m, product(acc[m], a[j][m], B's descriptor) (an _rs MMA above);
// then waits for them and keeps acc and a in their registers up to the wait (hold_registers,
// hold_fragments).
template <int kSteps, int kSets, int kAccumulators, typename Product>
__device__ __forceinline__ void multiply_from_registers(float (&acc)[kSets][kAccumulators],
                                                        uint32_t (&a)[kSteps][kSets][4],
                                                        const unsigned char* b_box,
                                                        Product&& product) {
  mma_fence();
  const uint32_t b_low = descriptor_low(b_box);
#pragma unroll
  for (int j = 0; j < kSteps; ++j) {
    constexpr int kBoxSteps = kRowBytes / 32;
    const uint64_t b = descriptor_at(b_low, j / kBoxSteps * kBoxBytes + 32 * (j % kBoxSteps));
#pragma unroll
    for (int m = 0; m < kSets; ++m) product(acc[m], a[j][m], b);
  }
  mma_commit();
  mma_wait<0>();
#pragma unroll
  for (int m = 0; m < kSets; ++m) hold_registers(acc[m]);
  hold_fragments(a);
}

// "tf32x3" splits a float v into its TF32 part (the top 19 bits, what the tensor cores read of v)
// and the rest, lo = v - hi, exact in float: three TF32 products hi.hi + hi.lo + lo.hi are within
// ~1e-6 of the float32 product (the portable kernels' split, mma_pipeline.cuh). An infinite v is
// its own hi part (lo 0, not inf - inf); NaN stays NaN.
__device__ __forceinline__ float tf32_low_part(float v) {
  const float hi = __uint_as_float(__float_as_uint(v) & 0xFFFFE000u);
  return v == hi ? 0.0f : v - hi;
}

// The byte offset of element (row r, column col) of a box of T: the 128-byte swizzle puts a
// row's 16-byte chunk j at j ^ (r % 8). (split_box spells it with its lane's chunk and r % 8:
// through this function the split search kernel took 32 more instructions.)
template <typename T = float>
__device__ __forceinline__ int box_offset(int r, int col) {
  constexpr int kSize = static_cast<int>(sizeof(T)), kChunk = 16 / kSize;  // a chunk's elements
  return r * kRowBytes + (((col / kChunk) ^ (r % 8)) << 4) + kSize * (col % kChunk);
}

// One warpgroup's thread `thread` (0-127) of the 128 writing a float32 box's low parts (kBytes:
// the box's, or a part's whole 1024-byte swizzle patterns) into low_box at the same offsets (so
// in the same swizzled layout): the B operand of hi.lo products.
template <int kBytes = kBoxBytes>
__device__ __forceinline__ void write_low_parts(unsigned char* low_box, const unsigned char* box,
                                                int thread) {
#pragma unroll
  for (int q = 0; q < kBytes / 16 / 128; ++q) {
    const int at = 16 * (thread + 128 * q);
    const float4 v = *reinterpret_cast<const float4*>(box + at);
    *reinterpret_cast<float4*>(low_box + at) = make_float4(
        tf32_low_part(v.x), tf32_low_part(v.y), tf32_low_part(v.z), tf32_low_part(v.w));
  }
}

// Makes this thread's shared-memory writes visible to the async proxy (wgmma's operand reads).
__device__ __forceinline__ void fence_async_shared() {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// A barrier of `threads` threads (named barrier `id`, 1 to 15: 0 is __syncthreads') that returns
// whether `value` holds in all of them: one warpgroup's threads meet here without the others.
__device__ __forceinline__ bool all_of(bool value, int id, int threads) {
  uint32_t all = 0;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 q, %1, 0;\n bar.red.and.pred p, %2, %3, q;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(all)
      : "r"(uint32_t{value}), "r"(id), "r"(threads)
      : "memory");
  return all != 0;
}

// A barrier of `threads` threads (named barrier `id`, 1 to 15).
__device__ __forceinline__ void sync_threads(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Moves registers between the warpgroups of a block (every thread of the warpgroup executes it):
// a producer that only issues TMA gives its registers to the consumers' accumulators.
template <int REGISTERS>
__device__ __forceinline__ void release_registers() {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
#endif
}
template <int REGISTERS>
__device__ __forceinline__ void claim_registers() {
#if defined(PK_HOPPER_DEVICE)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
#endif
}

// ---- The row-block walk: x's 128 rows stay in shared memory, y's column tiles stream past ----

// A block of kWalkThreads owns kBoxRows (128) rows of x, loaded once by TMA and kept in shared
// memory for the whole walk: y's column tiles stream past them, so x's rows are not re-read per
// column tile (a 128 x 128 tile that re-streams both reads twice the bytes from L2). Warpgroups 1
// and 2 are the consumers and take the column tiles in turn (1 the even ones, 2 the odd ones):
// each multiplies all 128 rows by its tile (two m64n128 wgmmas per 32 bytes of depth,
// accumulators in registers) and then runs its op's epilogue on the tile (the search's fold,
// sqdist's stores) while the other consumer's MMAs have the tensor cores. Each consumer has a ring
// of its own, which one thread of warpgroup 0 fills with its tiles' boxes (128 columns x 128
// bytes of depth) by TMA: a ring shared in tile order would let a consumer that skipped the
// other's tiles mistake a stage's phase parity two rounds on (the first version hung so).
// Shared memory: x's boxes (depth_boxes x 16 KB), the two rings (2 x stages x 16 KB), for split
// products one box per consumer (below), the mbarriers, then the op's own bytes (extra());
// walk_stages() picks the deepest rings that fit.
//
// Split products (float32 at "tf32x3": x.y as hi.hi + hi.lo + lo.hi of TF32 parts,
// tf32_low_part): the tensor cores read x's and y's boxes as their hi parts; a consumer writes the
// low parts of each y box into a box of its own (y's lo) and keeps the low parts of x's slice in
// registers (wgmma's A operand from registers). Three times the MMAs of "tf32"; a box's hi.hi
// MMAs run while its low parts are split, and its MMAs finish before the consumer reuses its low
// box, so a consumer has one box in flight (the other consumer's MMAs keep the tensor cores busy
// meanwhile). The split relies on the tensor cores truncating a float to its top 19 bits, as the
// tests' 1e-5 bound against float64 confirms on the H200. H200, B8 N4096 M4096 D128: sqdist
// 0.543 ms against Triton's 0.568; nearest N65536 M8192 D128 1.53 against 1.98 (RESULTS.md
// "Split TF32 products on the walk").
constexpr int kWalkThreads = 384;  // producers, consumer, consumer
constexpr int kWalkAlign = 1024;   // the swizzle's pattern repeats every 1024 bytes
constexpr int kExtraAlign = 128;   // the op's own shared memory starts at a multiple of this
constexpr int kMaxStages = 4;      // per ring
// Register budgets after the hand-over (multiples of 8; 128 x 40 + 256 x 232 = the 64512 that 384
// threads at a launch bound of 168 hold).
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;

constexpr size_t walk_smem_bytes(int depth_boxes, int stages, bool split, size_t extra_bytes) {
  return kWalkAlign + size_t(depth_boxes + 2 * stages + (split ? 2 : 0)) * kBoxBytes +
         (4 * stages + 1) * sizeof(uint64_t) + kExtraAlign + extra_bytes;
}

// The ring depth for x's rows of `boxes` 128-byte boxes, split products or not, and an op's
// `extra_bytes` on this device: the most stages per ring (up to kMaxStages) that fit, or 0 where
// fewer than 2 do (on a GPU with 227 KB of shared memory a block: sqdist's forward, 3 KB of its
// own, D > 288 in float32, 576 in the half types, 224 with split products; the search, 1 KB, D >
// 320, 640, 256).
inline int walk_stages(int device, int64_t boxes, bool split, size_t extra_bytes) {
  const int64_t max_bytes = per_device(device, [&] {
    int bytes = 0;
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return bytes;
  });
  for (int stages = kMaxStages; stages >= 2; --stages)
    if (int64_t(walk_smem_bytes(int(boxes), stages, split, extra_bytes)) <= max_bytes)
      return stages;
  return 0;
}

// The deepest rows (bytes) a walk with `extra_bytes` takes on this device, with split products or
// not; 0 where none runs.
inline int64_t walk_depth_bytes(int device, bool split, size_t extra_bytes) {
  if (!hopper_available(device)) return 0;
  int64_t boxes = 0;
  while (walk_stages(device, boxes + 1, split, extra_bytes) > 0) ++boxes;
  return boxes * kRowBytes;
}

// Lets a walk kernel ask for the most shared memory the device gives a block (once per device and
// kernel: a template argument, so that each kernel has a record of its own; kernels of one
// signature share a type).
template <auto kKernel>
void allow_walk_smem(int device) {
  once_per_device(device, [&] {
    int max_bytes = 0;
    cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_bytes);
  });
}

// A walk's shape, as its kernel sees it (the head of each walk kernel's arguments).
struct WalkShape {
  int rows, cols, depth_boxes, stages;  // stages per ring
  int row_tiles, col_tiles, tiles_per_split, splits;  // splits: of the columns, across blocks
};

// A planned launch: the two maps, the shape, the grid and its shared memory, and whether the
// products are split (float32 at "tf32x3": the kernel's kSplit).
struct WalkPlan {
  CUtensorMap x_map, y_map;
  WalkShape shape;
  unsigned blocks;
  size_t smem_bytes;
  bool split;
};

// Plans the walk of x's rows (B, N, D) past y's (B, M, D) at `precision` for an op with
// `extra_bytes` of shared memory of its own, folding a y shared by every batch first
// (fold_shared_batch: x and y change), or returns false where it cannot run: products wgmma does
// not give (float32 "ieee"; float32 takes "tf32", one TF32 product, and "tf32x3", split products;
// the half types any precision), not a Hopper GPU or not an sm_90a build, nothing to walk, x or y
// not addressable by TMA, x's 128 rows too deep to stay in shared memory (walk_stages), or counts
// past int.
template <typename T>
bool plan_walk(WalkPlan* plan, Tensor& x, Tensor& y, Precision precision, size_t extra_bytes) {
  const int device = x.get_device_index();
  if ((std::is_same_v<T, float> && precision == Precision::kIeee) || !hopper_available(device))
    return false;
  const bool split = std::is_same_v<T, float> && precision == Precision::kTf32x3;
  fold_shared_batch(x, y);
  const int64_t batch = x.size(0), rows = x.size(1), cols = y.size(1), depth = x.size(2);
  if (cols == 0 || depth == 0 || rows >= kIntLimit || cols >= kIntLimit) return false;
  const int64_t boxes = (depth + box_depth<T>() - 1) / box_depth<T>();
  const int stages = walk_stages(device, boxes, split, extra_bytes);
  if (stages == 0) return false;
  if (!tensor_map<T>(&plan->x_map, x) || !tensor_map<T>(&plan->y_map, y)) return false;

  const int64_t row_tiles = (rows + kBoxRows - 1) / kBoxRows;
  const int64_t col_tiles = (cols + kBoxRows - 1) / kBoxRows;
  const int64_t row_blocks = batch * row_tiles;
  // One block per SM; a second wave's worth of blocks evens out the tail.
  const ColumnSplits column_splits = split_columns(col_tiles, row_blocks, 2 * sm_count(x));
  if (column_splits.tiles_per_split * boxes >= kIntLimit ||
      row_blocks * column_splits.splits >= kIntLimit)
    return false;
  plan->shape = {static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(boxes), stages,
                 static_cast<int>(row_tiles), static_cast<int>(col_tiles),
                 static_cast<int>(column_splits.tiles_per_split),
                 static_cast<int>(column_splits.splits)};
  plan->blocks = static_cast<unsigned>(row_blocks * column_splits.splits);
  plan->smem_bytes = walk_smem_bytes(int(boxes), stages, split, extra_bytes);
  plan->split = split;
  return true;
}

// Launches walk kernel kKernel(x_map, y_map, args) as planned, or kSplitKernel where the plan
// splits the products (float32's kernel<float, true>; the half types pass kernel<T, false> twice).
template <auto kKernel, auto kSplitKernel, typename Args>
void launch_walk(const WalkPlan& plan, const Args& args, int device, cudaStream_t stream) {
  const auto kernel = plan.split ? kSplitKernel : kKernel;
  // The most any launch asks for: x's rows and the rings.
  plan.split ? allow_walk_smem<kSplitKernel>(device) : allow_walk_smem<kKernel>(device);
  kernel<<<plan.blocks, kWalkThreads, plan.smem_bytes, stream>>>(plan.x_map, plan.y_map, args);
  PK_CHECK_LAUNCH();
}

// p advanced to the next multiple of `align` bytes (a power of 2) of shared memory. By pointer
// arithmetic, not through an integer: the compiler then still knows that the result points into
// shared memory and reads it with shared loads (LDS). Through uintptr_t every walk pointer became
// generic, and the search's fold read its column norms with generic loads (LD).
template <int kAlign>
__device__ __forceinline__ unsigned char* shared_aligned(unsigned char* p) {
  return p + ((kAlign - shared_address(p) % kAlign) % kAlign);
}

// The first address of dynamic shared memory where a swizzled box may start (TMA's 128-byte
// swizzle pattern repeats every kWalkAlign bytes; the launch asks for kWalkAlign bytes more).
__device__ __forceinline__ unsigned char* swizzle_aligned(unsigned char* smem_raw) {
  return shared_aligned<kWalkAlign>(smem_raw);
}

// A block's part of the walk: 128 rows of one batch, against one split's column tiles.
struct WalkBlock {
  int batch, row0, tile0, tiles;
  __device__ explicit WalkBlock(const WalkShape& shape) {
    const int split = static_cast<int>(blockIdx.x % shape.splits);
    const int row_block = static_cast<int>(blockIdx.x / shape.splits);
    batch = row_block / shape.row_tiles;
    row0 = row_block % shape.row_tiles * kBoxRows;
    tile0 = split * shape.tiles_per_split;
    tiles = min(shape.tiles_per_split, shape.col_tiles - tile0);
  }
};

// A place in a ring: the slot of the next box and the parity of that slot's fill. Consumer c's
// i-th box (counted over its tiles c, c + 2, ...) is slot i % stages of its ring, filled for the
// (i / stages)-th time; stepping a place along costs an add and a compare, where computing them
// from i took two divisions by the run-time stage count a box (~30 instructions).
struct RingPlace {
  int slot = 0;
  uint32_t parity = 0;
  __device__ __forceinline__ void advance(int stages) {
    if (++slot == stages) slot = 0, parity ^= 1;
  }
};

// The walk's shared memory and its two roles; each role keeps its RingPlace in consumer c's ring.
struct RowBlockWalk {
  unsigned char* x_tile;
  unsigned char* rings;     // consumer c's: stages from c * stages
  unsigned char* low_boxes;  // split products: consumer c's box of y's low parts at c
  uint64_t* full;
  uint64_t* empty;
  uint64_t* x_full;
  int boxes, stages;

  __device__ RowBlockWalk(unsigned char* smem_raw, int depth_boxes, int ring_stages, bool split)
      : boxes(depth_boxes), stages(ring_stages) {
    x_tile = swizzle_aligned(smem_raw);
    rings = x_tile + size_t(boxes) * kBoxBytes;
    low_boxes = rings + size_t(2 * stages) * kBoxBytes;
    full = reinterpret_cast<uint64_t*>(low_boxes + (split ? 2 * kBoxBytes : 0));
    empty = full + 2 * stages;
    x_full = empty + 2 * stages;
  }
  // The op's own shared memory, after the walk's (kExtraAlign-aligned).
  __device__ unsigned char* extra() const {
    return shared_aligned<kExtraAlign>(reinterpret_cast<unsigned char*>(x_full + 1));
  }

  // Thread 0's; a block barrier follows before any role starts.
  __device__ void init() const {
    if (threadIdx.x != 0) return;
    for (int s = 0; s < 2 * stages; ++s) {
      barrier_init(&full[s], 1);   // the producer's arrival; then the bytes
      barrier_init(&empty[s], 4);  // the 4 warps of the consumer that read it
    }
    barrier_init(x_full, 1);
    barrier_init_fence();
  }

  // Warpgroup 0's role: it gives its registers away; warp c's first thread fills consumer c's
  // ring with the boxes of the block's tiles c, c + 2, ..., warp 0's first loads x's rows too.
  template <typename T>
  __device__ void produce(const CUtensorMap* x_map, const CUtensorMap* y_map,
                          const WalkBlock& block) const {
    const int row0 = block.row0, batch = block.batch, tile0 = block.tile0, tiles = block.tiles;
    release_registers<kProducerRegisters>();
    const int c = threadIdx.x / 32;
    if (c >= 2 || threadIdx.x % 32 != 0) return;
    if (c == 0) {
      arrive_expecting(x_full, boxes * kBoxBytes);
      for (int k = 0; k < boxes; ++k)
        load_box(x_tile + size_t(k) * kBoxBytes, x_map, x_full, k * box_depth<T>(), row0, batch);
    }
    RingPlace place;
    int filled = 0;  // boxes loaded so far: a slot is waited for from its second fill on
    for (int tile = c; tile < tiles; tile += 2)
      for (int k = 0; k < boxes; ++k, ++filled, place.advance(stages)) {
        const int slot = c * stages + place.slot;
        if (filled >= stages) wait(&empty[slot], place.parity ^ 1);
        arrive_expecting(&full[slot], kBoxBytes);
        load_box(rings + size_t(slot) * kBoxBytes, y_map, &full[slot], k * box_depth<T>(),
                 (tile0 + tile) * kBoxRows, batch);
      }
  }

  // A consumer's first step: its registers, then x's rows in shared memory.
  __device__ void start_consumer() const {
    claim_registers<kConsumerRegisters>();
    wait(x_full, 0);
  }

  // Consumer c's next tile: acc[m] = x's rows 64 m .. 64 m + 63 times the tile's 128 columns
  // (acc_row() below says which thread holds which); kSplit: split products (float32 only).
  // on_box(box, k) runs while the k-th box's MMAs are in flight, before the box goes back to the
  // producer: it may read the box (128 columns x 128 bytes, swizzled). place: the consumer's
  // place in its ring, carried from tile to tile.
  template <typename T, bool kSplit, typename OnBox>
  __device__ __forceinline__ void multiply(int c, RingPlace& place, float (&acc)[2][64],
                                           OnBox&& on_box) const {
    static_assert(!kSplit || std::is_same_v<T, float>, "split products are float32's");
    const int lane = threadIdx.x % 32;
    int in_flight = -1;  // the slot whose MMAs may still run (unsplit products)
    for (int k = 0; k < boxes; ++k) {
      const int slot = c * stages + place.slot;
      wait(&full[slot], place.parity);
      place.advance(stages);
      const unsigned char* b_box = rings + size_t(slot) * kBoxBytes;
      const unsigned char* a_box = x_tile + size_t(k) * kBoxBytes;
      if constexpr (kSplit) {
        // hi.hi first: the low parts are split while those MMAs run.
        mma_fence();
        multiply_box<T>(acc, a_box, b_box, k);
        mma_commit();
        uint32_t a_low[kRowBytes / 32][2][4];
        const unsigned char* low_box = split_box(c, a_box, b_box, a_low);
        mma_fence();
        const uint32_t a_word = descriptor_low(a_box), b_word = descriptor_low(b_box),
                       low_word = descriptor_low(low_box);
#pragma unroll
        for (int step = 0; step < kRowBytes / 32; ++step) {
          const uint64_t b = descriptor_at(b_word, 32 * step);
          const uint64_t b_low = descriptor_at(low_word, 32 * step);
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            mma_64x128<T>(acc[m], descriptor_at(a_word, m * 64 * kRowBytes + 32 * step), b_low,
                          1);
            mma_64x128_tf32_rs(acc[m], a_low[step][m], b);
          }
        }
        mma_commit();
        on_box(b_box, k);
        // The box's MMAs are done with the stage, the low box and a_low's registers.
        mma_wait<0>();
        hold_fragments(a_low);
        if (lane == 0) arrive(&empty[slot]);
      } else {
        mma_fence();
        multiply_box<T>(acc, a_box, b_box, k);
        mma_commit();
        on_box(b_box, k);
        // The previous stage's MMAs are done reading it: hand it back to the producer.
        mma_wait<1>();
        if (in_flight >= 0 && lane == 0) arrive(&empty[in_flight]);
        in_flight = slot;
      }
    }
    mma_wait<0>();
    hold_registers(acc[0]);
    hold_registers(acc[1]);
    if (!kSplit && lane == 0) arrive(&empty[in_flight]);
  }

 private:
  // acc (+)= the k-th box of x's rows times the box of y's columns: two m64n128 wgmmas per 32
  // bytes of depth (the first box's first step starts the sums).
  template <typename T>
  __device__ __forceinline__ static void multiply_box(float (&acc)[2][64],
                                                      const unsigned char* a_box,
                                                      const unsigned char* b_box, int k) {
    const uint32_t a_low = descriptor_low(a_box), b_low = descriptor_low(b_box);
#pragma unroll
    for (int step = 0; step < kRowBytes / 32; ++step) {
      const uint64_t b = descriptor_at(b_low, 32 * step);
#pragma unroll
      for (int m = 0; m < 2; ++m)
        mma_64x128<T>(acc[m], descriptor_at(a_low, m * 64 * kRowBytes + 32 * step), b,
                      k > 0 || step > 0);
    }
  }

  // Split products, while a box's hi.hi MMAs run: consumer c's 128 threads write the low parts of
  // y's box b_box into the consumer's low box (same offsets, so the same swizzled layout) and
  // return it, and each thread reads its A fragments of x's box a_box (wgmma's register layout,
  // see mma_64x128_tf32_rs) as their low parts: a_low[step][m] for depth step `step`, rows
  // 64 m + ...
  __device__ __forceinline__ const unsigned char* split_box(
      int c, const unsigned char* a_box, const unsigned char* b_box,
      uint32_t (&a_low)[kRowBytes / 32][2][4]) const {
    const int thread = threadIdx.x % 128, warp = thread / 32, g = thread % 32 / 4, t = thread % 4;
    unsigned char* low_box = low_boxes + size_t(c) * kBoxBytes;
    write_low_parts(low_box, b_box, thread);
    // Element (row, chunk, word t) of the box at box_offset(); row % 8 == g here.
#pragma unroll
    for (int step = 0; step < kRowBytes / 32; ++step)
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 64 * m + 16 * warp + g + 8 * (e % 2), chunk = 2 * step + e / 2;
          const float v = *reinterpret_cast<const float*>(a_box + row * kRowBytes +
                                                          ((chunk ^ g) << 4) + 4 * t);
          a_low[step][m][e] = __float_as_uint(tf32_low_part(v));
        }
    fence_async_shared();
    sync_threads(1 + c, 128);  // named barriers 1 and 2: the consumer's low box is whole
    return low_box;
  }
};

// A consumer thread's rows in its tile's accumulators (wgmma's m64nN layout, two m64 halves):
// r = 2 m + h (kAccRows of them) is row 64 m + 16 warp + lane / 4 + 8 h, and acc[m][4 j + 2 h + e]
// is its column 8 j + 2 (lane % 4) + e.
constexpr int kAccRows = 4;
__device__ __forceinline__ int acc_row(int r) {
  const int thread = threadIdx.x % 128;
  return 64 * (r / 2) + 16 * (thread / 32) + thread % 32 / 4 + 8 * (r % 2);
}

// The sum of squares of a box row's 128 bytes (in any order: the swizzle permutes a row's 16-byte
// chunks), in float32. Each row starts at its own chunk (its row % 8), so that the 8 threads of a
// quarter warp summing 8 consecutive rows read 8 different banks' chunks, not one 8 ways.
template <typename T>
__device__ __forceinline__ float row_squares(const unsigned char* row) {
  const uint32_t first = shared_address(row) / kRowBytes;
  float sum = 0.0f;
#pragma unroll
  for (int chunk = 0; chunk < kRowBytes / 16; ++chunk) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + 16 * ((first + chunk) % 8u));
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if constexpr (std::is_same_v<T, float>) {
        const float a = __uint_as_float(words[w]);
        sum = fmaf(a, a, sum);
      } else {
        T pair[2];
        memcpy(pair, &words[w], sizeof(pair));
        const float a = widen(pair[0]), b = widen(pair[1]);
        sum = fmaf(b, b, fmaf(a, a, sum));
      }
    }
  }
  return sum;
}

}  // namespace hopper
}  // namespace protokernels
