// kp_conv2d in CUDA: the kernel-prototype convolution and its two gradients as implicit GEMMs on
// sqdist's tile product (tile_product.cuh), with operands that gather from the 4-D tensors:
//   forward:      A = im2col(x) (output pixels x (c, i, j)), B = w (P x (c, i, j));
//                 out = |window|^2 + |w|^2 - 2 A B^T, both norms from the loaded tiles
//   grad input:   A = g scattered to input pixels (pixels x (p, i, j)), B = w by channel
//                 (C x (p, i, j)); gx = 2 (rowsum(A) x - A B^T)
//   grad weight:  A = g (P x pixels), B = im2col(x)^T ((c, i, j) x pixels), the pixels split
//                 over blocks; gw = 2 (rowsum(A) w - A B^T) from the splits' partial sums
// The gathers do 64-bit index math per element; this is the portable path (other GPUs, other
// precisions and dtypes). On Hopper, float32 at "tf32" or "tf32x3" and the half types (x and g
// read through float32 copies: conv_tensor_map), the forward and the grad input run
// hopper_conv_kernel and the weight gradient hopper_weight_grad_kernel (below), which TMA feeds
// without gathers (RESULTS.md "kp_conv2d" and the Hopper sections after it).
#include <vector>

#include "hopper.cuh"
#include "tile_product.cuh"

namespace protokernels {
namespace {

using namespace tile;

// A 4-D tensor read (or written) through its strides.
template <typename T>
struct Tensor4 {
  T* data;
  int64_t s0, s1, s2, s3;
  __device__ T& at(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return data[a * s0 + b * s1 + c * s2 + d * s3];
  }
};

template <typename T>
Tensor4<T> tensor4(const Tensor& t) {
  return {static_cast<T*>(t.mutable_data_ptr()), t.stride(0), t.stride(1), t.stride(2),
          t.stride(3)};
}

// A 4-D tensor of float32 or a half type, the dtype known at run time: the Hopper convolution's
// epilogue (its output, the grad input's x) reads and writes the caller's dtype through it, so the
// half types need no float32 output and no copy back, and the kernel no instantiation per dtype
// (each costs CI compile time). with_type(f) branches once and hands f the typed tensor, so that
// the loops inside f are the same code a typed kernel has: a branch at each element's load and
// store took the float32 forward at the spec size to 0.112 ms and its grad input to 0.123,
// against 0.092 and 0.110 this way (H200, side by side; RESULTS.md "Half precision on the Hopper
// kernels").
struct EpilogueTensor4 {
  enum class Element { kFloat, kHalf, kBFloat16 };
  void* data;
  int64_t s0, s1, s2, s3;
  Element element;
  template <typename T>
  __device__ Tensor4<T> typed() const {
    return {static_cast<T*>(data), s0, s1, s2, s3};
  }
  template <typename F>
  __device__ void with_type(F&& f) const {
    switch (element) {
      case Element::kHalf: return f(typed<__half>());
      case Element::kBFloat16: return f(typed<__nv_bfloat16>());
      default: return f(typed<float>());
    }
  }
};

template <typename T>
EpilogueTensor4 epilogue_tensor4(const Tensor& t) {
  using Element = EpilogueTensor4::Element;
  const Element element = std::is_same_v<T, __half>          ? Element::kHalf
                          : std::is_same_v<T, __nv_bfloat16> ? Element::kBFloat16
                                                             : Element::kFloat;
  return {t.mutable_data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), element};
}

struct ConvShape {
  int64_t channels, height, width, protos, out_h, out_w, kh, kw;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  __host__ __device__ int64_t taps() const { return kh * kw; }
};

struct Pixel {
  int64_t image, h, w;
};

__device__ __forceinline__ Pixel pixel_of(int64_t index, int64_t height, int64_t width) {
  return {index / (height * width), index / width % height, index % width};
}

// x at depth k = (c, i, j) of output pixel `pixel`'s window; 0 in the padding.
template <typename T>
__device__ T window_value(const Tensor4<T>& x, const ConvShape& s, int64_t pixel, int64_t k) {
  const Pixel o = pixel_of(pixel, s.out_h, s.out_w);
  const int64_t ih = o.h * s.stride_h - s.pad_h + k / s.kw % s.kh * s.dil_h;
  const int64_t iw = o.w * s.stride_w - s.pad_w + k % s.kw * s.dil_w;
  const bool inside = ih >= 0 && ih < s.height && iw >= 0 && iw < s.width;
  return inside ? x.at(o.image, k / s.taps(), ih, iw) : narrow<T>(0.0f);
}

// Forward A: the im2col matrix, output pixels x (c, i, j).
template <typename T>
struct Windows {
  Tensor4<T> x;
  ConvShape s;
  int64_t rows;
  __device__ bool k_contiguous() const { return false; }
  __device__ T at(int64_t r, int64_t k) const { return window_value(x, s, r, k); }
};

// Grad weight B: the im2col matrix transposed, (c, i, j) x the output pixels from pixel0 on.
template <typename T>
struct WindowsTransposed {
  Tensor4<T> x;
  ConvShape s;
  int64_t rows, pixel0;
  __device__ bool k_contiguous() const { return false; }
  __device__ T at(int64_t r, int64_t k) const { return window_value(x, s, pixel0 + k, r); }
};

// Forward B: the prototypes flattened, P x (c, i, j).
template <typename T>
struct Prototypes {
  Tensor4<T> w;
  ConvShape s;
  int64_t rows;
  __device__ bool k_contiguous() const { return false; }
  __device__ T at(int64_t p, int64_t k) const {
    return w.at(p, k / s.taps(), k / s.kw % s.kh, k % s.kw);
  }
};

// Grad input B: the prototypes by channel, C x (p, i, j).
template <typename T>
struct PrototypesByChannel {
  Tensor4<T> w;
  ConvShape s;
  int64_t rows;
  __device__ bool k_contiguous() const { return false; }
  __device__ T at(int64_t c, int64_t k) const {
    return w.at(k / s.taps(), c, k / s.kw % s.kh, k % s.kw);
  }
};

// Grad input A: input pixels x (p, i, j), g at the output pixel whose window puts tap (i, j) on
// the input pixel (oh = (ih + pad_h - i dil_h) / stride_h where that divides), else 0.
template <typename T>
struct ScatteredGrad {
  Tensor4<T> g;
  ConvShape s;
  int64_t rows;
  __device__ bool k_contiguous() const { return false; }
  __device__ T at(int64_t r, int64_t k) const {
    const Pixel q = pixel_of(r, s.height, s.width);
    const int64_t from_h = q.h + s.pad_h - k / s.kw % s.kh * s.dil_h;
    const int64_t from_w = q.w + s.pad_w - k % s.kw * s.dil_w;
    if (from_h < 0 || from_w < 0 || from_h % s.stride_h || from_w % s.stride_w)
      return narrow<T>(0.0f);
    const int64_t oh = from_h / s.stride_h, ow = from_w / s.stride_w;
    if (oh >= s.out_h || ow >= s.out_w) return narrow<T>(0.0f);
    return g.at(q.image, k / s.taps(), oh, ow);
  }
};

// Grad weight A: g as P x the output pixels from pixel0 on.
template <typename T>
struct GradByPrototype {
  Tensor4<T> g;
  ConvShape s;
  int64_t rows, pixel0;
  __device__ bool k_contiguous() const { return false; }
  __device__ T at(int64_t p, int64_t k) const {
    const Pixel o = pixel_of(pixel0 + k, s.out_h, s.out_w);
    return g.at(o.image, p, o.h, o.w);
  }
};

template <typename T>
struct ConvArgs {
  Tensor4<T> x, w, g, out;
  ConvShape s;
  int64_t rows, cols, depth, tiles_r;
  // grad weight: the split of the pixels, and the splits' partial sums
  int64_t split_pixels;
  typename Accumulate<T>::type *partial, *mass;
};

// Where the weight gradient's splits leave their partial sums: partial[s][p][c][t] at s split +
// p proto + c channel + t tap, mass[s][p] (the split's sum of g over prototype p's pixels) at
// s mass_split + p.
struct PartialLayout {
  int64_t split, proto, channel, tap, mass_split;
};

// One block per (row tile, column tile), row tiles fastest.
template <typename Tile>
__device__ __forceinline__ void tile_origin(int64_t tiles_r, int64_t& row0, int64_t& col0) {
  row0 = blockIdx.x % tiles_r * Tile::kRows;
  col0 = blockIdx.x / tiles_r * Tile::kCols;
}

template <typename T, typename Tile, Precision P>
__global__ void __launch_bounds__(Tile::kThreads) kp_conv2d_kernel(const ConvArgs<T> args) {
  using S = Smem<T, Tile>;
  using Acc = typename S::Acc;
  __shared__ S smem;
  int64_t row0, col0;
  tile_origin<Tile>(args.tiles_r, row0, col0);
  tile_product<T, Tile, P, RowStat::kSquares, true>(
      smem, Windows<T>{args.x, args.s, args.rows}, Prototypes<T>{args.w, args.s, args.cols},
      args.depth, row0, col0);
  // Pixels fastest: consecutive threads write consecutive outputs of NCHW.
  for (int i = threadIdx.x; i < Tile::kRows * Tile::kCols; i += Tile::kThreads) {
    const int r = i % Tile::kRows, c = i / Tile::kRows;
    const int64_t pixel = row0 + r, proto = col0 + c;
    if (pixel >= args.rows || proto >= args.cols) continue;
    Acc value = smem.row_stat[r] + smem.col_stat[c] - Acc(2) * smem.tiles.c[r][c];
    value = value < Acc(0) ? Acc(0) : value;  // keeps NaN
    const Pixel o = pixel_of(pixel, args.s.out_h, args.s.out_w);
    args.out.at(o.image, proto, o.h, o.w) = narrow<T>(value);
  }
}

template <typename T, typename Tile, Precision P>
__global__ void __launch_bounds__(Tile::kThreads) kp_conv2d_grad_input_kernel(
    const ConvArgs<T> args) {
  using S = Smem<T, Tile>;
  using Acc = typename S::Acc;
  __shared__ S smem;
  int64_t row0, col0;
  tile_origin<Tile>(args.tiles_r, row0, col0);
  tile_product<T, Tile, P, RowStat::kSum, false>(
      smem, ScatteredGrad<T>{args.g, args.s, args.rows},
      PrototypesByChannel<T>{args.w, args.s, args.cols}, args.depth, row0, col0);
  for (int i = threadIdx.x; i < Tile::kRows * Tile::kCols; i += Tile::kThreads) {
    const int r = i % Tile::kRows, c = i / Tile::kRows;
    const int64_t pixel = row0 + r, channel = col0 + c;
    if (pixel >= args.rows || channel >= args.cols) continue;
    const Pixel q = pixel_of(pixel, args.s.height, args.s.width);
    const Acc x = widen(args.x.at(q.image, channel, q.h, q.w));
    args.out.at(q.image, channel, q.h, q.w) =
        narrow<T>(Acc(2) * (smem.row_stat[r] * x - smem.tiles.c[r][c]));
  }
}

// blockIdx.y = the split of the pixels; its partial product and prototype sums go to
// partial[split] (P x (c, i, j)) and mass[split] (P).
template <typename T, typename Tile, Precision P>
__global__ void __launch_bounds__(Tile::kThreads) kp_conv2d_grad_weight_kernel(
    const ConvArgs<T> args) {
  using S = Smem<T, Tile>;
  __shared__ S smem;
  int64_t row0, col0;
  tile_origin<Tile>(args.tiles_r, row0, col0);
  const int64_t pixel0 = blockIdx.y * args.split_pixels;
  const int64_t depth = min(args.split_pixels, args.depth - pixel0);
  tile_product<T, Tile, P, RowStat::kSum, false>(
      smem, GradByPrototype<T>{args.g, args.s, args.rows, pixel0},
      WindowsTransposed<T>{args.x, args.s, args.cols, pixel0}, depth, row0, col0);
  auto* partial = args.partial + blockIdx.y * args.rows * args.cols;
  for (int i = threadIdx.x; i < Tile::kRows * Tile::kCols; i += Tile::kThreads) {
    const int r = i / Tile::kCols, c = i % Tile::kCols;
    if (row0 + r < args.rows && col0 + c < args.cols)
      partial[(row0 + r) * args.cols + col0 + c] = smem.tiles.c[r][c];
  }
  if (col0 == 0 && threadIdx.x < Tile::kRows && row0 + threadIdx.x < args.rows)
    args.mass[blockIdx.y * args.rows + row0 + threadIdx.x] = smem.row_stat[threadIdx.x];
}

// gw = 2 (sum_s mass[s] w - sum_s partial[s]), one thread per element of w, consecutive threads
// along the partial sums' unit stride (the prototypes where layout.proto is 1, else the taps), so
// that the reads, splits times more than the writes, are coalesced (the Hopper layout read in w's
// order took 31 us of the spec size's 130).
template <typename T>
__global__ void kp_conv2d_grad_weight_sum_kernel(const ConvArgs<T> args, int64_t splits,
                                                 const PartialLayout layout) {
  using Acc = typename Accumulate<T>::type;
  const int64_t elements = args.rows * args.cols, taps = args.s.taps();
  const int64_t channels = args.cols / taps;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < elements;
       e += int64_t{gridDim.x} * blockDim.x) {
    const bool protos_fastest = layout.proto == 1;
    const int64_t p = protos_fastest ? e % args.rows : e / args.cols;
    const int64_t k = protos_fastest ? e / args.rows : e % args.cols;  // (tap, c) or (c, tap)
    const int64_t c = protos_fastest ? k % channels : k / taps;
    const int64_t tap = protos_fastest ? k / channels : k % taps;
    const int64_t at = p * layout.proto + c * layout.channel + tap * layout.tap;
    Acc mass = 0, cross = 0;
    for (int64_t s = 0; s < splits; ++s) {
      mass += args.mass[s * layout.mass_split + p];
      cross += args.partial[s * layout.split + at];
    }
    const int64_t i = tap / args.s.kw, j = tap % args.s.kw;
    args.out.at(p, c, i, j) = narrow<T>(Acc(2) * (mass * widen(args.w.at(p, c, i, j)) - cross));
  }
}

// ---- The weight gradient on Hopper (sm_90a): TMA, wgmma, a producer and two consumers ----
//
// gw's product is a GEMM over the output pixels: for each tap (i, j), gw[p, c, tap] sums g[p,
// pixel] x[c, pixel shifted by the tap]. A K step is 32 output pixels of one row. In NCHW tensors
// with a unit stride along the width, g's 32 pixels are 128 contiguous bytes, a K-major box that
// TMA loads at a 16-byte aligned start (the B operand, 128 prototypes). x's pixels under them
// start at the tap's shift, which TMA cannot start a box at (it moves 16-byte pieces), so TMA
// loads one window of x per step, from the aligned column before the row's first tap to past its
// last: 64 channels x window_width columns, densely. The consumers read their A fragments (64
// channels x 8 pixels) from the window at each tap's shift into registers (wgmma's A from
// registers), the row's taps from the same window, and zero the pixels past the row's end there
// (g's zero fill would meet x's next columns, which may be inf). No gather: the tile kernel's
// gathers ran at a quarter of the forward's speed (RESULTS.md "kp_conv2d"). A block owns 64
// channels x up to 4 taps of one kernel row (kTaps) x 128 prototypes (a consumer: 64
// prototypes, one m64n64 wgmma per tap), and one split of the K steps; the splits' partial sums
// meet in kp_conv2d_grad_weight_sum_kernel. "tf32x3" (kSplit): x's low parts come from the
// fragments, g's from each consumer's half of the box, written to a low box of its own (two, by
// step parity) in the same swizzled layout; each step's split products are summed from zero and
// added to the running sums in float32.
constexpr int kWeightGradStep = hopper::box_depth<float>();  // output pixels per K step: 32
constexpr int kWeightGradProtos = 128, kWeightGradChannels = 64, kWeightGradTaps = 4;
// "tf32x3": running sums, step sums, hi and lo fragments of each tap fit two taps' registers.
constexpr int kWeightGradSplitTaps = 2;
constexpr int kWeightGradHalfBytes = 64 * hopper::kRowBytes;  // a consumer's 64 prototypes
constexpr int kWeightGradLowBytes = 2 * 2 * kWeightGradHalfBytes;  // consumers x step parity
constexpr int kWeightGradStages = 4;
constexpr int kWeightGradBoxBytes = kWeightGradProtos * hopper::kRowBytes;  // g's box
// The window's row is at most this many floats (its stage then takes 48 KB, 4 stages 192 KB).
constexpr int kWeightGradMaxWindow = 128;

struct HopperWeightGradArgs {
  int steps, steps_per_split, chunks, out_h, out_w;  // K steps: (image, output row, chunk)
  int kw, stride_h, pad_h, pad_w, dil_h, dil_w;
  int proto_tiles, channel_tiles, kernel_rows, tap_groups;  // tap groups per kernel row
  int window, stage_bytes;  // the window's row in floats; a stage's bytes (a multiple of 1024)
  PartialLayout layout;
  float *partial, *mass;
};

template <int kTaps, bool kSplit>
__global__ void __launch_bounds__(hopper::kWalkThreads, 1)
hopper_weight_grad_kernel(const __grid_constant__ CUtensorMap g_map,
                          const __grid_constant__ CUtensorMap x_map,
                          const HopperWeightGradArgs args) {
#if defined(PK_HOPPER_DEVICE)
  using namespace hopper;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* stages = swizzle_aligned(smem_raw);
  unsigned char* low_boxes = stages + kWeightGradStages * args.stage_bytes;  // "tf32x3"
  uint64_t* full = reinterpret_cast<uint64_t*>(low_boxes + (kSplit ? kWeightGradLowBytes : 0));
  uint64_t* empty = full + kWeightGradStages;

  int block = blockIdx.x;
  const int proto_tile = block % args.proto_tiles;
  block /= args.proto_tiles;
  const int channel_tile = block % args.channel_tiles;
  block /= args.channel_tiles;
  const int kernel_row = block % args.kernel_rows;
  block /= args.kernel_rows;
  const int tap_group = block % args.tap_groups;
  const int split = block / args.tap_groups;
  const int p0 = proto_tile * kWeightGradProtos, c0 = channel_tile * kWeightGradChannels;
  const int j0 = tap_group * kTaps;
  const int taps_here = min(kTaps, args.kw - j0);  // the last group of a wide kernel: fewer
  const int first = split * args.steps_per_split;
  const int count = min(args.steps_per_split, args.steps - first);
  // The window's first column, relative to a chunk's first output pixel, before rounding down
  // to a multiple of 4 floats (16 bytes).
  const int lead = j0 * args.dil_w - args.pad_w;

  init_ring(full, empty, kWeightGradStages);

  if (threadIdx.x < 128) {
    release_registers<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    const uint32_t bytes = kWeightGradBoxBytes + kWeightGradChannels * args.window * 4;
    for (int i = 0; i < count; ++i) {
      const int slot = i % kWeightGradStages, round = i / kWeightGradStages;
      if (round > 0) wait(&empty[slot], (round - 1) & 1);
      unsigned char* stage = stages + slot * args.stage_bytes;
      arrive_expecting(&full[slot], bytes);
      const int step = first + i;
      const int ow0 = step % args.chunks * kWeightGradStep;
      const int oh = step / args.chunks % args.out_h, image = step / (args.chunks * args.out_h);
      load_box(stage, &g_map, &full[slot], ow0, oh, p0, image);
      load_box(stage + kWeightGradBoxBytes, &x_map, &full[slot], (ow0 + lead) & ~3,
               oh * args.stride_h - args.pad_h + kernel_row * args.dil_h, c0, image);
    }
    return;
  }

  claim_registers<kConsumerRegisters>();
  const int c = threadIdx.x / 128 - 1, thread = threadIdx.x % 128;
  const int warp = thread / 32, lane = thread % 32, g = lane / 4, t = lane % 4;
  const bool sums_mass = channel_tile == 0 && kernel_row == 0 && tap_group == 0;
  float acc[kTaps][32];
#pragma unroll
  for (int q = 0; q < kTaps; ++q)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[q][i] = 0.0f;
  float mass = 0.0f;  // this thread's half of the sum of g's row thread / 2 of the consumer's

  for (int i = 0; i < count; ++i) {
    const int slot = i % kWeightGradStages;
    wait(&full[slot], (i / kWeightGradStages) & 1);
    const unsigned char* stage = stages + slot * args.stage_bytes;
    const unsigned char* g_region = stage + c * 64 * kRowBytes;
    const float* window = reinterpret_cast<const float*>(stage + kWeightGradBoxBytes);
    const int ow0 = (first + i) % args.chunks * kWeightGradStep;
    const int shift0 = (ow0 + lead) - ((ow0 + lead) & ~3);
    if (sums_mass) {  // the row's 8 16-byte chunks in any order: the swizzle permutes them
      const float4* row = reinterpret_cast<const float4*>(g_region + thread / 2 * kRowBytes);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 v = row[4 * (thread % 2) + k];
        mass += (v.x + v.y) + (v.z + v.w);
      }
    }
    // wgmma's A layout (see mma_64x128_tf32_rs): k8 step kk, rows 16 warp + g + 8 (e % 2),
    // pixels 8 kk + t + 4 (e / 2), read at each tap's shift; 0 past the row's end and for taps
    // past the kernel's (their MMAs run, on zeros: a wgmma issued under a condition makes the
    // compiler fence every one of them).
    uint32_t a[kWeightGradStep / 8][kTaps][4];
    uint32_t a_low[kSplit ? kWeightGradStep / 8 : 1][kTaps][4];
#pragma unroll
    for (int kk = 0; kk < kWeightGradStep / 8; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 16 * warp + g + 8 * (e % 2), k = 8 * kk + t + 4 * (e / 2);
        const bool inside = ow0 + k < args.out_w;
#pragma unroll
        for (int q = 0; q < kTaps; ++q) {
          const float v = q < taps_here && inside
                              ? window[r * args.window + shift0 + q * args.dil_w + k]
                              : 0.0f;
          a[kk][q][e] = __float_as_uint(v);
          if constexpr (kSplit) a_low[kk][q][e] = __float_as_uint(tf32_low_part(v));
        }
      }
    if constexpr (kSplit) {
      unsigned char* g_low = low_boxes + (2 * c + i % 2) * kWeightGradHalfBytes;
      write_low_parts<kWeightGradHalfBytes>(g_low, g_region, thread);
      fence_async_shared();
      sync_threads(1 + c, 128);  // the consumer's whole low box before its MMAs read it
      float step_acc[kTaps][32];
      mma_fence();
#pragma unroll
      for (int kk = 0; kk < kWeightGradStep / 8; ++kk) {
        const uint64_t b = descriptor(g_region + 32 * kk), b_low = descriptor(g_low + 32 * kk);
#pragma unroll
        for (int q = 0; q < kTaps; ++q) {  // hi.hi + lo.hi + hi.lo
          mma_64x64_tf32_rs(step_acc[q], a[kk][q], b, kk > 0);
          mma_64x64_tf32_rs(step_acc[q], a_low[kk][q], b);
          mma_64x64_tf32_rs(step_acc[q], a[kk][q], b_low);
        }
      }
      mma_commit();
      mma_wait<0>();
      hold_fragments(a);
      hold_fragments(a_low);
#pragma unroll
      for (int q = 0; q < kTaps; ++q) {
        hold_registers(step_acc[q]);
#pragma unroll
        for (int e = 0; e < 32; ++e) acc[q][e] += step_acc[q][e];
      }
    } else {
      multiply_from_registers(acc, a, g_region, [](auto& d, const auto& a, uint64_t b) {
        mma_64x64_tf32_rs(d, a, b);
      });
    }
    if (lane == 0) arrive(&empty[slot]);
  }

  // The partial sums are padded to whole blocks (every block stores its whole tile): acc[q][4 j
  // + 2 h + e] is channel 16 warp + g + 8 h, prototype 8 j + 2 t + e of the consumer's 64.
  const PartialLayout& layout = args.layout;
  float* partial = args.partial + split * layout.split + p0 + 64 * c;
#pragma unroll
  for (int q = 0; q < kTaps; ++q) {
    if (q >= taps_here) break;
    const int tap = kernel_row * args.kw + j0 + q;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float* row = partial + tap * layout.tap + (c0 + 16 * warp + g + 8 * h) * layout.channel;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        *reinterpret_cast<float2*>(row + 8 * j + 2 * t) =
            make_float2(acc[q][4 * j + 2 * h], acc[q][4 * j + 2 * h + 1]);
    }
  }
  if (sums_mass) {
    mass += __shfl_xor_sync(0xFFFFFFFFu, mass, 1);
    if (thread % 2 == 0) args.mass[split * layout.mass_split + p0 + 64 * c + thread / 2] = mass;
  }
#endif
}

// A 4-D TMA map of t (B, C, H, W) in boxes of `width` floats along W and `rows` along C, swizzled
// or dense (tensor_map_tiled): of t itself where TMA can address it, else of a copy of t with
// unit-stride rows padded to 16 bytes, kept in `copy` (TMA needs the unit stride and 16-byte
// strides: a width that is not a multiple of 4, channels_last, a broadcast gradient). A half t is
// read through a float32 copy: the Hopper kernels multiply what TMA loads on TF32 MMAs, which hold
// a half element's mantissa (10 bits: float16's, more than bfloat16's 7), so each product is exact
// and the sums are float32's, as a half-precision MMA gives. Its callers map their operands after
// their own conditions, so no copy is made for a launch they refuse.
bool conv_tensor_map(CUtensorMap* map, const Tensor& t, int width, int rows, bool swizzled,
                     Tensor& copy) {
  const int64_t size = t.size(3);
  auto encode = [&](const Tensor& u) {
    return hopper::tensor_map_tiled<float, 4>(
        map, u.const_data_ptr(), {size, t.size(2), t.size(1), t.size(0)},
        {u.stride(3), u.stride(2), u.stride(1), u.stride(0)},
        {static_cast<uint32_t>(width), 1, static_cast<uint32_t>(rows), 1}, swizzled);
  };
  Tensor source = t;
  if (t.scalar_type() != ScalarType::Float) {
    copy = torch::stable::to(t, ScalarType::Float);
    source = copy;
  }
  if (encode(source)) return true;
  const int64_t pad = (size + 3) / 4 * 4 - size;
  copy = torch::stable::contiguous(torch::stable::pad(source, {0, pad}));
  return encode(copy);
}

// The Hopper weight gradient into args.out, or false where it does not apply: "tf32" or
// "tf32x3", a Hopper GPU and an sm_90a build, stride 1 along the width, a window of at most
// kWeightGradMaxWindow columns, counts and coordinates within int. grad, x and args (w, out) are
// of the caller's dtype T (conv_tensor_map reads a half grad and x through float32 copies).
template <typename T>
bool launch_hopper_weight_grad(const Tensor& grad, const Tensor& x, ConvArgs<T> args,
                               Precision precision, cudaStream_t stream) {
  using namespace hopper;
  const ConvShape& s = args.s;
  const int device = x.get_device_index();
  const bool split = precision == Precision::kTf32x3;
  if ((precision != Precision::kTf32 && !split) || s.stride_w != 1 || !hopper_available(device))
    return false;
  // The window: 3 columns of rounding down to 16 bytes, a chunk and the taps' reach, widened so
  // that its rows fall on different banks by 4 floats (width % 8 == 4): the A fragments' reads
  // (8 channels x 4 pixels a warp) are then free of bank conflicts.
  const int taps_per_block =
      static_cast<int>(std::min<int64_t>(split ? kWeightGradSplitTaps : kWeightGradTaps, s.kw));
  const int64_t window = ((3 + kWeightGradStep + (taps_per_block - 1) * s.dil_w) + 3) / 8 * 8 + 4;
  const int64_t batch = x.size(0);
  const int64_t chunks = (s.out_w + kWeightGradStep - 1) / kWeightGradStep;
  const int64_t steps = batch * s.out_h * chunks;
  const int64_t reach_w = s.width + s.pad_w + s.dil_w * s.kw + kWeightGradStep + window;
  const int64_t reach_h = s.out_h * s.stride_h + s.dil_h * s.kh;
  if (window > kWeightGradMaxWindow || steps >= kIntLimit || reach_w >= kIntLimit ||
      reach_h >= kIntLimit || s.protos >= kIntLimit - kWeightGradProtos ||
      s.channels >= kIntLimit - kWeightGradChannels || s.taps() >= kIntLimit || batch >= kIntLimit)
    return false;
  CUtensorMap g_map, x_map;
  Tensor g_copy, x_copy;
  if (!conv_tensor_map(&g_map, grad, kWeightGradStep, kWeightGradProtos, true, g_copy) ||
      !conv_tensor_map(&x_map, x, static_cast<int>(window), kWeightGradChannels, false, x_copy))
    return false;
  const int64_t proto_tiles = (s.protos + kWeightGradProtos - 1) / kWeightGradProtos;
  const int64_t channel_tiles = (s.channels + kWeightGradChannels - 1) / kWeightGradChannels;
  const int64_t tap_groups = (s.kw + taps_per_block - 1) / taps_per_block;
  const int64_t tiles = proto_tiles * channel_tiles * s.kh * tap_groups;
  // One block per SM (its shared memory): enough splits of the K steps to fill them.
  const ColumnSplits splits = split_columns(steps, tiles, sm_count(x));
  if (tiles * splits.splits >= kIntLimit) return false;
  const int64_t protos = proto_tiles * kWeightGradProtos;
  const int64_t channels = channel_tiles * kWeightGradChannels;
  Tensor partial = torch::stable::new_empty(x, {splits.splits, s.taps(), channels, protos},
                                            ScalarType::Float);
  Tensor mass = torch::stable::new_empty(x, {splits.splits, protos}, ScalarType::Float);
  const PartialLayout layout{s.taps() * channels * protos, 1, protos, channels * protos, protos};
  args.partial = static_cast<float*>(partial.mutable_data_ptr());
  args.mass = static_cast<float*>(mass.mutable_data_ptr());
  const int window_bytes = static_cast<int>(kWeightGradChannels * window * 4);
  const int stage_bytes = (kWeightGradBoxBytes + window_bytes + kWalkAlign - 1) / kWalkAlign *
                          kWalkAlign;
  const size_t smem_bytes = kWalkAlign + size_t{kWeightGradStages} * stage_bytes +
                            (split ? kWeightGradLowBytes : 0) +
                            2 * kWeightGradStages * sizeof(uint64_t);
  const HopperWeightGradArgs hopper_args{
      static_cast<int>(steps), static_cast<int>(splits.tiles_per_split),
      static_cast<int>(chunks), static_cast<int>(s.out_h), static_cast<int>(s.out_w),
      static_cast<int>(s.kw), static_cast<int>(s.stride_h), static_cast<int>(s.pad_h),
      static_cast<int>(s.pad_w), static_cast<int>(s.dil_h), static_cast<int>(s.dil_w),
      static_cast<int>(proto_tiles), static_cast<int>(channel_tiles), static_cast<int>(s.kh),
      static_cast<int>(tap_groups), static_cast<int>(window), stage_bytes, layout, args.partial,
      args.mass};
  auto launch = [&](auto taps, auto split) {
    constexpr auto kKernel =
        hopper_weight_grad_kernel<decltype(taps)::value, decltype(split)::value>;
    allow_walk_smem<kKernel>(device);
    kKernel<<<static_cast<unsigned>(tiles * splits.splits), kWalkThreads, smem_bytes, stream>>>(
        g_map, x_map, hopper_args);
    PK_CHECK_LAUNCH();
  };
  if (split) {  // a block's taps: the kernel's width, at most 2 ("tf32x3") or 4
    if (taps_per_block == 1) launch(std::integral_constant<int, 1>{}, std::true_type{});
    else launch(std::integral_constant<int, 2>{}, std::true_type{});
  } else {
    switch (taps_per_block) {
      case 1: launch(std::integral_constant<int, 1>{}, std::false_type{}); break;
      case 2: launch(std::integral_constant<int, 2>{}, std::false_type{}); break;
      case 3: launch(std::integral_constant<int, 3>{}, std::false_type{}); break;
      default: launch(std::integral_constant<int, 4>{}, std::false_type{}); break;
    }
  }
  kp_conv2d_grad_weight_sum_kernel<T><<<256, 256, 0, stream>>>(args, splits.splits, layout);
  PK_CHECK_LAUNCH();
  return true;
}

// ---- The forward and the grad input on Hopper (sm_90a): the weight gradient's window, the
// other way round ----
//
// out = |window|^2 + |w|^2 - 2 sum_{c, tap} x[c, pixel shifted by the tap] w[p, c, tap]: per
// kernel row i, a GEMM of output pixels (M) by prototypes (N) over channels (K), one per tap of
// the row. A K step is 32 channels of one kernel row. TMA loads, per consumer, one dense window
// of x (32 channels x the pixels under its 64 output pixels at every tap of the row, from a
// 16-byte aligned column; a row pitch of 8 floats mod 16 keeps the fragment reads, 8 pixels x 4
// channels a warp, free of bank conflicts), and per tap a swizzled box of w reordered K-major
// (kProtos prototypes x 32 channels). The consumers read their A fragments (64 pixels x 8 channels,
// transposed from the window) at each tap's shift into registers and sum their squares there:
// the window's energy costs no second read. A block: two consumers, one output row each, 64
// pixels of it, kProtos prototypes: 128, or 64 where there are at most 64 (one m64nkProtos
// wgmma per tap and k8 step; padded to n128, the grad input at the spec size, C 64, took 0.235
// ms against n64's 0.196, H100).
//
// With stride 1 the grad input is the same convolution (kGradInput): gx = 2 (x S - conv(g, w')),
// g in x's place (its P channels are the K), w' = w with prototypes and channels swapped and the
// taps flipped (C "prototypes" of P channels), padding dil (k - 1) - pad, the output x's size;
// S, g summed over each window and its P channels, comes from the fragments' plain sums as the
// forward's energy from their squares.
constexpr int kConvPixels = 64, kConvStep = 32;  // K: channels
constexpr int kConvMaxTaps = 4;      // along the width; wider kernels take the tile kernel
// "tf32x3" (split products, 64 prototypes a block): a consumer holds its running sums, its step's
// sums and the hi and lo fragments of every tap of the step; 4 taps would leave too few registers.
constexpr int kConvMaxSplitTaps = 3;
constexpr int kConvMaxWindow = 256;  // a TMA box's widest
constexpr int kConvMaxSmem = 200 * 1024;  // the ring's, within the 227 KB a block may take

struct HopperConvArgs {
  int channel_steps, kh, kw, out_h, out_w, protos, row_pairs, col_tiles, proto_tiles;
  int stride_h, pad_h, pad_w, dil_h, dil_w;
  int window, window_bytes, stage_bytes, stages;
  const float* w_norms;  // the forward's |w_p|^2, P
  EpilogueTensor4 x;  // the grad input's x (B, C, H, W)
  EpilogueTensor4 out;
};

template <int kTaps, bool kGradInput, int kProtos, bool kSplit>
__global__ void __launch_bounds__(hopper::kWalkThreads, 1)
hopper_conv_kernel(const __grid_constant__ CUtensorMap x_map,
                   const __grid_constant__ CUtensorMap w_map, const HopperConvArgs args) {
#if defined(PK_HOPPER_DEVICE)
  using namespace hopper;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* stages = swizzle_aligned(smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(stages + args.stages * args.stage_bytes);
  uint64_t* empty = full + args.stages;

  int block = blockIdx.x;
  const int proto_tile = block % args.proto_tiles;
  block /= args.proto_tiles;
  const int col_tile = block % args.col_tiles;
  block /= args.col_tiles;
  const int row_pair = block % args.row_pairs;
  const int image = block / args.row_pairs;
  constexpr int kWBoxBytes = kProtos * kRowBytes;
  constexpr int kWBoxes = kSplit ? 2 * kTaps : kTaps;  // a stage's boxes of w: hi, then lo
  const int p0 = proto_tile * kProtos, ow0 = col_tile * kConvPixels;
  const int oh0 = 2 * row_pair;
  const int steps = args.channel_steps * args.kh;  // (kernel row, channel chunk), rows outer
  const int lead = ow0 - args.pad_w;  // the window's first column before rounding down
  const int column0 = lead & ~3;
  init_ring(full, empty, args.stages);

  if (threadIdx.x < 128) {
    release_registers<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    const uint32_t bytes = 2 * args.window_bytes + kWBoxes * kWBoxBytes;
    for (int step = 0; step < steps; ++step) {
      const int slot = step % args.stages, round = step / args.stages;
      if (round > 0) wait(&empty[slot], (round - 1) & 1);
      unsigned char* stage = stages + slot * args.stage_bytes;
      arrive_expecting(&full[slot], bytes);
      const int kernel_row = step / args.channel_steps;
      const int c0 = step % args.channel_steps * kConvStep;
      for (int c = 0; c < 2; ++c)
        load_box(stage + kWBoxes * kWBoxBytes + c * args.window_bytes, &x_map, &full[slot],
                 column0, (oh0 + c) * args.stride_h - args.pad_h + kernel_row * args.dil_h, c0,
                 image);
      for (int j = 0; j < kWBoxes; ++j)  // the low parts' taps follow the taps in wt
        load_box(stage + j * kWBoxBytes, &w_map, &full[slot], c0, p0,
                 (j / kTaps) * args.kh * args.kw + kernel_row * args.kw + j % kTaps);
    }
    return;
  }

  claim_registers<kConsumerRegisters>();
  const int c = threadIdx.x / 128 - 1, thread = threadIdx.x % 128;
  const int warp = thread / 32, lane = thread % 32, g = lane / 4, t = lane % 4;
  float acc[kProtos / 2];
#pragma unroll
  for (int i = 0; i < kProtos / 2; ++i) acc[i] = 0.0f;
  // "tf32x3": each step's split products summed from zero, then added to acc in float32 (the
  // tensor cores' own accumulation drifts over long sums: RESULTS.md "The Hopper gradient").
  float step_acc[kSplit ? kProtos / 2 : 1];
  // [h]: this thread's part of its rows' window energy (the grad input: sum)
  float window_sums[2] = {};
  const int shift0 = lead - column0;
  const int oh = oh0 + c;
  // The epilogue's inputs (the forward's |w_p|^2, the grad input's x at the outputs), read before
  // the main loop so that their latency hides behind it: read among the outputs' stores, each
  // load waited for the store before it (out might alias them), and the grad input's epilogue took
  // 41 % of the kernel's stalls (ncu, H100, spec size). [h][2 j + e]: the thread's output pixel
  // h (the forward's norms: one set), prototype 8 j + 2 t + e.
  constexpr int kPixelSets = kGradInput ? 2 : 1;
  float epilogue_in[kPixelSets][kProtos / 4];
  const auto read_epilogue_inputs = [&](const auto& x) {
#pragma unroll
    for (int h = 0; h < kPixelSets; ++h)
#pragma unroll
      for (int j = 0; j < kProtos / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int p = p0 + 8 * j + 2 * t + e;
          float v = 0.0f;
          if constexpr (kGradInput) {
            const int ow = ow0 + 16 * warp + g + 8 * h;
            if (p < args.protos && oh < args.out_h && ow < args.out_w)
              v = widen(x.at(image, p, oh, ow));
          } else if (p < args.protos) {
            v = args.w_norms[p];
          }
          epilogue_in[h][2 * j + e] = v;
        }
  };
  if constexpr (kGradInput) args.x.with_type(read_epilogue_inputs);
  else read_epilogue_inputs(Tensor4<const float>{});

  for (int step = 0; step < steps; ++step) {
    const int slot = step % args.stages;
    wait(&full[slot], (step / args.stages) & 1);
    const unsigned char* stage = stages + slot * args.stage_bytes;
    const float* window =
        reinterpret_cast<const float*>(stage + kWBoxes * kWBoxBytes + c * args.window_bytes);
    // wgmma's A layout (see mma_64x128_tf32_rs): k8 step kk, pixels 16 warp + g + 8 (e % 2),
    // channels 8 kk + t + 4 (e / 2), read at each tap's shift.
    uint32_t a[kConvStep / 8][kTaps][4];
    uint32_t a_low[kSplit ? kConvStep / 8 : 1][kTaps][4];  // "tf32x3": the low parts
#pragma unroll
    for (int kk = 0; kk < kConvStep / 8; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 16 * warp + g + 8 * (e % 2), k = 8 * kk + t + 4 * (e / 2);
#pragma unroll
        for (int j = 0; j < kTaps; ++j) {
          const float v = window[k * args.window + shift0 + j * args.dil_w + r];
          a[kk][j][e] = __float_as_uint(v);
          if constexpr (kSplit) a_low[kk][j][e] = __float_as_uint(tf32_low_part(v));
          window_sums[e % 2] = kGradInput ? window_sums[e % 2] + v
                                          : fmaf(v, v, window_sums[e % 2]);
        }
      }
    auto product = [](auto& d, const uint32_t (&a)[4], uint64_t b, int accumulate) {
      if constexpr (kProtos == 128) mma_64x128_tf32_rs(d, a, b, accumulate);
      else mma_64x64_tf32_rs(d, a, b, accumulate);
    };
    mma_fence();
#pragma unroll
    for (int kk = 0; kk < kConvStep / 8; ++kk)
#pragma unroll
      for (int j = 0; j < kTaps; ++j) {
        const uint64_t b = descriptor(stage + j * kWBoxBytes + 32 * kk);
        if constexpr (kSplit) {  // hi.hi + lo.hi + hi.lo (the tensor cores read a as its hi)
          const uint64_t b_low = descriptor(stage + (kTaps + j) * kWBoxBytes + 32 * kk);
          product(step_acc, a[kk][j], b, kk + j > 0);
          product(step_acc, a_low[kk][j], b, 1);
          product(step_acc, a[kk][j], b_low, 1);
        } else {
          product(acc, a[kk][j], b, 1);
        }
      }
    mma_commit();
    mma_wait<0>();
    hold_fragments(a);
    if constexpr (kSplit) {
      hold_registers(step_acc);
      hold_fragments(a_low);
#pragma unroll
      for (int i = 0; i < kProtos / 2; ++i) acc[i] += step_acc[i];
    } else {
      hold_registers(acc);
    }
    if (lane == 0) arrive(&empty[slot]);
  }

  // A row's sum is spread over the 4 threads t of its quad.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    window_sums[h] += __shfl_xor_sync(0xFFFFFFFFu, window_sums[h], 1);
    window_sums[h] += __shfl_xor_sync(0xFFFFFFFFu, window_sums[h], 2);
  }
  if (oh >= args.out_h) return;
  args.out.with_type([&](const auto& out) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(out.data)>>;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ow = ow0 + 16 * warp + g + 8 * h;
      if (ow >= args.out_w) continue;
#pragma unroll
      for (int j = 0; j < kProtos / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int p = p0 + 8 * j + 2 * t + e;  // the grad input: a channel of x
          if (p >= args.protos) continue;
          const float product = acc[4 * j + 2 * h + e];
          const float in = epilogue_in[kGradInput ? h : 0][2 * j + e];
          if constexpr (kGradInput) {
            out.at(image, p, oh, ow) = narrow<T>(2.0f * (in * window_sums[h] - product));
          } else {
            const float v = window_sums[h] + in - 2.0f * product;
            out.at(image, p, oh, ow) = narrow<T>(v < 0.0f ? 0.0f : v);  // keeps NaN
          }
        }
    }
  });
#endif
}

// wt (T, N, K4): the Hopper kernel's B operand, the K innermost (rows padded to 16 bytes for TMA;
// the padding is never read), one block per row n, s the shape of the convolution it runs: the
// forward's w (N = P, K = C) with norms[p] = |w_p|^2, or the grad input's w' (N = C, K = P, the
// taps flipped; no norms), widened to float32. `split` ("tf32x3"): the low parts (tf32_low_part)
// follow as T more taps.
template <bool kGradInput, typename T>
__global__ void reorder_prototypes_kernel(const Tensor4<const T> w, ConvShape s, bool split,
                                          float* wt, int64_t row, float* norms) {
  __shared__ float partial[128];
  const int64_t n = blockIdx.x;
  float sum = 0.0f;
  for (int64_t e = threadIdx.x; e < s.channels * s.taps(); e += blockDim.x) {
    const int64_t k = e / s.taps(), tap = e % s.taps(), i = tap / s.kw, j = tap % s.kw;
    const float v = widen(kGradInput ? w.at(k, n, s.kh - 1 - i, s.kw - 1 - j) : w.at(n, k, i, j));
    wt[(tap * s.protos + n) * row + k] = v;
    if (split) wt[((s.taps() + tap) * s.protos + n) * row + k] = hopper::tf32_low_part(v);
    sum = fmaf(v, v, sum);
  }
  if constexpr (kGradInput) return;
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) norms[n] = partial[0];
}

// The Hopper convolution into out, or false where it does not apply: "tf32" (or "tf32x3" on
// kernels at most kConvMaxSplitTaps wide), a Hopper GPU and an sm_90a build, stride 1 along the
// width, at least one K step of channels, kernels at most kConvMaxTaps wide whose window fits a
// TMA box, counts and coordinates within int. `in` is x for the forward, g for the grad input (s
// then grad_input_shape's, x the epilogue's); in, w, x and out are of the caller's dtype T (a half
// `in` is read through a float32 copy: conv_tensor_map). Fewer channels than a step pad its K
// with zeros: H100, C1 28x28 P32 took 0.082 ms against the tile kernel's and Triton's ~0.03
// (RESULTS.md "kp_conv's forward on Hopper").
template <bool kGradInput, typename T>
bool launch_hopper_conv(const Tensor& in, const Tensor& w, const ConvShape& s, const Tensor& x,
                        const Tensor& out, Precision precision, cudaStream_t stream) {
  using namespace hopper;
  const int device = in.get_device_index();
  const bool split = precision == Precision::kTf32x3;
  if ((precision != Precision::kTf32 && !split) || s.stride_w != 1 ||
      s.kw > (split ? kConvMaxSplitTaps : kConvMaxTaps) || s.channels < kConvStep ||
      !hopper_available(device))
    return false;
  // 3 columns of rounding down to 16 bytes, the taps' reach and 64 pixels, widened to a pitch of
  // 8 floats mod 16 (8 or 24 mod 32: the 4 channels a warp reads fall on different banks).
  const int protos_per_block = s.protos <= 64 || split ? 64 : 128;
  const int w_boxes = static_cast<int>(s.kw) * (split ? 2 : 1);
  const int64_t need = 3 + (s.kw - 1) * s.dil_w + kConvPixels;
  const int64_t window = (need + 7) / 16 * 16 + 8;
  const int64_t window_bytes = kConvStep * window * 4;
  const int64_t stage_bytes =
      (w_boxes * protos_per_block * kRowBytes + 2 * window_bytes + kWalkAlign - 1) / kWalkAlign *
      kWalkAlign;
  const int64_t stages = std::min<int64_t>(4, kConvMaxSmem / stage_bytes);
  const int64_t batch = in.size(0);
  const int64_t row_pairs = (s.out_h + 1) / 2;
  const int64_t col_tiles = (s.out_w + kConvPixels - 1) / kConvPixels;
  const int64_t proto_tiles = (s.protos + protos_per_block - 1) / protos_per_block;
  const int64_t blocks = batch * row_pairs * col_tiles * proto_tiles;
  const int64_t reach_w = s.width + s.pad_w + window + kConvPixels;
  const int64_t reach_h = s.out_h * s.stride_h + s.pad_h + s.dil_h * s.kh;
  if (window > kConvMaxWindow || stages < 2 || blocks >= kIntLimit || reach_w >= kIntLimit ||
      reach_h >= kIntLimit || s.protos >= kIntLimit - protos_per_block ||
      s.channels >= kIntLimit - kConvStep || 2 * s.taps() * s.protos >= kIntLimit)
    return false;
  CUtensorMap x_map, w_map;
  Tensor in_copy;
  if (!conv_tensor_map(&x_map, in, static_cast<int>(window), kConvStep, false, in_copy))
    return false;
  const int64_t row = (s.channels + 3) / 4 * 4;
  const int64_t wt_taps = s.taps() * (split ? 2 : 1);
  Tensor wt = torch::stable::new_empty(in, {wt_taps, s.protos, row}, ScalarType::Float);
  Tensor norms = torch::stable::new_empty(in, {kGradInput ? 0 : s.protos}, ScalarType::Float);
  if (!tensor_map_tiled<float, 3>(&w_map, wt.const_data_ptr(), {s.channels, s.protos, wt_taps},
                                  {1, row, s.protos * row},
                                  {kConvStep, static_cast<uint32_t>(protos_per_block), 1}))
    return false;
  reorder_prototypes_kernel<kGradInput, T><<<static_cast<unsigned>(s.protos), 128, 0, stream>>>(
      tensor4<const T>(w), s, split, static_cast<float*>(wt.mutable_data_ptr()), row,
      static_cast<float*>(norms.mutable_data_ptr()));
  PK_CHECK_LAUNCH();
  const HopperConvArgs hopper_args{
      static_cast<int>((s.channels + kConvStep - 1) / kConvStep), static_cast<int>(s.kh),
      static_cast<int>(s.kw), static_cast<int>(s.out_h), static_cast<int>(s.out_w),
      static_cast<int>(s.protos), static_cast<int>(row_pairs), static_cast<int>(col_tiles),
      static_cast<int>(proto_tiles), static_cast<int>(s.stride_h), static_cast<int>(s.pad_h),
      static_cast<int>(s.pad_w), static_cast<int>(s.dil_h), static_cast<int>(s.dil_w),
      static_cast<int>(window), static_cast<int>(window_bytes), static_cast<int>(stage_bytes),
      static_cast<int>(stages), static_cast<const float*>(norms.const_data_ptr()),
      epilogue_tensor4<T>(x), epilogue_tensor4<T>(out)};
  const size_t smem_bytes = kWalkAlign + size_t(stages * stage_bytes) +
                            2 * size_t(stages) * sizeof(uint64_t);
  auto launch = [&](auto taps, auto protos, auto split) {
    constexpr auto kKernel = hopper_conv_kernel<decltype(taps)::value, kGradInput,
                                                decltype(protos)::value, decltype(split)::value>;
    allow_walk_smem<kKernel>(device);
    kKernel<<<static_cast<unsigned>(blocks), kWalkThreads, smem_bytes, stream>>>(x_map, w_map,
                                                                                  hopper_args);
    PK_CHECK_LAUNCH();
  };
  auto launch_taps = [&](auto protos, auto split) {
    switch (s.kw) {  // the taps of a kernel row, all in one step
      case 1: launch(std::integral_constant<int, 1>{}, protos, split); break;
      case 2: launch(std::integral_constant<int, 2>{}, protos, split); break;
      case 3: launch(std::integral_constant<int, 3>{}, protos, split); break;
      default:  // split products take at most kConvMaxSplitTaps
        if constexpr (!decltype(split)::value)
          launch(std::integral_constant<int, 4>{}, protos, split);
        break;
    }
  };
  using Narrow = std::integral_constant<int, 64>;
  if (split) launch_taps(Narrow{}, std::true_type{});
  else if (protos_per_block == 64) launch_taps(Narrow{}, std::false_type{});
  else launch_taps(std::integral_constant<int, 128>{}, std::false_type{});
  return true;
}

// The grad input as a convolution of g (launch_hopper_conv<true>): its shape, or false where
// kp_conv2d's has a stride (the transposed convolution then skips pixels) or more padding than
// the kernel's reach (g's windows would start past its edge; dil (k - 1) - pad < 0).
bool grad_input_shape(const ConvShape& s, ConvShape* t) {
  if (s.stride_h != 1 || s.stride_w != 1 || s.pad_h > s.dil_h * (s.kh - 1) ||
      s.pad_w > s.dil_w * (s.kw - 1))
    return false;
  *t = {s.protos, s.out_h, s.out_w, s.channels, s.height, s.width, s.kh, s.kw, 1, 1,
        s.dil_h * (s.kh - 1) - s.pad_h, s.dil_w * (s.kw - 1) - s.pad_w, s.dil_h, s.dil_w};
  return true;
}

void check_conv(const char* op, const Tensor& x, const Tensor& w,
                const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                const std::vector<int64_t>& dilation) {
  PK_CHECK_CUDA(op, "x", x);
  PK_CHECK_CUDA(op, "w", w);
  PK_CHECK_DIM(op, "x", x, 4);
  PK_CHECK_DIM(op, "w", w, 4);
  PK_CHECK_SAME(op, "device", "x", x.device(), "w", w.device());
  PK_CHECK_SAME(op, "dtype", "x", x.scalar_type(), "w", w.scalar_type());
  PK_CHECK_SAME(op, "channel count", "x", x.size(1), "w", w.size(1));
  PK_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
           "stride, padding and dilation must have 2 entries each");
  for (int d = 0; d < 2; ++d)
    PK_CHECK(stride[d] >= 1 && padding[d] >= 0 && dilation[d] >= 1, op,
             "stride and dilation must be positive and padding non-negative");
}

// `t` (named `name`) is a 4-D CUDA tensor of `sizes` with the dtype and device of x.
void check_like_x(const char* op, const char* name, const Tensor& t, const Tensor& x,
                  const std::vector<int64_t>& sizes) {
  PK_CHECK(t.is_cuda() && t.get_device_index() == x.get_device_index(), op, "argument '", name,
           "' must be on the device of 'x'");
  PK_CHECK(t.scalar_type() == x.scalar_type(), op, "argument '", name,
           "' must have the dtype of 'x'");
  PK_CHECK(t.dim() == 4, op, "argument '", name, "' must be 4-D, got ", t.dim(), "-D");
  for (int d = 0; d < 4; ++d)
    PK_CHECK(t.size(d) == sizes[d], op, "argument '", name, "' has size ", t.size(d),
             " in dimension ", d, ", expected ", sizes[d]);
}

ConvShape conv_shape(const Tensor& x, const Tensor& w, const std::vector<int64_t>& stride,
                     const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  ConvShape s{x.size(1), x.size(2), x.size(3), w.size(0), 0, 0, w.size(2), w.size(3),
              stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  s.out_h = (s.height + 2 * s.pad_h - s.dil_h * (s.kh - 1) - 1) / s.stride_h + 1;
  s.out_w = (s.width + 2 * s.pad_w - s.dil_w * (s.kw - 1) - 1) / s.stride_w + 1;
  return s;
}

template <typename Tile>
unsigned tile_blocks(const char* op, int64_t rows, int64_t cols, int64_t& tiles_r) {
  tiles_r = (rows + Tile::kRows - 1) / Tile::kRows;
  const int64_t blocks = tiles_r * ((cols + Tile::kCols - 1) / Tile::kCols);
  PK_CHECK(blocks < (int64_t{1} << 31), op, "too many tiles (", blocks, ") for one launch");
  return static_cast<unsigned>(blocks);
}

enum class Pass { kForward, kGradInput, kGradWeight };

// Checks one pass's arguments and launches it: out (the distances, gx or gw) written in place.
// `grad` is the incoming gradient (B, P, Ho, Wo) of the backward passes (unused by the forward).
template <Pass PASS>
void run_pass(const char* op, const Tensor& grad, const Tensor& x, const Tensor& w,
              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
              const std::vector<int64_t>& dilation, const std::string& precision,
              const Tensor& out) {
  check_conv(op, x, w, stride, padding, dilation);
  const ConvShape s = conv_shape(x, w, stride, padding, dilation);
  const std::vector<int64_t> out_sizes{x.size(0), s.protos, s.out_h, s.out_w};
  if constexpr (PASS == Pass::kForward) {
    check_like_x(op, "out", out, x, out_sizes);
  } else {
    check_like_x(op, "grad", grad, x, out_sizes);
    const Tensor& like = PASS == Pass::kGradInput ? x : w;
    check_like_x(op, "out", out, x, {like.size(0), like.size(1), like.size(2), like.size(3)});
  }
  const Precision p = parse_precision(precision, op);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  if (out.numel() == 0) return;
  const cudaStream_t stream = current_stream(x);
  const int64_t out_pixels = x.size(0) * s.out_h * s.out_w;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accumulate<T>::type;
    ConvArgs<T> args{tensor4<T>(x), tensor4<T>(w), tensor4<T>(grad), tensor4<T>(out), s};
    // The Hopper kernels' TF32 MMAs: float32 at "tf32" or "tf32x3"; the half types at "tf32",
    // exact for them (conv_tensor_map).
    constexpr bool kHopper = !std::is_same_v<T, double>;
    const Precision hopper_p = std::is_same_v<T, float> ? p : Precision::kTf32;
    if constexpr (PASS == Pass::kForward) {  // output pixels x prototypes, depth (c, i, j)
      args.rows = out_pixels, args.cols = s.protos, args.depth = s.channels * s.taps();
      if constexpr (kHopper)
        if (launch_hopper_conv<false, T>(x, w, s, x, out, hopper_p, stream)) return;
    } else if constexpr (PASS == Pass::kGradInput) {  // input pixels x channels, depth (p, i, j)
      args.rows = x.size(0) * s.height * s.width, args.cols = s.channels;
      args.depth = s.protos * s.taps();
      ConvShape transposed;
      if constexpr (kHopper)
        if (grad_input_shape(s, &transposed) &&
            launch_hopper_conv<true, T>(grad, w, transposed, x, out, hopper_p, stream))
          return;
    } else {  // prototypes x (c, i, j), depth the output pixels
      args.rows = s.protos, args.cols = s.channels * s.taps(), args.depth = out_pixels;
      if constexpr (kHopper)
        if (launch_hopper_weight_grad(grad, x, args, hopper_p, stream)) return;
    }
    dispatch_tile<T>(p, [&](auto tile, auto product) {
      using Tile = decltype(tile);
      constexpr Precision P = decltype(product)::value;
      const unsigned blocks = tile_blocks<Tile>(op, args.rows, args.cols, args.tiles_r);
      if constexpr (PASS == Pass::kForward) {
        kp_conv2d_kernel<T, Tile, P><<<blocks, Tile::kThreads, 0, stream>>>(args);
      } else if constexpr (PASS == Pass::kGradInput) {
        kp_conv2d_grad_input_kernel<T, Tile, P><<<blocks, Tile::kThreads, 0, stream>>>(args);
      } else {
        // Enough splits of the pixels for ~4 blocks per SM of an H100 (132 SMs): P x (c, i, j)
        // alone is a handful of tiles.
        const int64_t splits_wanted = std::max<int64_t>(1, 4 * 132 / blocks);
        args.split_pixels = std::max<int64_t>(1, (args.depth + splits_wanted - 1) / splits_wanted);
        const int64_t splits = (args.depth + args.split_pixels - 1) / args.split_pixels;
        const ScalarType acc_type =
            std::is_same_v<Acc, double> ? ScalarType::Double : ScalarType::Float;
        const std::vector<int64_t> partial_sizes{splits, args.rows, args.cols};
        const std::vector<int64_t> mass_sizes{splits, args.rows};
        Tensor partial = torch::stable::new_empty(x, partial_sizes, acc_type);
        Tensor mass = torch::stable::new_empty(x, mass_sizes, acc_type);
        args.partial = static_cast<Acc*>(partial.mutable_data_ptr());
        args.mass = static_cast<Acc*>(mass.mutable_data_ptr());
        kp_conv2d_grad_weight_kernel<T, Tile, P>
            <<<dim3(blocks, static_cast<unsigned>(splits)), Tile::kThreads, 0, stream>>>(args);
        PK_CHECK_LAUNCH();
        const PartialLayout layout{args.rows * args.cols, args.cols, s.taps(), 1, args.rows};
        kp_conv2d_grad_weight_sum_kernel<T><<<256, 256, 0, stream>>>(args, splits, layout);
      }
      PK_CHECK_LAUNCH();
    });
  });
}

}  // namespace

// x (B, C, H, W), w (P, C, kh, kw) -> out (B, P, Ho, Wo), written in place.
void kp_conv2d_cuda(Tensor x, Tensor w, std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation, std::string precision, Tensor out) {
  run_pass<Pass::kForward>("kp_conv2d_cuda", x, x, w, stride, padding, dilation, precision, out);
}

// gx = 2 x convT(sum_p g, ones) - 2 convT(g, w) into out (B, C, H, W).
void kp_conv2d_grad_input_cuda(Tensor grad, Tensor x, Tensor w, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation,
                               std::string precision, Tensor out) {
  run_pass<Pass::kGradInput>("kp_conv2d_grad_input_cuda", grad, x, w, stride, padding, dilation,
                             precision, out);
}

// gw = 2 w sum_{b,h,w} g - 2 corr(x, g) into out (P, C, kh, kw).
void kp_conv2d_grad_weight_cuda(Tensor grad, Tensor x, Tensor w, std::vector<int64_t> stride,
                                std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                std::string precision, Tensor out) {
  run_pass<Pass::kGradWeight>("kp_conv2d_grad_weight_cuda", grad, x, w, stride, padding,
                              dilation, precision, out);
}

// What these kernels can take, for the Python dispatch (protokernels/_capabilities.py): every
// floating dtype; on the current device, the Hopper kernels of the forward and both gradients
// (float32 at "tf32" or "tf32x3", the half types widened; stride 1 along the width; their other
// conditions in launch_hopper_conv, grad_input_shape and launch_hopper_weight_grad), which
// _backend.py's `auto` table reads.
std::string kp_conv_cuda_capabilities() {
  int device = 0;
  cudaGetDevice(&device);
  return std::string("dtypes=float16,bfloat16,float32,float64") +
         (hopper::hopper_available(device)
              ? ";hopper=kp_conv2d,kp_conv2d_grad_input,kp_conv2d_grad_weight"
              : "");
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("kp_conv_cuda_capabilities() -> str");
  m.def("kp_conv2d_cuda(Tensor x, Tensor w, int[] stride, int[] padding, int[] dilation, "
        "str precision, Tensor(a!) out) -> ()");
  m.def("kp_conv2d_grad_input_cuda(Tensor grad, Tensor x, Tensor w, int[] stride, "
        "int[] padding, int[] dilation, str precision, Tensor(a!) out) -> ()");
  m.def("kp_conv2d_grad_weight_cuda(Tensor grad, Tensor x, Tensor w, int[] stride, "
        "int[] padding, int[] dilation, str precision, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CompositeExplicitAutograd, m) {
  m.impl("kp_conv_cuda_capabilities", TORCH_BOX(&protokernels::kp_conv_cuda_capabilities));
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("kp_conv2d_cuda", TORCH_BOX(&protokernels::kp_conv2d_cuda));
  m.impl("kp_conv2d_grad_input_cuda", TORCH_BOX(&protokernels::kp_conv2d_grad_input_cuda));
  m.impl("kp_conv2d_grad_weight_cuda", TORCH_BOX(&protokernels::kp_conv2d_grad_weight_cuda));
}
