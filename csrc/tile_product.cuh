// The tile machinery shared by the GEMM-shaped kernels (sqdist, nearest): strided batched
// matrices, shared-memory tile layouts, and the tile product P += A B^T on FFMA or WMMA tensor cores.
//
// A kernel loads (rows x kDepth) tiles of A and B into k-major shared memory with load_tile, calls
// product.step per depth step, then product.store into the result tile for its epilogue.
#pragma once

#include <mma.h>

#include <type_traits>

#include "common.h"

namespace protokernels {
namespace tile {

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

// An operand of the tile product: a (rows x depth) matrix read element by element. Besides
// strided matrices (this one), the implicit-GEMM convolutions define operands that gather, e.g.
// the im2col matrix of an image (kp_conv.cu). Every operand has: `rows`; `k_contiguous()`,
// whether consecutive k are adjacent in memory (the loader then walks k fastest, for coalescing);
// and `at(r, k)`, called for r < rows and k < depth only.
template <typename T>
struct StridedOperand {
  const T* data;
  int64_t row, col, rows;
  __device__ bool k_contiguous() const { return col == 1; }
  __device__ T at(int64_t r, int64_t k) const { return data[r * row + k * col]; }
};

// Batch `batch` of a strided matrix with `rows` rows, as an operand.
template <typename T>
__device__ StridedOperand<T> operand(const Matrix<const T>& m, int64_t batch, int64_t rows) {
  return {m.data + batch * m.batch, m.row, m.col, rows};
}

// Copies the (ROWS x kDepth) tile at (row0, k0) of an operand into k-major shared memory,
// zero-filling outside the matrix.
template <int ROWS, int DEPTH, int THREADS, typename T, int LD, typename Operand>
__device__ __forceinline__ void load_tile(T (*dst)[LD], const Operand& src, int64_t depth,
                                          int64_t row0, int64_t k0) {
  const bool k_contiguous = src.k_contiguous();
  for (int i = threadIdx.x; i < ROWS * DEPTH; i += THREADS) {
    const int r = k_contiguous ? i / DEPTH : i % ROWS;
    const int k = k_contiguous ? i % DEPTH : i / ROWS;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[k][r] = (gr < src.rows && gk < depth) ? src.at(gr, gk) : narrow<T>(0.0f);
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

  // "tf32x3" sums each step's products from zero and adds them to acc in float32: the tensor
  // cores' accumulation loses precision with every k8 product (H100, sums of 4100: 4.1e-5
  // relative error in place, past the 1e-5 that "tf32x3" promises; RESULTS.md "The Hopper
  // gradient").
  __device__ __forceinline__ void step(const T (*a)[LD_A], const T (*b)[LD_B]) {
    if constexpr (P == Precision::kTf32x3) {
      FragC total[kFragRows][kFragCols];
#pragma unroll
      for (int i = 0; i < kFragRows; ++i)
#pragma unroll
        for (int j = 0; j < kFragCols; ++j) {
          total[i][j] = acc[i][j];
          wmma::fill_fragment(acc[i][j], 0.0f);
        }
      multiply(a, b);
#pragma unroll
      for (int i = 0; i < kFragRows; ++i)
#pragma unroll
        for (int j = 0; j < kFragCols; ++j)
#pragma unroll
          for (int e = 0; e < total[i][j].num_elements; ++e) acc[i][j].x[e] += total[i][j].x[e];
    } else {
      multiply(a, b);
    }
  }
  __device__ __forceinline__ void multiply(const T (*a)[LD_A], const T (*b)[LD_B]) {
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

// What the threads of a tile keep about the A rows they load: |a|^2 (distances) or sum(a)
// (gradients' rowsum). B's columns always get |b|^2 when wanted.
enum class RowStat { kSquares, kSum };

// smem.tiles.c = the (kRows x kCols) tile of A B^T at (row0, col0), over the full depth; smem.row_stat = the A rows' statistic and, with COL_SQUARES, smem.col_stat = |b|^2, both
// from the tiles already in shared memory (no second pass over the inputs). Ends synchronized.
template <typename T, typename Tile, Precision P, RowStat ROW_STAT, bool COL_SQUARES,
          typename OperandA, typename OperandB>
__device__ __forceinline__ void tile_product(Smem<T, Tile>& smem, const OperandA& a,
                                             const OperandB& b, int64_t depth, int64_t row0,
                                             int64_t col0) {
  using Acc = typename Smem<T, Tile>::Acc;
  typename ProductFor<T, Tile, P>::type product;
  // Threads [0, kRows) keep their A row's statistic, the next kCols their B column's.
  Acc stat = 0;
  const int t = threadIdx.x;
  for (int64_t k0 = 0; k0 < depth; k0 += Tile::kDepth) {
    load_tile<Tile::kRows, Tile::kDepth, Tile::kThreads>(smem.tiles.operands.a, a, depth, row0, k0);
    load_tile<Tile::kCols, Tile::kDepth, Tile::kThreads>(smem.tiles.operands.b, b, depth, col0, k0);
    __syncthreads();
    if (t < Tile::kRows) {
#pragma unroll
      for (int k = 0; k < Tile::kDepth; ++k) {
        const Acc v = widen(smem.tiles.operands.a[k][t]);
        stat += ROW_STAT == RowStat::kSquares ? v * v : v;
      }
    } else if (COL_SQUARES && t < Tile::kRows + Tile::kCols) {
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
}

// Calls f(Tile{}, std::integral_constant<Precision, P>{}) with the tile and product for T at
// `precision`: FFMA tiles for float64 and float32 "ieee", tensor-core tiles otherwise.
template <typename T, typename F>
void dispatch_tile(Precision precision, F&& f) {
  using Ieee = std::integral_constant<Precision, Precision::kIeee>;
  if constexpr (std::is_same_v<T, double>) {
    f(FmaTile{}, Ieee{});
  } else if constexpr (std::is_same_v<T, float>) {
    switch (precision) {
      case Precision::kIeee: return f(FmaTile{}, Ieee{});
      case Precision::kTf32x3:
        return f(MmaTile{}, std::integral_constant<Precision, Precision::kTf32x3>{});
      case Precision::kTf32:
        return f(MmaTile{}, std::integral_constant<Precision, Precision::kTf32>{});
    }
  } else {
    f(MmaTile{}, Ieee{});
  }
}

}  // namespace tile
}  // namespace protokernels
