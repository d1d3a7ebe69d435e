// sqdist in CUDA: ||x||^2 - 2 x.y + ||y||^2 (clamped at 0) and its gradient, one tile kernel.
//
// Both are a batched product P = A B^T of an (R x K) and a (C x K) operand read through arbitrary
// strides (so broadcast and non-contiguous inputs need no copy), plus a per-row statistic of the
// tiles already in shared memory and an epilogue:
//   distance: A = x, B = y, K = D;  out = |a_r|^2 + |b_c|^2 - 2 P, clamped at 0
//   gradient: A = G (grad or grad^T), B = b^T, K = S;  out = 2 (rowsum(G)_r e_rc - P), e = a
// Products: WMMA tensor cores for half types and float32 "tf32"/"tf32x3" (3 TF32 products of the
// split hi + lo operands, ~1e-6 relative), FFMA for float32 "ieee" and float64. At most
// kDirectDepth features: the direct sum((x - y)^2) instead (no cancellation).
#include "tile_product.cuh"

namespace protokernels {
namespace {

using namespace tile;

enum class Epilogue { kDistance, kGradient };

template <typename T>
struct GemmArgs {
  Matrix<const T> a;  // (batch, rows, depth)
  Matrix<const T> b;  // (batch, cols, depth)
  Matrix<const T> e;  // gradient epilogue operand (batch, rows, cols)
  Matrix<T> out;      // (batch, rows, cols)
  int64_t rows, cols, depth, tiles_r, tiles_c;
};

template <typename T, typename Tile, Precision P, Epilogue E>
__global__ void __launch_bounds__(Tile::kThreads) sqdist_tile_kernel(const GemmArgs<T> args) {
  using S = Smem<T, Tile>;
  using Acc = typename S::Acc;
  __shared__ S smem;

  // One program per (batch, row tile, column tile), row tiles fastest: consecutive programs share
  // the column tile of B in L2. 1-D grid: the batch alone may exceed gridDim.y's 65535.
  const int64_t pid = blockIdx.x;
  const int64_t batch = pid / (args.tiles_r * args.tiles_c);
  const int64_t tile = pid % (args.tiles_r * args.tiles_c);
  const int64_t row0 = tile % args.tiles_r * Tile::kRows, col0 = tile / args.tiles_r * Tile::kCols;
  tile_product<T, Tile, P, E == Epilogue::kDistance ? RowStat::kSquares : RowStat::kSum,
               E == Epilogue::kDistance>(smem, operand(args.a, batch, args.rows),
                                         operand(args.b, batch, args.cols), args.depth, row0, col0);
  const int t = threadIdx.x;

  // Epilogue, row by row so that a warp writes consecutive outputs.
  for (int i = t; i < Tile::kRows * Tile::kCols; i += Tile::kThreads) {
    const int r = i / Tile::kCols, c = i % Tile::kCols;
    const int64_t gr = row0 + r, gc = col0 + c;
    if (gr >= args.rows || gc >= args.cols) continue;
    Acc value;
    if constexpr (E == Epilogue::kDistance) {
      value = smem.row_stat[r] + smem.col_stat[c] - Acc(2) * smem.tiles.c[r][c];
      value = value < Acc(0) ? Acc(0) : value;  // keeps NaN
    } else {
      const Acc e = widen(args.e.data[batch * args.e.batch + gr * args.e.row + gc * args.e.col]);
      value = Acc(2) * (smem.row_stat[r] * e - smem.tiles.c[r][c]);
    }
    args.out.data[batch * args.out.batch + gr * args.out.row + gc * args.out.col] = narrow<T>(value);
  }
}

// Shallow rows (depth <= kDirectDepth): out = sum_d (x_d - y_d)^2 directly, one thread per output
// element, without the expanded formula's cancellation.
template <typename T>
__global__ void sqdist_direct_kernel(Matrix<const T> x, Matrix<const T> y, Matrix<T> out,
                                     int64_t batches, int64_t rows, int64_t cols, int64_t depth) {
  using Acc = typename Accumulate<T>::type;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < batches * rows * cols;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t batch = i / (rows * cols), r = i / cols % rows, c = i % cols;
    const T* xr = x.data + batch * x.batch + r * x.row;
    const T* yc = y.data + batch * y.batch + c * y.row;
    Acc sum = 0;
    for (int64_t d = 0; d < depth; ++d) {
      const Acc diff = widen(xr[d * x.col]) - widen(yc[d * y.col]);
      sum += diff * diff;
    }
    out.data[batch * out.batch + r * out.row + c * out.col] = narrow<T>(sum);
  }
}

template <typename T, typename Tile, Precision P, Epilogue E>
void launch_tiles(GemmArgs<T> args, int64_t batch, cudaStream_t stream) {
  args.tiles_r = (args.rows + Tile::kRows - 1) / Tile::kRows;
  args.tiles_c = (args.cols + Tile::kCols - 1) / Tile::kCols;
  const int64_t programs = batch * args.tiles_r * args.tiles_c;
  PK_CHECK(programs < (int64_t{1} << 31), "sqdist", "too many tiles (", programs,
           ") for one launch");
  sqdist_tile_kernel<T, Tile, P, E>
      <<<static_cast<unsigned>(programs), Tile::kThreads, 0, stream>>>(args);
  PK_CHECK_LAUNCH();
}

template <Epilogue E, typename T>
void launch(const GemmArgs<T>& args, int64_t batch, Precision precision, cudaStream_t stream) {
  dispatch_tile<T>(precision, [&](auto tile, auto product) {
    launch_tiles<T, decltype(tile), decltype(product)::value, E>(args, batch, stream);
  });
}

}  // namespace

// x (B, N, D), y (B, M, D) -> (B, N, M).
Tensor sqdist_cuda(Tensor x, Tensor y, std::string precision) {
  const char* op = "sqdist_cuda";
  check_batched_rows(op, x, y);
  const Precision p = parse_precision(precision, op);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor out = torch::stable::new_empty(x, {x.size(0), x.size(1), y.size(1)});
  if (out.numel() == 0) return out;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (x.size(2) <= kDirectDepth) {
      sqdist_direct_kernel<T><<<blocks_for(out.numel()), kThreads, 0, current_stream(x)>>>(
          input<T>(x, 1, 2), input<T>(y, 1, 2), output<T>(out), x.size(0), x.size(1), y.size(1),
          x.size(2));
      PK_CHECK_LAUNCH();
      return;
    }
    GemmArgs<T> args{input<T>(x, 1, 2), input<T>(y, 1, 2), {}, output<T>(out),
                     x.size(1), y.size(1), x.size(2)};
    launch<Epilogue::kDistance>(args, x.size(0), p, current_stream(x));
  });
  return out;
}

// 2 (rowsum(G) a - G b) with G = grad (B, R, S), or grad^T if transpose; a (B, R, D), b (B, S, D).
Tensor sqdist_grad_cuda(Tensor grad, Tensor a, Tensor b, bool transpose, std::string precision) {
  const char* op = "sqdist_grad_cuda";
  PK_CHECK_CUDA(op, "grad", grad);
  PK_CHECK_CUDA(op, "a", a);
  PK_CHECK_CUDA(op, "b", b);
  PK_CHECK_DIM(op, "grad", grad, 3);
  PK_CHECK_DIM(op, "a", a, 3);
  PK_CHECK_DIM(op, "b", b, 3);
  PK_CHECK_SAME(op, "dtype", "grad", grad.scalar_type(), "a", a.scalar_type());
  PK_CHECK_SAME(op, "dtype", "a", a.scalar_type(), "b", b.scalar_type());
  const int rows_dim = transpose ? 2 : 1, inner_dim = transpose ? 1 : 2;
  PK_CHECK_SAME(op, "row count", "grad", grad.size(rows_dim), "a", a.size(1));
  PK_CHECK_SAME(op, "column count", "grad", grad.size(inner_dim), "b", b.size(1));
  PK_CHECK_SAME(op, "feature size D", "a", a.size(2), "b", b.size(2));
  const Precision p = parse_precision(precision, op);
  torch::stable::accelerator::DeviceGuard guard(a.get_device_index());
  Tensor out = torch::stable::new_empty(a, {a.size(0), a.size(1), a.size(2)});
  if (out.numel() == 0) return out;
  dispatch_floating(a.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    // A = G (R x S); B = b^T (D x S): element (d, s) is b[s, d]; the epilogue reads a (R x D).
    GemmArgs<T> args{input<T>(grad, rows_dim, inner_dim), input<T>(b, 2, 1), input<T>(a, 1, 2),
                     output<T>(out), a.size(1), a.size(2), b.size(1)};
    launch<Epilogue::kGradient>(args, a.size(0), p, current_stream(a));
  });
  return out;
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("sqdist_cuda(Tensor x, Tensor y, str precision) -> Tensor");
  m.def("sqdist_grad_cuda(Tensor grad, Tensor a, Tensor b, bool transpose, str precision) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("sqdist_cuda", TORCH_BOX(&protokernels::sqdist_cuda));
  m.impl("sqdist_grad_cuda", TORCH_BOX(&protokernels::sqdist_grad_cuda));
}
