// Shared by every op's .cu file: argument checks, current stream, dtype dispatch, precision.
//
// Only PyTorch's stable ABI is used (torch/csrc/stable, the C shim), so the extension built against
// one torch >= 2.10 loads in every later one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace protokernels {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The Python wrappers validate every argument first (ValueError/TypeError); these checks guard
// direct torch.ops.protokernels.*_cuda calls and name the op and argument in the message.
#define PK_CHECK(cond, op, ...) STD_TORCH_CHECK(cond, op, ": ", __VA_ARGS__)
#define PK_CHECK_CUDA(op, name, t) \
  PK_CHECK((t).is_cuda(), op, "argument '" name "' must be a CUDA tensor")
#define PK_CHECK_DIM(op, name, t, n) \
  PK_CHECK((t).dim() == (n), op, "argument '" name "' must be ", n, "-D, got ", (t).dim(), "-D")
#define PK_CHECK_SAME(op, what, name_a, a, name_b, b)                                    \
  PK_CHECK((a) == (b), op, "arguments '" name_a "' and '" name_b "' must have the same " \
           what)

// Every kernel launch is followed by this: a bad launch raises instead of failing later. Written
// on the CUDA runtime, not torch's STD_CUDA_KERNEL_LAUNCH_CHECK: that macro first appeared in
// headers after 2.11, and the source build must work against every torch >= 2.10.
#define PK_CHECK_LAUNCH()                                                                \
  do {                                                                                   \
    const cudaError_t launch_error = cudaGetLastError();                                 \
    STD_TORCH_CHECK(launch_error == cudaSuccess, "protokernels: CUDA kernel launch failed: ", \
                    cudaGetErrorString(launch_error));                                   \
  } while (0)

// x (B, N, D) and y (B, M, D): CUDA tensors of one device, dtype, batch and feature size.
inline void check_batched_rows(const char* op, const Tensor& x, const Tensor& y) {
  PK_CHECK_CUDA(op, "x", x);
  PK_CHECK_CUDA(op, "y", y);
  PK_CHECK_DIM(op, "x", x, 3);
  PK_CHECK_DIM(op, "y", y, 3);
  PK_CHECK_SAME(op, "device", "x", x.device(), "y", y.device());
  PK_CHECK_SAME(op, "dtype", "x", x.scalar_type(), "y", y.scalar_type());
  PK_CHECK_SAME(op, "batch size", "x", x.size(0), "y", y.size(0));
  PK_CHECK_SAME(op, "feature size D", "x", x.size(2), "y", y.size(2));
}

// Squared distances over at most this many features are formed directly as sum((x - y)^2): the
// expanded formula cancels where x ~ y. The same rule as DIRECT_DEPTH in protokernels/_numerics.py.
constexpr int64_t kDirectDepth = 8;

// Grid-stride kernels: kThreads per block, at most kMaxBlocks blocks (the loops cover the rest).
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

inline unsigned blocks_for(int64_t work, int per_block = kThreads) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

inline int sm_count(const Tensor& t) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device_index());
  return sms;
}

// Counts and indices a kernel keeps in int stay below this.
constexpr int64_t kIntLimit = int64_t{1} << 31;

// Column tiles split over blocks when the row blocks alone are fewer than `blocks_wanted` (each
// block walks its row tiles over one split's column tiles; a search's splits meet by atomicMin).
struct ColumnSplits {
  int64_t tiles_per_split, splits;
};
inline ColumnSplits split_columns(int64_t col_tiles, int64_t row_blocks, int64_t blocks_wanted) {
  const int64_t splits_at_most =
      std::max<int64_t>(1, std::min(col_tiles, blocks_wanted / row_blocks));
  const int64_t tiles_per_split = (col_tiles + splits_at_most - 1) / splits_at_most;
  return {tiles_per_split,
          tiles_per_split > 0 ? (col_tiles + tiles_per_split - 1) / tiles_per_split : 0};
}

// compute()'s value for `device`, computed on the first call for that device and kept: per-device
// facts whose queries cost more host time than the launch they serve (a kernel's attributes, its
// occupancy). Keyed by the lambda's type, so each lambda expression, in each template
// instantiation, has its own record. Two threads arriving first together may both compute it:
// compute must be idempotent. (Not std::call_once: it binds pthread_once@GLIBC_2.34 where glibc
// is newer, and the wheel promises glibc 2.28.)
template <typename Compute>
auto per_device(int device, Compute&& compute) -> decltype(compute()) {
  using Value = decltype(compute());
  constexpr int kDevices = 64;
  static Value values[kDevices] = {};
  static std::atomic<bool> known[kDevices] = {};
  if (device < 0 || device >= kDevices) return compute();
  if (!known[device].load(std::memory_order_acquire)) {
    values[device] = compute();
    known[device].store(true, std::memory_order_release);
  }
  return values[device];
}

// Runs setup() once per device (a kernel's attributes), as per_device computes a value.
template <typename Setup>
void once_per_device(int device, Setup&& setup) {
  per_device(device, [&] {
    setup();
    return true;
  });
}

// t's elements (from its storage offset) seen with these sizes and strides, of any rank: a view
// for the kernels, not tracked by autograd, made without the dispatcher (the C shim's
// _reinterpret_tensor, as inductor's generated code uses; its as_strided keeps t's rank).
inline Tensor reinterpret(const Tensor& t, std::initializer_list<int64_t> sizes,
                          std::initializer_list<int64_t> strides) {
  STD_TORCH_CHECK(sizes.size() == strides.size(), "reinterpret: one stride per size");
  AtenTensorHandle view = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch__reinterpret_tensor(
      t.get(), static_cast<int64_t>(sizes.size()), sizes.begin(), strides.begin(), 0, &view));
  return Tensor(view);
}

inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// A zero-filled new tensor (torch::stable::new_zeros' result) cleared by cudaMemsetAsync on
// like's current stream: new_zeros fills through the dispatcher, 24 us of host time a call in a
// profile of codebook_stats on the GPU machine (RESULTS.md "The in-model grid, sixteenth
// session"), where the memset is one driver call. Zero bits are 0 in every dtype used here.
inline Tensor new_zeroed(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                         ScalarType dtype) {
  Tensor t = torch::stable::new_empty(like, sizes, dtype);
  if (t.numel() > 0) {
    torch::stable::accelerator::DeviceGuard guard(like.get_device_index());
    const cudaError_t error = cudaMemsetAsync(t.mutable_data_ptr(), 0,
                                              t.numel() * t.element_size(), current_stream(like));
    STD_TORCH_CHECK(error == cudaSuccess, "protokernels: cudaMemsetAsync failed: ",
                    cudaGetErrorString(error));
  }
  return t;
}

// Static dispatch over the floating dtypes: calls f(T{}) with T the element type. (Take data as
// static_cast<T*>(t.mutable_data_ptr()): the stable ABI exports no typed accessor for half types.)
template <typename F>
void dispatch_floating(ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    case ScalarType::Half: return f(__half{});
    case ScalarType::BFloat16: return f(__nv_bfloat16{});
    default: STD_TORCH_CHECK(false, op, ": expected a float16, bfloat16, float32 or float64 tensor");
  }
}

// How float32 products are computed ("ieee" FFMA, "tf32x3" split TF32 products, "tf32").
enum class Precision { kIeee, kTf32x3, kTf32 };

inline Precision parse_precision(const std::string& precision, const char* op) {
  if (precision == "ieee") return Precision::kIeee;
  if (precision == "tf32x3") return Precision::kTf32x3;
  if (precision == "tf32") return Precision::kTf32;
  STD_TORCH_CHECK(false, op, ": precision must be 'ieee', 'tf32x3' or 'tf32', got '", precision,
                  "'");
}

// Products of T accumulate in float (half types, float) or double.
template <typename T> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };

template <typename T>
__device__ __forceinline__ typename Accumulate<T>::type widen(T v) {
  return static_cast<typename Accumulate<T>::type>(v);
}
template <> __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A>
__device__ __forceinline__ T narrow(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half narrow(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }

}  // namespace protokernels
