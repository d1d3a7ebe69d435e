// kp_conv2d in CUDA: the kernel-prototype convolution and its two gradients as implicit GEMMs on
// sqdist's tile product (tile_product.cuh), with operands that gather from the 4-D tensors:
//   forward:      A = im2col(x) (output pixels x (c, i, j)), B = w (P x (c, i, j));
//                 out = |window|^2 + |w|^2 - 2 A B^T, both norms from the loaded tiles
//   grad input:   A = g scattered to input pixels (pixels x (p, i, j)), B = w by channel
//                 (C x (p, i, j)); gx = 2 (rowsum(A) x - A B^T)
//   grad weight:  A = g (P x pixels), B = im2col(x)^T ((c, i, j) x pixels), the pixels split
//                 over blocks; gw = 2 (rowsum(A) w - A B^T) from the splits' partial sums
// The gathers do 64-bit index math per element; this is the portable fallback behind the Triton
// kernels (RESULTS.md, "kp_conv2d").
#include <vector>

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

// gw = 2 (sum_s mass[s] w - sum_s partial[s]), one thread per element of w.
template <typename T>
__global__ void kp_conv2d_grad_weight_sum_kernel(const ConvArgs<T> args, int64_t splits) {
  using Acc = typename Accumulate<T>::type;
  const int64_t elements = args.rows * args.cols;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < elements;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = e / args.cols, k = e % args.cols;
    Acc mass = 0, cross = 0;
    for (int64_t s = 0; s < splits; ++s) {
      mass += args.mass[s * args.rows + p];
      cross += args.partial[s * elements + e];
    }
    const int64_t c = k / args.s.taps(), i = k / args.s.kw % args.s.kh, j = k % args.s.kw;
    args.out.at(p, c, i, j) = narrow<T>(Acc(2) * (mass * widen(args.w.at(p, c, i, j)) - cross));
  }
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
    if constexpr (PASS == Pass::kForward) {  // output pixels x prototypes, depth (c, i, j)
      args.rows = out_pixels, args.cols = s.protos, args.depth = s.channels * s.taps();
    } else if constexpr (PASS == Pass::kGradInput) {  // input pixels x channels, depth (p, i, j)
      args.rows = x.size(0) * s.height * s.width, args.cols = s.channels;
      args.depth = s.protos * s.taps();
    } else {  // prototypes x (c, i, j), depth the output pixels
      args.rows = s.protos, args.cols = s.channels * s.taps(), args.depth = out_pixels;
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
        kp_conv2d_grad_weight_sum_kernel<T><<<256, 256, 0, stream>>>(args, splits);
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

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("kp_conv2d_cuda(Tensor x, Tensor w, int[] stride, int[] padding, int[] dilation, "
        "str precision, Tensor(a!) out) -> ()");
  m.def("kp_conv2d_grad_input_cuda(Tensor grad, Tensor x, Tensor w, int[] stride, "
        "int[] padding, int[] dilation, str precision, Tensor(a!) out) -> ()");
  m.def("kp_conv2d_grad_weight_cuda(Tensor grad, Tensor x, Tensor w, int[] stride, "
        "int[] padding, int[] dilation, str precision, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("kp_conv2d_cuda", TORCH_BOX(&protokernels::kp_conv2d_cuda));
  m.impl("kp_conv2d_grad_input_cuda", TORCH_BOX(&protokernels::kp_conv2d_grad_input_cuda));
  m.impl("kp_conv2d_grad_weight_cuda", TORCH_BOX(&protokernels::kp_conv2d_grad_weight_cuda));
}
