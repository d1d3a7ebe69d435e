// sqdist in CUDA: ||x||^2 - 2 x.y + ||y||^2 (clamped at 0) and its gradient, one tile kernel.
//
// Both are a batched product P = A B^T of an (R x K) and a (C x K) operand read through arbitrary
// strides (so broadcast and non-contiguous inputs need no copy), plus a per-row statistic of the
// tiles already in shared memory and an epilogue:
//   distance: A = x, B = y, K = D;  out = |a_r|^2 + |b_c|^2 - 2 P, clamped at 0
//   gradient: A = G (grad or grad^T), B = b^T, K = S;  out = 2 (rowsum(G)_r e_rc - P), e = a
// Products: WMMA tensor cores for half types and float32 "tf32"/"tf32x3" (3 TF32 products of the
// split hi + lo operands, ~1e-6 relative), FFMA for float32 "ieee" and float64.
#include <mma.h>

#include "common.h"

namespace protokernels {
namespace {

enum class Epilogue { kDistance, kGradient };

// A batch of strided matrices: element (b, r, c) at data[b * batch + r * row + c * col].
template <typename T>
struct Matrix {
  T* data;
  int64_t batch, row, col;
};

// Dimensions row_dim and col_dim of a 3-D tensor (dimension 0 is the batch), read in place.
template <typename T>
Matrix<const T> input(const Tensor& t, int row_dim, int col_dim) {
  return {static_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(row_dim),
          t.stride(col_dim)};
}

template <typename T>
Matrix<T> output(const Tensor& t) {
  return {static_cast<T*>(t.mutable_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
struct GemmArgs {
  Matrix<const T> a;  // (batch, rows, depth)
  Matrix<const T> b;  // (batch, cols, depth)
  Matrix<const T> e;  // gradient epilogue operand (batch, rows, cols)
  Matrix<T> out;      // (batch, rows, cols)
  int64_t rows, cols, depth, tiles_r, tiles_c;
};

// Tile shapes. Shared-memory tiles are stored k-major ([depth][rows]) so that the per-row
// statistic reads consecutive rows across a warp (no bank conflicts) and WMMA loads them as
// col-major A / row-major B^T; rows are padded by 16 bytes, the WMMA ldm alignment.
struct FmaTile {
  static constexpr int kRows = 64, kCols = 64, kDepth = 16, kThreads = 256;
};
struct MmaTile {
  static constexpr int kRows = 128, kCols = 64, kDepth = 32, kThreads = 256;
  static constexpr int kWarpRows = 32, kWarpCols = 32;  // 8 warps as 4 x 2
};

template <typename T, typename Tile>
struct Smem {
  using Acc = typename Accumulate<T>::type;
  static constexpr int kPad = 16 / sizeof(T);
  static constexpr int kLdA = Tile::kRows + kPad, kLdB = Tile::kCols + kPad;
  static constexpr int kLdC = Tile::kCols + 16 / sizeof(Acc);
  struct Operands {
    T a[Tile::kDepth][kLdA];
    T b[Tile::kDepth][kLdB];
  };
  // The operand tiles are dead once the product is in registers: the result tile reuses them.
  union alignas(32) Tiles {
    Operands operands;
    Acc c[Tile::kRows][kLdC];
  };
  Tiles tiles;
  Acc row_stat[Tile::kRows];
  Acc col_stat[Tile::kCols];
};

// Copies the (ROWS x kDepth) tile at (row0, k0) of an operand into k-major shared memory,
// zero-filling outside the matrix. Threads walk the operand's contiguous dimension for coalescing.
template <int ROWS, int DEPTH, int THREADS, typename T, int LD>
__device__ __forceinline__ void load_tile(T (*dst)[LD], const T* src, int64_t row_stride,
                                          int64_t k_stride, int64_t rows, int64_t depth,
                                          int64_t row0, int64_t k0) {
  const bool k_contiguous = k_stride == 1;
  for (int i = threadIdx.x; i < ROWS * DEPTH; i += THREADS) {
    const int r = k_contiguous ? i / DEPTH : i % ROWS;
    const int k = k_contiguous ? i % DEPTH : i / ROWS;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[k][r] = (gr < rows && gk < depth) ? src[gr * row_stride + gk * k_stride] : narrow<T>(0.0f);
  }
}

// P += A B^T on FFMA: each thread owns a 4 x 4 block of the tile, strided by 16 so that a warp
// reads 16 consecutive shared-memory words of B and broadcasts A.
template <typename T, typename Acc, int LD_A, int LD_B>
struct FmaProduct {
  Acc acc[4][4] = {};
  __device__ __forceinline__ void step(const T (*a)[LD_A], const T (*b)[LD_B]) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int k = 0; k < FmaTile::kDepth; ++k) {
      Acc av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = widen(a[k][ty + 16 * i]);
        bv[i] = widen(b[k][tx + 16 * i]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
  }
  template <int LD_C>
  __device__ __forceinline__ void store(Acc (*c)[LD_C]) const {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[ty + 16 * i][tx + 16 * j] = acc[i][j];
  }
};

namespace wmma = nvcuda::wmma;

// WMMA operand element type and k-step per input type.
template <typename T> struct MmaKind;
template <> struct MmaKind<float> { using Element = wmma::precision::tf32; static constexpr int kK = 8; };
template <> struct MmaKind<__half> { using Element = __half; static constexpr int kK = 16; };
template <> struct MmaKind<__nv_bfloat16> { using Element = __nv_bfloat16; static constexpr int kK = 16; };

template <typename T, Precision P, int LD_A, int LD_B>
struct MmaProduct {
  static constexpr int kK = MmaKind<T>::kK;
  using Element = typename MmaKind<T>::Element;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kK, Element, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kK, Element, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kK, float>;
  static constexpr int kFragRows = MmaTile::kWarpRows / 16, kFragCols = MmaTile::kWarpCols / 16;
  FragC acc[kFragRows][kFragCols];

  __device__ MmaProduct() {
#pragma unroll
    for (int i = 0; i < kFragRows; ++i)
#pragma unroll
      for (int j = 0; j < kFragCols; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ static int warp_row() { return (threadIdx.x / 32) / 2 * MmaTile::kWarpRows; }
  __device__ static int warp_col() { return (threadIdx.x / 32) % 2 * MmaTile::kWarpCols; }

  // float -> (hi, lo) TF32 parts; lo is dropped for plain "tf32".
  template <typename Frag>
  __device__ static void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float v = hi.x[i];
      hi.x[i] = wmma::__float_to_tf32(v);
      if constexpr (P == Precision::kTf32x3) lo.x[i] = wmma::__float_to_tf32(v - hi.x[i]);
    }
  }

  __device__ __forceinline__ void step(const T (*a)[LD_A], const T (*b)[LD_B]) {
#pragma unroll
    for (int k = 0; k < MmaTile::kDepth; k += kK) {
      FragA fa[kFragRows], fa_lo[kFragRows];
      FragB fb[kFragCols], fb_lo[kFragCols];
#pragma unroll
      for (int i = 0; i < kFragRows; ++i) {
        wmma::load_matrix_sync(fa[i], &a[k][warp_row() + 16 * i], LD_A);
        if constexpr (std::is_same_v<T, float>) split(fa[i], fa_lo[i]);
      }
#pragma unroll
      for (int j = 0; j < kFragCols; ++j) {
        wmma::load_matrix_sync(fb[j], &b[k][warp_col() + 16 * j], LD_B);
        if constexpr (std::is_same_v<T, float>) split(fb[j], fb_lo[j]);
      }
#pragma unroll
      for (int i = 0; i < kFragRows; ++i)
#pragma unroll
        for (int j = 0; j < kFragCols; ++j) {
          if constexpr (P == Precision::kTf32x3) {  // small terms first
            wmma::mma_sync(acc[i][j], fa_lo[i], fb[j], acc[i][j]);
            wmma::mma_sync(acc[i][j], fa[i], fb_lo[j], acc[i][j]);
          }
          wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
    }
  }
  template <int LD_C>
  __device__ __forceinline__ void store(float (*c)[LD_C]) const {
#pragma unroll
    for (int i = 0; i < kFragRows; ++i)
#pragma unroll
      for (int j = 0; j < kFragCols; ++j)
        wmma::store_matrix_sync(&c[warp_row() + 16 * i][warp_col() + 16 * j], acc[i][j], LD_C,
                                wmma::mem_row_major);
  }
};

template <typename T, typename Tile, Precision P>
struct ProductFor {
  using S = Smem<T, Tile>;
  using type = FmaProduct<T, typename S::Acc, S::kLdA, S::kLdB>;
};
template <typename T, Precision P>
struct ProductFor<T, MmaTile, P> {
  using S = Smem<T, MmaTile>;
  using type = MmaProduct<T, P, S::kLdA, S::kLdB>;
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
  const T* a = args.a.data + batch * args.a.batch;
  const T* b = args.b.data + batch * args.b.batch;

  typename ProductFor<T, Tile, P>::type product;
  // Threads [0, kRows) keep their A row's statistic (|a|^2 or rowsum), the next kCols B's |b|^2.
  Acc stat = 0;
  const int t = threadIdx.x;
  for (int64_t k0 = 0; k0 < args.depth; k0 += Tile::kDepth) {
    load_tile<Tile::kRows, Tile::kDepth, Tile::kThreads>(smem.tiles.operands.a, a, args.a.row,
                                                         args.a.col, args.rows, args.depth, row0, k0);
    load_tile<Tile::kCols, Tile::kDepth, Tile::kThreads>(smem.tiles.operands.b, b, args.b.row,
                                                         args.b.col, args.cols, args.depth, col0, k0);
    __syncthreads();
    if (t < Tile::kRows) {
#pragma unroll
      for (int k = 0; k < Tile::kDepth; ++k) {
        const Acc v = widen(smem.tiles.operands.a[k][t]);
        stat += E == Epilogue::kDistance ? v * v : v;
      }
    } else if (E == Epilogue::kDistance && t < Tile::kRows + Tile::kCols) {
#pragma unroll
      for (int k = 0; k < Tile::kDepth; ++k) {
        const Acc v = widen(smem.tiles.operands.b[k][t - Tile::kRows]);
        stat += v * v;
      }
    }
    product.step(smem.tiles.operands.a, smem.tiles.operands.b);
    __syncthreads();
  }
  if (t < Tile::kRows) smem.row_stat[t] = stat;
  else if (t < Tile::kRows + Tile::kCols) smem.col_stat[t - Tile::kRows] = stat;
  product.store(smem.tiles.c);
  __syncthreads();

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

// FFMA for float64 and float32 "ieee"; tensor cores otherwise.
template <Epilogue E, typename T>
void launch(const GemmArgs<T>& args, int64_t batch, Precision precision, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, double>) {
    launch_tiles<T, FmaTile, Precision::kIeee, E>(args, batch, stream);
  } else if constexpr (std::is_same_v<T, float>) {
    switch (precision) {
      case Precision::kIeee: return launch_tiles<T, FmaTile, Precision::kIeee, E>(args, batch, stream);
      case Precision::kTf32x3: return launch_tiles<T, MmaTile, Precision::kTf32x3, E>(args, batch, stream);
      case Precision::kTf32: return launch_tiles<T, MmaTile, Precision::kTf32, E>(args, batch, stream);
    }
  } else {
    launch_tiles<T, MmaTile, Precision::kIeee, E>(args, batch, stream);
  }
}

}  // namespace

// x (B, N, D), y (B, M, D) -> (B, N, M).
Tensor sqdist_cuda(Tensor x, Tensor y, std::string precision) {
  const char* op = "sqdist_cuda";
  PK_CHECK_CUDA(op, "x", x);
  PK_CHECK_CUDA(op, "y", y);
  PK_CHECK_DIM(op, "x", x, 3);
  PK_CHECK_DIM(op, "y", y, 3);
  PK_CHECK_SAME(op, "device", "x", x.device(), "y", y.device());
  PK_CHECK_SAME(op, "dtype", "x", x.scalar_type(), "y", y.scalar_type());
  PK_CHECK_SAME(op, "batch size", "x", x.size(0), "y", y.size(0));
  PK_CHECK_SAME(op, "feature size D", "x", x.size(2), "y", y.size(2));
  const Precision p = parse_precision(precision, op);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor out = torch::stable::new_empty(x, {x.size(0), x.size(1), y.size(1)});
  if (out.numel() == 0) return out;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
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
