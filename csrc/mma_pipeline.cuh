// Tensor-core tile products on mma.sync (sm_80 and later), fed by a cp.async multistage pipeline:
// the portable fast path of the GEMM-shaped searches (nearest.cu). tile_product.cuh's WMMA tiles
// load element by element and leave the result in shared memory; here the operand tiles stream in
// asynchronously kStages deep and the product stays in registers, where the caller's epilogue
// (e.g. an argmin fold) reads it in mma's accumulator layout.
//
// Operand tiles are stored row-major in 32-bit words ([row][depth word]), rows padded by 4 words:
// every fragment load of a warp then reads 32 distinct banks. In words, the fragments of
// m16n8k8 (tf32) and m16n8k16 (f16, bf16) have the same layout, so one loader serves all three.
#pragma once

#include <cstdint>
#include <type_traits>

#include "async_copy.cuh"
#include "common.h"

namespace protokernels {
namespace mma {

using Word = uint32_t;

// Block tile: kRows rows of A by kCols rows of B, kWords words of depth per pipeline stage; 8
// warps as 4 x 2, each owning a 32 x 64 tile of the product, i.e. kFragRows x kFragCols m16n8
// accumulator tiles.
struct Tile {
  static constexpr int kRows = 128, kCols = 128, kWords = 32, kStages = 3, kThreads = 256;
  static constexpr int kWarpRows = 32, kWarpCols = 64;
  static constexpr int kFragRows = kWarpRows / 16, kFragCols = kWarpCols / 8;
  static constexpr int kLd = kWords + 4;
  static constexpr int kChunks = kWords / 4;  // 16-byte chunks per tile row
};

struct Stage {
  Word a[Tile::kRows][Tile::kLd];
  Word b[Tile::kCols][Tile::kLd];
};

// Elements of T per pipeline stage (along the depth).
template <typename T>
constexpr int64_t stage_depth() { return Tile::kWords * 4 / sizeof(T); }

// An operand: a (rows x depth) strided matrix. `vector`: rows start 16-byte aligned with unit
// column stride, so that the loader copies 16-byte chunks asynchronously; otherwise it reads
// element by element (any strides: a transposed or expanded input, D not a multiple of the chunk).
template <typename T>
struct Operand {
  const T* data;
  int64_t row, col, rows;
  bool vector;
};

// Copies ROWS tile rows starting at row0, depth elements [k0, k0 + stage_depth), into dst,
// zero-filling outside the matrix. A thread copies the same 16-byte column of rows r0, r0 + 32,
// ...: the column's bounds are worked out once per stage, and the address math is a few
// instructions a chunk (it competes with the tensor-core instructions for issue slots).
template <int ROWS, typename T>
__device__ __forceinline__ void load_rows(Word (*dst)[Tile::kLd], const Operand<T>& src,
                                          int64_t depth, int64_t row0, int64_t k0) {
  constexpr int kElements = 16 / sizeof(T);
  constexpr int kRowStep = Tile::kThreads / Tile::kChunks;
  static_assert(ROWS % kRowStep == 0, "whole chunks per thread");
  const int q = threadIdx.x % Tile::kChunks, r0 = threadIdx.x / Tile::kChunks;
  const int64_t gk = k0 + q * kElements, first = row0 + r0;
  if (src.vector) {
    const int64_t left = depth - gk;
    const int valid = left <= 0 ? 0 : (left >= kElements ? 16 : static_cast<int>(left * sizeof(T)));
    const T* p = src.data + first * src.row + gk;
#pragma unroll
    for (int i = 0; i < ROWS / kRowStep; ++i) {
      const int bytes = first + i * kRowStep < src.rows ? valid : 0;
      copy_async<16>(&dst[r0 + i * kRowStep][q * 4], bytes ? p + i * kRowStep * src.row : src.data,
                     bytes);
    }
  } else {
#pragma unroll
    for (int i = 0; i < ROWS / kRowStep; ++i) {
      const int64_t gr = first + i * kRowStep;
      union {
        T v[kElements];
        uint4 chunk;
      } u;
#pragma unroll
      for (int e = 0; e < kElements; ++e)
        u.v[e] = gr < src.rows && gk + e < depth ? src.data[gr * src.row + (gk + e) * src.col]
                                                  : narrow<T>(0.0f);
      *reinterpret_cast<uint4*>(&dst[r0 + i * kRowStep][q * 4]) = u.chunk;
    }
  }
}

// One stage of A (kRows rows at a_row0) and B (kCols rows at b_row0), depth from k0.
template <typename T>
__device__ __forceinline__ void load_stage(Stage& stage, const Operand<T>& a, const Operand<T>& b,
                                           int64_t depth, int64_t a_row0, int64_t b_row0,
                                           int64_t k0) {
  load_rows<Tile::kRows>(stage.a, a, depth, a_row0, k0);
  load_rows<Tile::kCols>(stage.b, b, depth, b_row0, k0);
}

// Four 8 x (4 words) matrices from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8 and receives word l % 4 of row l / 4 of each matrix, i.e. mma's fragment layout.
__device__ __forceinline__ void load_matrices(Word (&r)[4], const Word* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// c += a b on the tensor cores: m16n8k8 for float (as TF32), m16n8k16 for the half types.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const Word (&a)[4], const Word (&b)[2]) {
  if constexpr (std::is_same_v<T, float>) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// "tf32x3": a float word -> its TF32 part (hi, the top 19 bits) and the remainder (lo), exact in
// float. (Plain TF32 passes the float words as they are: the tensor cores read the top 19 bits.)
template <typename T, Precision P, int N>
__device__ __forceinline__ void split(Word (&hi)[N], Word (&lo)[N]) {
  if constexpr (std::is_same_v<T, float> && P == Precision::kTf32x3) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const Word top = hi[i] & 0xFFFFE000u;
      lo[i] = __float_as_uint(__uint_as_float(hi[i]) - __uint_as_float(top));
      hi[i] = top;
    }
  }
}

// The warp's 32 x 64 tile of A B^T: acc[i][j] is m16n8 tile (i, j), in mma's accumulator layout
// (lane = 4 g + t holds rows g and g + 8, columns 2t and 2t + 1: elements 0, 1 and 2, 3).
template <typename T, Precision P>
struct Product {
  float acc[Tile::kFragRows][Tile::kFragCols][4];

  __device__ void clear() {
#pragma unroll
    for (int i = 0; i < Tile::kFragRows; ++i)
#pragma unroll
      for (int j = 0; j < Tile::kFragCols; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  // The warp's first row and column within the block tile.
  __device__ static int warp_row() { return threadIdx.x / 32 / 2 * Tile::kWarpRows; }
  __device__ static int warp_col() { return threadIdx.x / 32 % 2 * Tile::kWarpCols; }

  __device__ __forceinline__ void step(const Stage& s) {
    const int lane = threadIdx.x % 32, m = lane / 8;
    // ldmatrix addresses: A's matrices are (rows 0-7, 8-15) x (words k, k + 4); B's are (tile
    // j, j + 1) x (words k, k + 4).
    const Word* a_row = s.a[warp_row() + lane % 8 + 8 * (m % 2)] + 4 * (m / 2);
    const Word* b_row = s.b[warp_col() + lane % 8 + 8 * (m / 2)] + 4 * (m % 2);
#pragma unroll
    for (int k = 0; k < Tile::kWords; k += 8) {
      Word a[Tile::kFragRows][4], a_lo[Tile::kFragRows][4];
#pragma unroll
      for (int i = 0; i < Tile::kFragRows; ++i) {
        load_matrices(a[i], a_row + 16 * i * Tile::kLd + k);
        split<T, P>(a[i], a_lo[i]);
      }
#pragma unroll
      for (int j = 0; j < Tile::kFragCols; j += 2) {
        Word pair[4];
        load_matrices(pair, b_row + 8 * j * Tile::kLd + k);
        Word b[2][2] = {{pair[0], pair[1]}, {pair[2], pair[3]}}, b_lo[2][2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          split<T, P>(b[h], b_lo[h]);
#pragma unroll
          for (int i = 0; i < Tile::kFragRows; ++i) {
            if constexpr (std::is_same_v<T, float> && P == Precision::kTf32x3) {  // small first
              mma<T>(acc[i][j + h], a_lo[i], b[h]);
              mma<T>(acc[i][j + h], a[i], b_lo[h]);
            }
            mma<T>(acc[i][j + h], a[i], b[h]);
          }
        }
      }
    }
  }
};

}  // namespace mma
}  // namespace protokernels
