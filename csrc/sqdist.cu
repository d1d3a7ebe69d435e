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
// On a Hopper GPU (sm_90a builds) the distance at "tf32", "tf32x3" and in half precision runs
// hopper_distance_kernel instead: hopper.cuh's row-block walk (TMA, wgmma; "tf32x3" on split
// products), one consumer storing its tile while the other multiplies the next; the gradient
// there runs hopper_grad_kernel (float32 at "tf32" and "tf32x3", the half types).
#include "hopper.cuh"
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

// ---- The Hopper distance (sm_90a): the row-block walk, whose consumers store their tiles ----

// The output is 4 bytes per pair in float32 (537 MB at the spec size, B8 N4096 M4096 D128): one
// consumer's stores drain while the other's MMAs run. The rows' and the columns' squared norms
// come from the boxes already in shared memory (x's once, each column tile's as it passes), so
// the call is one launch. What bounds it (ncu, H200, spec size): not DRAM (22 % busy; the
// stores run at 1.6 TB/s where a plain fill writes 4.5), but the consumer warps' waits on shared
// memory (60 % of their cycles), 8 warps an SM being too few to hide them.
template <typename T>
struct HopperDistanceArgs {
  hopper::WalkShape shape;
  T* out;  // (batch, rows, cols), unit column stride
  int64_t out_batch, out_row;
};

// Where the stores go. wgmma's layout gives a thread two adjacent columns of a row, so a warp
// instruction storing straight from the registers writes 8 rows x 2 columns x 4 threads: whole
// 32-byte sectors in float32, half sectors in the half types. There a warp stages 8 rows x 64
// columns in its own shared slice (rows kStagePitch elements apart: the pairs land in distinct
// banks) and stores them back as 16-byte chunks, 4 rows per instruction. Measured on the H200,
// B8 N4096 M4096 (RESULTS.md "The Hopper distance"): staged, bfloat16 D128 0.215 ms against
// 0.237 straight, float32 0.365 against 0.343 (there staging only adds shared-memory traffic).
// TMA bulk copies out of the staged rows measured slower still (float32 0.399, bfloat16 0.298).
template <typename T>
constexpr bool kStaged = sizeof(T) == 2;
constexpr int kStageRows = 8, kStageCols = 64, kStagePitch = kStageCols + 8;
constexpr int kConsumerWarps = 8;
constexpr size_t kDistanceNormBytes = 2 * 3 * hopper::kBoxRows * sizeof(float);
// Each consumer's row norms (128) and column norms (2 tiles x 128, double-buffered), then the
// consumer warps' staging slices.
template <typename T>
constexpr size_t hopper_distance_bytes() {
  return kDistanceNormBytes +
         (kStaged<T> ? kConsumerWarps * kStageRows * kStagePitch * sizeof(T) : 0);
}

template <typename T>
__device__ __forceinline__ void store_pair(T* at, float a, float b) {
  if constexpr (std::is_same_v<T, float>)
    *reinterpret_cast<float2*>(at) = make_float2(a, b);
  else if constexpr (std::is_same_v<T, __half>)
    *reinterpret_cast<__half2*>(at) = __floats2half2_rn(a, b);
  else
    *reinterpret_cast<__nv_bfloat162*>(at) = __floats2bfloat162_rn(a, b);
}

template <typename T, bool kSplit>
__global__ void __launch_bounds__(hopper::kWalkThreads, 1)
hopper_distance_kernel(const __grid_constant__ CUtensorMap x_map,
                       const __grid_constant__ CUtensorMap y_map, const HopperDistanceArgs<T> args) {
#if defined(PK_HOPPER_DEVICE)
  using namespace hopper;
  constexpr int kRows = kBoxRows, kCols = kBoxRows;
  extern __shared__ unsigned char smem_raw[];
  const RowBlockWalk walk(smem_raw, args.shape.depth_boxes, args.shape.stages, kSplit);
  const WalkBlock block(args.shape);
  const int batch = block.batch, row0 = block.row0, tile0 = block.tile0, tiles = block.tiles;
  const int rows = args.shape.rows, cols = args.shape.cols;
  const int warpgroup = threadIdx.x / 128;

  walk.init();
  __syncthreads();
  if (warpgroup == 0) return walk.produce<T>(&x_map, &y_map, block);

  walk.start_consumer();
  const int c = warpgroup - 1, thread = threadIdx.x % 128;
  const int warp = thread / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  auto* row_norms = reinterpret_cast<float*>(walk.extra()) + 3 * kRows * c;
  float* col_norms = row_norms + kRows;  // [2][kCols]
  T* stage = kStaged<T> ? reinterpret_cast<T*>(walk.extra() + kDistanceNormBytes) +
                             (4 * c + warp) * kStageRows * kStagePitch
                       : nullptr;
  // Thread `thread` sums row `thread` of x's boxes (rows past N and depth past D read as 0).
  float squares = 0.0f;
  for (int k = 0; k < walk.boxes; ++k)
    squares += row_squares<T>(walk.x_tile + size_t(k) * kBoxBytes + thread * kRowBytes);
  row_norms[thread] = squares;
  sync_threads(1 + c, 128);  // named barriers 1 and 2: one consumer's 128 threads
  float row_norm[kAccRows];
#pragma unroll
  for (int r = 0; r < kAccRows; ++r) row_norm[r] = row_norms[acc_row(r)];
  T* out = args.out + batch * args.out_batch;
  // Staged chunks need rows that start at 16-byte boundaries; else (and in a partial chunk) each
  // thread stores its pairs, or single columns where rows start at odd columns.
  const bool chunks = cols * sizeof(T) % 16 == 0, pairs = cols % 2 == 0;
  constexpr int kChunkElements = 16 / sizeof(T);
  constexpr int kChunksPerRow = kStageCols / kChunkElements;  // 16 in float32, 8 in half
  constexpr int kRowsPerStore = 32 / kChunksPerRow;

  float acc[2][64];
  RingPlace place;
  for (int tile = c; tile < tiles; tile += 2) {
    const int col0 = (tile0 + tile) * kCols;
    // Column `thread`'s squares, from each box while its MMAs run; double-buffered: the barrier
    // before the stores keeps the consumer's warps within one tile of each other.
    float* tile_norms = col_norms + (tile / 2 % 2) * kCols;
    squares = 0.0f;
    walk.multiply<T, kSplit>(c, place, acc, [&](const unsigned char* box, int) {
      squares += row_squares<T>(box + thread * kRowBytes);
    });
    tile_norms[thread] = squares;
    sync_threads(1 + c, 128);
    // The distances in place of the products; each of the thread's 32 column norms read once.
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) {
      const float2 col_norm = *reinterpret_cast<const float2*>(tile_norms + 8 * j + 2 * t);
#pragma unroll
      for (int r = 0; r < kAccRows; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& value = acc[r / 2][4 * j + 2 * (r % 2) + e];
          const float d = fmaf(-2.0f, value, row_norm[r] + (e ? col_norm.y : col_norm.x));
          value = d < 0.0f ? 0.0f : d;  // keeps NaN
        }
    }
    auto distance = [&](int r, int j, int e) { return acc[r / 2][4 * j + 2 * (r % 2) + e]; };
#pragma unroll
    for (int r = 0; r < kAccRows; ++r) {
      const int first_row = row0 + acc_row(r) - g;  // the warp's 8 rows: first_row + 0 .. 7
#pragma unroll
      for (int half = 0; half < kCols / kStageCols; ++half) {
        const int chunk_col = col0 + half * kStageCols;
        if (kStaged<T> && chunks && chunk_col + kStageCols <= cols) {
#pragma unroll
          for (int jj = 0; jj < kStageCols / 8; ++jj) {
            const int j = half * kStageCols / 8 + jj;
            store_pair(stage + g * kStagePitch + 8 * jj + 2 * t, distance(r, j, 0),
                       distance(r, j, 1));
          }
          __syncwarp();
#pragma unroll
          for (int q = 0; q < kStageRows / kRowsPerStore; ++q) {
            const int stage_row = q * kRowsPerStore + lane / kChunksPerRow;
            const int element = lane % kChunksPerRow * kChunkElements;
            const int row = first_row + stage_row;
            const uint4 v =
                *reinterpret_cast<const uint4*>(stage + stage_row * kStagePitch + element);
            if (row < rows)
              *reinterpret_cast<uint4*>(out + row * args.out_row + chunk_col + element) = v;
          }
          __syncwarp();
        } else if (first_row + g < rows) {
          T* out_row = out + (first_row + g) * args.out_row;
#pragma unroll
          for (int jj = 0; jj < kStageCols / 8; ++jj) {
            const int j = half * kStageCols / 8 + jj, col = col0 + 8 * j + 2 * t;
            const float d0 = distance(r, j, 0), d1 = distance(r, j, 1);
            if (pairs) {
              if (col < cols) store_pair(out_row + col, d0, d1);
            } else {
              if (col < cols) out_row[col] = narrow<T>(d0);
              if (col + 1 < cols) out_row[col + 1] = narrow<T>(d1);
            }
          }
        }
      }
    }
  }
#endif
}

// The Hopper distance's launch into out (B, N, M; contiguous, so that a folded batch, y shared by
// every batch, writes it as it is), or false where the walk does not apply (hopper::plan_walk).
template <typename T>
bool launch_hopper_distance(Tensor x, Tensor y, const Tensor& out, Precision precision,
                            cudaStream_t stream) {
  hopper::WalkPlan plan;
  if (!hopper::plan_walk<T>(&plan, x, y, precision, hopper_distance_bytes<T>())) return false;
  const HopperDistanceArgs<T> args{plan.shape, static_cast<T*>(out.mutable_data_ptr()),
                                   out.stride(0), out.stride(1)};
  hopper::launch_walk<hopper_distance_kernel<T, false>,
                      hopper_distance_kernel<T, std::is_same_v<T, float>>>(
      plan, args, x.get_device_index(), stream);
  return true;
}

// ---- The Hopper gradient (float32 at "tf32" and "tf32x3"; the half types) ----
//
// out (B, R, D) = 2 (rowsum(G) a - G b) is a product with a long sum (K = S, 4096 at the spec
// size) and few columns (D): it reads G once, and G is the bytes (537 MB at the spec size). A
// block of hopper::kWalkThreads owns 2 GradLayout::kRows output rows and 128 columns of D:
// warpgroup 0's first thread streams G's boxes (a region per consumer) and b^T's boxes of a step
// of K (one 128-byte row of G: 32 float32 or 64 half elements) by TMA through a ring of
// GradLayout::kStages stages; consumer warpgroups 1 and 2 each multiply their rows by b^T's
// boxes. Float32 wgmma reads only K-major operands from shared memory, and G is K-major for gx
// (G = grad) but not for gy (G = grad^T: K runs down grad's columns). So each consumer reads its
// G elements into registers in wgmma's A layout (mma_64x128_tf32_rs) from grad's boxes as they
// lie, in either orientation (grad_element_offset), and sums its rows of G from the same
// registers (the rowsum costs no second read). b^T, K-major, is a (B, D, S) float32 copy of b
// (small: b is S x D against G's R x S).
// The half types take the same TF32 MMAs: a half element widened to float32 is exact in TF32
// (10 mantissa bits: float16's, more than bfloat16's 7), so each product is exact and the sums
// are float32's, as a half-precision wgmma gives; G stays in its own type in memory and in shared
// memory (half the bytes of the float32 gradient), widened in the registers.
// Each consumer waits for its step's MMAs before it takes the next: the other consumer's MMAs
// keep the tensor cores busy meanwhile. What bounds it is not settled: ncu (H200, spec size)
// has DRAM 63 % and the L2 79 % busy, and multicasting b^T's boxes between two blocks, which
// halves the L2's share of them, measured the same (RESULTS.md "The Hopper gradient").
//
// "tf32x3" adds hi.lo (a low box of b^T's low parts per consumer) and lo.hi (G's low parts from
// the registers), and its sums are long: the tensor cores' float32 accumulation loses precision
// with each k8 step (H100, K 4100: 2.1e-5 relative error where float32 gives 2e-7; linear in K),
// past the 1e-5 that "tf32x3" promises. So each step's products start from zero and are added to
// the totals in float32 by the consumer; the two sets of accumulators take the registers of 128
// rows, so a consumer takes 64 rows there.
template <typename T, bool kSplit>
struct GradLayout {
  static_assert(!kSplit || std::is_same_v<T, float>, "split products are float32's");
  static constexpr int kHalves = kSplit ? 1 : 2;  // m64 halves per consumer
  static constexpr int kRows = 64 * kHalves;      // per consumer
  static constexpr int kStep = hopper::box_depth<T>();  // K per stage: a 128-byte row of G
  // b^T's boxes per stage, each 32 of K (float32 rows of 128 bytes)
  static constexpr int kBtBoxes = kStep / hopper::box_depth<float>();
  static constexpr int kRegionBytes = kRows * hopper::kRowBytes;  // a consumer's G per stage
  static constexpr size_t kStageBytes = 2 * kRegionBytes + kBtBoxes * hopper::kBoxBytes;
  static constexpr int kStages = kStageBytes > 48 * 1024 ? 3 : 4;  // within 227 KB
};

template <typename T, bool kSplit>
constexpr size_t hopper_grad_smem_bytes() {
  using Layout = GradLayout<T, kSplit>;
  return hopper::kWalkAlign + Layout::kStages * Layout::kStageBytes +
         (kSplit ? 2 * hopper::kBoxBytes : 0) + 2 * Layout::kStages * sizeof(uint64_t);
}

template <typename T>
struct HopperGradArgs {
  int rows, inner, depth;  // R (output rows), K (the sum's length: S), D
  int row_blocks, depth_tiles;  // per batch
  Matrix<const T> a;  // (batch, rows, depth)
  T* out;  // (batch, rows, depth), contiguous
};

// Byte offset, in a consumer's G region of a stage, of G's element (row r of the consumer's, k of
// the step's kStep). kTranspose == false: one box of grad, the consumer's rows x kStep of K. True:
// boxes of grad, each kStep of K (grad's rows) x kStep output rows (grad's columns), so the
// element is (k, r) there.
template <typename T, bool kTranspose>
__device__ __forceinline__ int grad_element_offset(int r, int k) {
  using namespace hopper;
  constexpr int kStep = box_depth<T>();
  if constexpr (kTranspose)
    return r / kStep * kStep * kRowBytes + box_offset<T>(k, r % kStep);
  else
    return box_offset<T>(r, k);
}

template <typename T, bool kTranspose, bool kSplit>
__global__ void __launch_bounds__(hopper::kWalkThreads, 1)
hopper_grad_kernel(const __grid_constant__ CUtensorMap grad_map,
                   const __grid_constant__ CUtensorMap bt_map, const HopperGradArgs<T> args) {
#if defined(PK_HOPPER_DEVICE)
  using namespace hopper;
  using Layout = GradLayout<T, kSplit>;
  constexpr int kHalves = Layout::kHalves, kStages = Layout::kStages, kStep = Layout::kStep;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* stages = swizzle_aligned(smem_raw);
  unsigned char* low_boxes = stages + kStages * Layout::kStageBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(low_boxes + (kSplit ? 2 * kBoxBytes : 0));
  uint64_t* empty = full + kStages;

  const int depth_tile = blockIdx.x % args.depth_tiles;
  const int row_block = blockIdx.x / args.depth_tiles % args.row_blocks;
  const int batch = blockIdx.x / (args.depth_tiles * args.row_blocks);
  const int row0 = row_block * 2 * Layout::kRows, col0 = depth_tile * kBoxRows;
  const int steps = (args.inner + kStep - 1) / kStep;

  init_ring(full, empty, kStages);

  if (threadIdx.x < 128) {
    release_registers<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    for (int step = 0; step < steps; ++step) {
      const int slot = step % kStages, round = step / kStages;
      if (round > 0) wait(&empty[slot], (round - 1) & 1);
      unsigned char* stage = stages + slot * Layout::kStageBytes;
      arrive_expecting(&full[slot], Layout::kStageBytes);
      const int k0 = step * kStep;
      for (int c = 0; c < 2; ++c) {
        unsigned char* region = stage + c * Layout::kRegionBytes;
        const int r0 = row0 + c * Layout::kRows;
        if constexpr (kTranspose) {
          for (int q = 0; q < Layout::kRows / kStep; ++q)
            load_box(region + q * kStep * kRowBytes, &grad_map, &full[slot], r0 + q * kStep, k0,
                     batch);
        } else {
          load_box(region, &grad_map, &full[slot], k0, r0, batch);
        }
      }
      for (int q = 0; q < Layout::kBtBoxes; ++q)
        load_box(stage + 2 * Layout::kRegionBytes + q * kBoxBytes, &bt_map, &full[slot],
                 k0 + q * box_depth<float>(), col0, batch);
    }
    return;
  }

  claim_registers<kConsumerRegisters>();
  const int c = threadIdx.x / 128 - 1, thread = threadIdx.x % 128;
  const int warp = thread / 32, lane = thread % 32, g = lane / 4, t = lane % 4;
  float acc[kHalves][64];    // the products ("tf32"), the step's products ("tf32x3")
  float total[1][64];        // "tf32x3": the sums of the steps' products, in float32
  float sums[kHalves][2] = {};  // [m][h]: this thread's part of the sums of its rows of G
#pragma unroll
  for (int m = 0; m < kHalves; ++m)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[m][i] = 0.0f;
  if constexpr (kSplit) {
#pragma unroll
    for (int i = 0; i < 64; ++i) total[0][i] = 0.0f;
  }
  unsigned char* low_box = low_boxes + c * kBoxBytes;

  for (int step = 0; step < steps; ++step) {
    const int slot = step % kStages;
    wait(&full[slot], (step / kStages) & 1);
    const unsigned char* stage = stages + slot * Layout::kStageBytes;
    const unsigned char* region = stage + c * Layout::kRegionBytes;
    const unsigned char* bt_box = stage + 2 * Layout::kRegionBytes;
    // wgmma's A layout (see mma_64x128_tf32_rs): k8 step j, rows 64 m + 16 warp + g + 8 (e % 2),
    // k = 8 j + t + 4 (e / 2).
    uint32_t a_hi[kStep / 8][kHalves][4];
#pragma unroll
    for (int j = 0; j < kStep / 8; ++j)
#pragma unroll
      for (int m = 0; m < kHalves; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 64 * m + 16 * warp + g + 8 * (e % 2), k = 8 * j + t + 4 * (e / 2);
          const float v = widen(
              *reinterpret_cast<const T*>(region + grad_element_offset<T, kTranspose>(r, k)));
          a_hi[j][m][e] = __float_as_uint(v);
          sums[m][e % 2] += v;
        }
    if constexpr (kSplit) {
      write_low_parts(low_box, bt_box, thread);
      fence_async_shared();
      sync_threads(1 + c, 128);  // the consumer's low box is whole
      uint32_t a_lo[kStep / 8][1][4];
#pragma unroll
      for (int j = 0; j < kStep / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          a_lo[j][0][e] = __float_as_uint(tf32_low_part(__uint_as_float(a_hi[j][0][e])));
      mma_fence();
#pragma unroll
      for (int j = 0; j < kStep / 8; ++j) {
        const uint64_t b = descriptor(bt_box + 32 * j), b_lo = descriptor(low_box + 32 * j);
        mma_64x128_tf32_rs(acc[0], a_hi[j][0], b, j > 0);
        mma_64x128_tf32_rs(acc[0], a_hi[j][0], b_lo);
        mma_64x128_tf32_rs(acc[0], a_lo[j][0], b);
      }
      mma_commit();
      mma_wait<0>();
      hold_fragments(a_lo);
      hold_fragments(a_hi);
      hold_registers(acc[0]);
#pragma unroll
      for (int i = 0; i < 64; ++i) total[0][i] += acc[0][i];
    } else {
      multiply_from_registers(acc, a_hi, bt_box, [](auto& d, const auto& a, uint64_t b) {
        mma_64x128_tf32_rs(d, a, b);
      });
    }
    if (lane == 0) arrive(&empty[slot]);
  }

  // A row's sum is spread over the 4 threads t of its quad.
#pragma unroll
  for (int m = 0; m < kHalves; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sums[m][h] += __shfl_xor_sync(0xFFFFFFFFu, sums[m][h], 1);
      sums[m][h] += __shfl_xor_sync(0xFFFFFFFFu, sums[m][h], 2);
    }
  const auto& products = [&]() -> const float(&)[kHalves][64] {
    if constexpr (kSplit) return total; else return acc;
  }();
  const Matrix<const T> a = args.a;
  const bool pairs = args.depth % 2 == 0;
#pragma unroll
  for (int r = 0; r < 2 * kHalves; ++r) {
    const int row = row0 + c * Layout::kRows + acc_row(r);
    if (row >= args.rows) continue;
    const float sum = sums[r / 2][r % 2];
    const T* a_row = a.data + batch * a.batch + int64_t{row} * a.row;
    T* out_row = args.out + (int64_t{batch} * args.rows + row) * args.depth;
#pragma unroll
    for (int j = 0; j < kBoxRows / 8; ++j) {
      const int col = col0 + 8 * j + 2 * t;
      const float p0 = products[r / 2][4 * j + 2 * (r % 2)];
      const float p1 = products[r / 2][4 * j + 2 * (r % 2) + 1];
      if (pairs && col < args.depth) {
        const float e0 = widen(a_row[col * a.col]), e1 = widen(a_row[(col + 1) * a.col]);
        store_pair(out_row + col, 2.0f * (sum * e0 - p0), 2.0f * (sum * e1 - p1));
      } else {
        if (col < args.depth)
          out_row[col] = narrow<T>(2.0f * (sum * widen(a_row[col * a.col]) - p0));
        if (col + 1 < args.depth)
          out_row[col + 1] = narrow<T>(2.0f * (sum * widen(a_row[(col + 1) * a.col]) - p1));
      }
    }
  }
#endif
}

// bt (B, D, S) = b (B, S, D) transposed and widened to float32, b read through its strides: the
// K-major B operand of the Hopper gradient. 32 x 32 tiles through shared memory, so that both
// sides move whole rows.
template <typename T>
__global__ void transpose_rows_kernel(Matrix<const T> b, float* bt, int64_t bt_row,
                                      int inner, int depth, int inner_tiles, int depth_tiles) {
  __shared__ float tile[32][33];
  const int depth_tile = blockIdx.x % depth_tiles;
  const int inner_tile = blockIdx.x / depth_tiles % inner_tiles;
  const int64_t batch = blockIdx.x / (depth_tiles * inner_tiles);
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  for (int i = ty; i < 32; i += blockDim.x / 32) {
    const int s = inner_tile * 32 + i, d = depth_tile * 32 + tx;
    if (s < inner && d < depth)
      tile[i][tx] = widen(b.data[batch * b.batch + s * b.row + d * b.col]);
  }
  __syncthreads();
  for (int i = ty; i < 32; i += blockDim.x / 32) {
    const int d = depth_tile * 32 + i, s = inner_tile * 32 + tx;
    if (s < inner && d < depth) bt[(batch * depth + d) * bt_row + s] = tile[tx][i];
  }
}

// The Hopper gradient's launch into out (B, R, D; contiguous) for a, b and grad of one dtype T, or
// false where it does not apply: float32 at "tf32" or "tf32x3" or a half type (any precision: its
// products are exact in TF32), a Hopper GPU and an sm_90a build, grad addressable by TMA (unit
// column stride, 16-byte aligned rows: a broadcast grad, as x.sum().backward() gives, is not),
// counts within int.
template <typename T>
bool launch_hopper_grad(const Tensor& grad, const Tensor& a, const Tensor& b, bool transpose,
                        const Tensor& out, Precision precision, cudaStream_t stream) {
  using namespace hopper;
  const int device = a.get_device_index();
  constexpr bool kFloat = std::is_same_v<T, float>;
  if ((kFloat && precision == Precision::kIeee) || !hopper_available(device)) return false;
  const bool split = kFloat && precision == Precision::kTf32x3;
  const int64_t batch = a.size(0), rows = a.size(1), depth = a.size(2), inner = b.size(1);
  constexpr int kStep = box_depth<T>();
  const int block_rows = 2 * (split ? GradLayout<float, true>::kRows : GradLayout<T, false>::kRows);
  const int64_t row_blocks = (rows + block_rows - 1) / block_rows;
  const int64_t depth_tiles = (depth + kBoxRows - 1) / kBoxRows;
  // The kernel's row, column and K counts and coordinates are ints (a block's last row and K
  // step included); offsets into out are 64-bit.
  if (rows >= kIntLimit - block_rows || inner >= kIntLimit - kStep ||
      depth >= kIntLimit - kBoxRows || batch * row_blocks * depth_tiles >= kIntLimit)
    return false;
  CUtensorMap grad_map, bt_map;
  if (!tensor_map<T>(&grad_map, grad, transpose ? kStep : block_rows / 2)) return false;
  // b^T with rows padded to 16 bytes (TMA's row stride); the padding is never read.
  const int64_t bt_row = (inner + 3) / 4 * 4;
  Tensor bt = torch::stable::new_empty(a, {batch, depth, bt_row}, ScalarType::Float);
  const Tensor bt_view = reinterpret(bt, {batch, depth, inner}, {depth * bt_row, bt_row, 1});
  if (!tensor_map<float>(&bt_map, bt_view)) return false;
  const int64_t inner_tiles = (inner + 31) / 32, depth_tiles_32 = (depth + 31) / 32;
  const unsigned transpose_blocks = static_cast<unsigned>(batch * inner_tiles * depth_tiles_32);
  transpose_rows_kernel<T><<<transpose_blocks, 256, 0, stream>>>(
      input<T>(b, 1, 2), static_cast<float*>(bt.mutable_data_ptr()), bt_row,
      static_cast<int>(inner), static_cast<int>(depth), static_cast<int>(inner_tiles),
      static_cast<int>(depth_tiles_32));
  PK_CHECK_LAUNCH();
  const HopperGradArgs<T> args{static_cast<int>(rows), static_cast<int>(inner),
                               static_cast<int>(depth), static_cast<int>(row_blocks),
                               static_cast<int>(depth_tiles), input<T>(a, 1, 2),
                               static_cast<T*>(out.mutable_data_ptr())};
  const unsigned blocks = static_cast<unsigned>(batch * row_blocks * depth_tiles);
  auto launch = [&](auto transposed, auto split_products) {
    constexpr bool kSplit = decltype(split_products)::value;
    constexpr auto kKernel = hopper_grad_kernel<T, decltype(transposed)::value, kSplit>;
    allow_walk_smem<kKernel>(device);
    kKernel<<<blocks, kWalkThreads, hopper_grad_smem_bytes<T, kSplit>(), stream>>>(grad_map,
                                                                                   bt_map, args);
    PK_CHECK_LAUNCH();
  };
  auto launch_orientation = [&](auto transposed) {
    if constexpr (kFloat) {
      if (split) return launch(transposed, std::true_type{});
    }
    launch(transposed, std::false_type{});
  };
  if (transpose) launch_orientation(std::true_type{});
  else launch_orientation(std::false_type{});
  return true;
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
    if constexpr (!std::is_same_v<T, double>) {  // the Hopper MMAs: TF32, the half types
      if (launch_hopper_distance<T>(x, y, out, p, current_stream(x))) return;
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
    if constexpr (!std::is_same_v<T, double>) {  // the Hopper MMAs: TF32, the half types
      if (launch_hopper_grad<T>(grad, a, b, transpose, out, p, current_stream(a))) return;
    }
    GemmArgs<T> args{input<T>(grad, rows_dim, inner_dim), input<T>(b, 2, 1), input<T>(a, 1, 2),
                     output<T>(out), a.size(1), a.size(2), b.size(1)};
    launch<Epilogue::kGradient>(args, a.size(0), p, current_stream(a));
  });
  return out;
}

// What these kernels can take, for the Python dispatch (protokernels/_capabilities.py): every
// floating dtype; on the current device, the forward runs hopper_distance_kernel for rows up to
// hopper_depth_bytes at "tf32" or in half precision and hopper_split_depth_bytes at "tf32x3"
// (0: not here), which _backend.py's `auto` table reads. The half types stage their stores, so
// their walk has less room for x's rows: the declared depth is the smaller of the two.
std::string sqdist_cuda_capabilities() {
  int device = 0;
  cudaGetDevice(&device);
  const int64_t depth_bytes =
      std::min(hopper::walk_depth_bytes(device, false, hopper_distance_bytes<float>()),
               hopper::walk_depth_bytes(device, false, hopper_distance_bytes<__half>()));
  return "dtypes=float16,bfloat16,float32,float64;hopper_depth_bytes=" +
         std::to_string(depth_bytes) + ";hopper_split_depth_bytes=" +
         std::to_string(hopper::walk_depth_bytes(device, true, hopper_distance_bytes<float>()));
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("sqdist_cuda(Tensor x, Tensor y, str precision) -> Tensor");
  m.def("sqdist_grad_cuda(Tensor grad, Tensor a, Tensor b, bool transpose, str precision) -> Tensor");
  m.def("sqdist_cuda_capabilities() -> str");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("sqdist_cuda", TORCH_BOX(&protokernels::sqdist_cuda));
  m.impl("sqdist_grad_cuda", TORCH_BOX(&protokernels::sqdist_grad_cuda));
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CompositeExplicitAutograd, m) {
  m.impl("sqdist_cuda_capabilities", TORCH_BOX(&protokernels::sqdist_cuda_capabilities));
}
