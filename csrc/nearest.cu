// Nearest-prototype search in CUDA (nearest, nearest_k, exclude, by label, both ways) and the
// gradient scatter into the winners. The (N, M) distance matrix is never written.
//
// A block owns a tile of x's rows and walks y's column tiles, scoring each pair as
// ||x||^2 + ||y||^2 - 2 x.y and folding the tile into each row's running best. Three searches:
// - hopper_search_kernel (Hopper GPUs, sm_90a builds; k = 1 with an optional excluded column,
//   float32 at "tf32" and "tf32x3", float16, bfloat16): x's block rows kept in shared memory,
//   y's tiles streamed by TMA, wgmma products folded by two consumer warpgroups in turn
//   (hopper.cuh); x's norms summed from shared memory, and where every block walks all of y (one
//   column split) it writes its rows' results itself (write_winners).
// - tensor_search_kernel (k = 1, labels, both ways; float32 at "tf32"/"tf32x3", float16,
//   bfloat16): the product on mma.sync with operands streamed by cp.async (mma_pipeline.cuh),
//   folded straight from the accumulator registers; a thread keeps the best of its 4 rows over
//   its columns, and the threads of a row meet once at the end. The norms come from one
//   prepare_kernel launch. Column tiles are split over blocks when there are too few row tiles
//   to fill the GPU; the splits meet by atomicMin on the keys.
// - search_kernel (top k, float32 "ieee"): the tile product of tile_product.cuh into shared
//   memory, one thread per row folding it.
// Bests are packed int64 keys (rank bits << 32 | index), so that one integer comparison orders by
// distance, then index (ties go to the smaller index). Ranking, as in every backend: a pair
// involving a row with NaN ranks first (torch.argmin's NaN propagation), a pair involving a row
// with an infinite (or overflowing) squared norm after every finite distance. A last kernel
// (or the Hopper search's own end) decodes the keys and recomputes the winners' distances exactly
// as sum((x - y)^2), into outputs allocated by the caller (any row strides, unit slot stride).
//
// Keys rank by float32 scores and hold 31-bit indices: float64 is ranked by the reference backend
// (nearest_cuda_capabilities() declares this to the Python dispatch).
#include <algorithm>
#include <cfloat>
#include <optional>
#include <tuple>

#include "hopper.cuh"
#include "mma_pipeline.cuh"
#include "tile_product.cuh"

namespace protokernels {
namespace {

using namespace tile;

constexpr long long kNoKey = 0x7FFFFFFFFFFFFFFFLL;  // no allowed candidate: index -1, dist inf
constexpr int kMaxK = 64;
constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;  // indices packed in 31 bits

// Distance (clamped at 0) -> float32 rank: NaN -> -1 (first), inf -> FLT_MAX (a real infinite
// distance still beats a forbidden candidate).
template <typename Acc>
__device__ __forceinline__ float rank_of(Acc dist) {
  const float d = static_cast<float>(dist <= Acc(0) ? Acc(0) : dist);  // -0.0 -> 0, NaN kept
  return d != d ? -1.0f : fminf(d, FLT_MAX);
}

// The rank of a pair from the two rows' squared norms and their product: NaN on either side ranks
// first, an infinite norm after every finite distance, else the distance's rank.
template <typename Acc>
__device__ __forceinline__ float pair_rank(Acc a_norm, Acc b_norm, Acc product) {
  if (a_norm != a_norm || b_norm != b_norm) return -1.0f;
  if (isinf(a_norm) || isinf(b_norm)) return FLT_MAX;
  return rank_of(a_norm + b_norm - Acc(2) * product);
}

// pair_rank for the tensor-core searches' float32 products: the clamped distance where both
// norms are finite (almost always), pair_rank's rules for NaN and infinite rows otherwise.
__device__ __forceinline__ float product_rank(float a_norm, float b_norm, float product) {
  if (fabsf(a_norm) <= FLT_MAX && fabsf(b_norm) <= FLT_MAX) {
    const float d = fmaf(-2.0f, product, a_norm + b_norm);
    return fminf(d > 0.0f ? d : 0.0f, FLT_MAX);
  }
  return pair_rank(a_norm, b_norm, product);
}

__device__ __forceinline__ long long pack(float rank, int64_t index) {
  const int bits = rank < 0.0f ? -1 : __float_as_int(rank);
  return (static_cast<long long>(bits) << 32) | index;
}

struct Search {
  const int64_t* exclude;   // (B, N) or null
  const int64_t* x_labels;  // (B, N) or null: then keys hold (same label, other label)
  const int64_t* y_labels;  // (B, M)
  long long* keys;          // (B, N, slots): slots = k (unordered top k) or 2 (labels)
  long long* col_keys;      // (B, M) or null: best row per column, atomically min-ed
  int k;
};

template <typename T>
struct SearchArgs {
  Matrix<const T> x, y;
  int64_t rows, cols, depth, tiles_r;
  Search search;
};

// The running best of one row: k = 1 (and labels) in registers, top k in the row's key slots.
struct RowBest {
  long long best = kNoKey, other = kNoKey;
  long long* slots = nullptr;
  long long worst = kNoKey;
  int worst_slot = 0;

  __device__ void init_top_k(long long* row_slots, int k) {
    slots = row_slots;
    for (int s = 0; s < k; ++s) slots[s] = kNoKey;
  }
  // Replace the set's worst key; find the new worst. The first tiles fill the set, later ones
  // rarely beat its worst, so the rescan is rare.
  __device__ void insert(long long key, int k) {
    if (key >= worst) return;
    slots[worst_slot] = key;
    worst = slots[0];
    worst_slot = 0;
    for (int s = 1; s < k; ++s)
      if (slots[s] > worst) worst = slots[s], worst_slot = s;
  }
};

template <typename T, typename Tile, Precision P>
__global__ void __launch_bounds__(Tile::kThreads) search_kernel(const SearchArgs<T> args) {
  using S = Smem<T, Tile>;
  using Acc = typename S::Acc;
  __shared__ S smem;

  const int64_t batch = blockIdx.x / args.tiles_r;
  const int64_t row0 = blockIdx.x % args.tiles_r * Tile::kRows;
  const StridedOperand<T> x = operand(args.x, batch, args.rows);
  const StridedOperand<T> y = operand(args.y, batch, args.cols);
  const Search& s = args.search;
  const int t = threadIdx.x;
  const int64_t my_row = row0 + t;  // for threads [0, kRows)
  const bool row_thread = t < Tile::kRows && my_row < args.rows;
  const int64_t row_index = batch * args.rows + my_row;
  const int64_t excluded = row_thread && s.exclude ? s.exclude[row_index] : -1;
  const int64_t label = row_thread && s.x_labels ? s.x_labels[row_index] : 0;
  RowBest best;
  if (row_thread && !s.x_labels && s.k > 1) best.init_top_k(s.keys + row_index * s.k, s.k);

  for (int64_t col0 = 0; col0 < args.cols; col0 += Tile::kCols) {
    tile_product<T, Tile, P, RowStat::kSquares, true>(smem, x, y, args.depth, row0, col0);
    const int tile_cols = static_cast<int>(args.cols - col0 < Tile::kCols ? args.cols - col0 : Tile::kCols);
    if (row_thread) {
      for (int c = 0; c < tile_cols; ++c) {
        const int64_t col = col0 + c;
        if (col == excluded) continue;
        const float rank = pair_rank(smem.row_stat[t], smem.col_stat[c], smem.tiles.c[t][c]);
        const long long key = pack(rank, col);
        if (s.x_labels) {
          if (s.y_labels[batch * args.cols + col] == label) best.best = min(best.best, key);
          else best.other = min(best.other, key);
        } else if (s.k == 1) {
          best.best = min(best.best, key);
        } else {
          best.insert(key, s.k);
        }
      }
    } else if (s.col_keys && t >= Tile::kRows && t - Tile::kRows < tile_cols) {
      const int c = t - Tile::kRows;
      const int tile_rows = static_cast<int>(args.rows - row0 < Tile::kRows ? args.rows - row0 : Tile::kRows);
      long long col_best = kNoKey;
      for (int r = 0; r < tile_rows; ++r) {
        const float rank = pair_rank(smem.row_stat[r], smem.col_stat[c], smem.tiles.c[r][c]);
        col_best = min(col_best, pack(rank, row0 + r));
      }
      atomicMin(s.col_keys + batch * args.cols + col0 + c, col_best);
    }
    __syncthreads();  // the next tile's loads overwrite the result tile
  }
  if (row_thread && (s.x_labels || s.k == 1)) {
    const int slots = s.x_labels ? 2 : 1;
    s.keys[row_index * slots] = best.best;
    if (s.x_labels) s.keys[row_index * 2 + 1] = best.other;
  }
}

// ---- The tensor-core search ----

// The memory-bound row kernels below give each row kLanesPerRow lanes (a warp: 4 rows at once),
// the lanes striding over D, several elements in flight: with one row a warp (32 lanes, an element
// each, then a reduction) they ran at ~0.8 (prepare_kernel) and ~1.3 TB/s (pair_distance_kernel)
// on the H100, and at dw_quantize's size (N65536, G8, Dg64) took 411 us of its 918 beside the
// search's 505 (RESULTS.md "Issue 17 on the H100").
constexpr int kLanesPerRow = 8;

// The sum of v over this thread's kLanesPerRow lanes (every one of them gets it).
template <typename V>
__device__ __forceinline__ V row_lanes_sum(V v) {
  const unsigned mask = 0xFFu << (threadIdx.x % 32 / kLanesPerRow * kLanesPerRow);
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(mask, v, offset);
  return v;
}

// Squared norms of y's rows, and of x's where `x_norms` (the Hopper search sums x's rows from its
// shared memory), into norms (B, N + M) (x's rows first; (B, M) without x's), accumulated in float
// from the elements as the product sees them; and the keys that the search atomically min-s,
// where it has any, filled with kNoKey. kLanesPerRow lanes a row.
template <typename T>
__global__ void prepare_kernel(Matrix<const T> x, Matrix<const T> y, int64_t batches,
                               int64_t rows, int64_t cols, int64_t depth, float* norms,
                               bool x_norms, long long* keys, int slots, long long* col_keys) {
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t listed = x_norms || keys ? rows : 0;  // x's rows with anything to do
  const int64_t per_batch = listed + cols, norms_per_batch = (x_norms ? rows : 0) + cols;
  const int64_t groups = int64_t{gridDim.x} * (blockDim.x / kLanesPerRow);
  for (int64_t w = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kLanesPerRow;
       w < batches * per_batch; w += groups) {
    const int64_t batch = w / per_batch, r = w % per_batch;
    const bool is_x = r < listed;
    if (is_x) {
      for (int s = lane; s < slots && keys; s += kLanesPerRow)
        keys[(batch * rows + r) * slots + s] = kNoKey;
      if (!x_norms) continue;
    }
    const T* row = is_x ? x.data + batch * x.batch + r * x.row
                        : y.data + batch * y.batch + (r - listed) * y.row;
    const int64_t step = is_x ? x.col : y.col;
    float sum = 0.0f;
#pragma unroll 4
    for (int64_t d = lane; d < depth; d += kLanesPerRow) {
      const float v = widen(row[d * step]);
      sum += v * v;
    }
    sum = row_lanes_sum(sum);
    if (lane == 0) {
      norms[batch * norms_per_batch + (is_x ? r : r - listed + norms_per_batch - cols)] = sum;
      if (!is_x && col_keys) col_keys[batch * cols + r - listed] = kNoKey;
    }
  }
}

template <typename T>
struct TensorSearchArgs {
  mma::Operand<T> x, y;      // batch 0
  int64_t x_batch, y_batch;  // batch strides
  int64_t depth;
  int rows, cols, depth_steps;
  const float* norms;        // prepare_kernel's
  int row_tiles, col_tiles, tiles_per_split, splits;
  Search search;
};

// The fold of one (row, column) pair into a running best: strictly smaller ranks only, so that
// the first column of a tie (columns arrive in increasing order per thread) stays.
struct Best {
  float rank = INFINITY;  // above every candidate's rank (at most FLT_MAX)
  int index = -1;
  __device__ __forceinline__ void fold(float r, int i) {
    if (r < rank) rank = r, index = i;
  }
  __device__ __forceinline__ long long key() const { return index < 0 ? kNoKey : pack(rank, index); }
};

__device__ __forceinline__ long long warp_min(long long key, int lane_mask) {
  return min(key, __shfl_xor_sync(0xFFFFFFFF, key, lane_mask));
}

// What a tensor-core search keeps per row: the best column (nearest, with an optional excluded
// column per row), the best of the row's label and of the others (labels), or the best column per
// row and the best row per column (both). Separate instantiations: the column fold of kBoth costs
// the others registers.
enum class Fold { kNearest, kLabels, kBoth };

// The shared memory of tensor_search_kernel: the pipeline's stages; a ring of the column tiles'
// norms (and labels), loaded with each tile's first stage; the block's rows' norms, excluded
// columns (and labels), which the fold reads from here rather than holding them in registers
// through the products. The ring is one slot longer than the pipeline is deep: a tile's slot is
// refilled only after every thread has folded it.
template <Fold FOLD>
struct TensorSearchSmem {
  using Tile = mma::Tile;
  static constexpr bool kLabels = FOLD == Fold::kLabels;
  static constexpr int kRing = Tile::kStages + 1;
  static constexpr size_t kColNorms = Tile::kStages * sizeof(mma::Stage);
  static constexpr size_t kColLabels = kColNorms + kRing * Tile::kCols * sizeof(float);
  static constexpr size_t kRowLabels = kColLabels + (kLabels ? kRing * Tile::kCols * sizeof(int64_t) : 0);
  static constexpr size_t kRowNorms = kRowLabels + (kLabels ? Tile::kRows * sizeof(int64_t) : 0);
  static constexpr size_t kRowExcluded = kRowNorms + Tile::kRows * sizeof(float);
  static constexpr size_t kBytes = kRowExcluded + Tile::kRows * sizeof(int);
};

// Rows of each thread: 4 = 2 m16 tiles x rows g and g + 8. Row i of the thread is accumulator
// tile i / 2, elements 2 (i % 2) + e for its columns 2t + e, at row offset kRowOffset[i] from the
// thread's first row.
constexpr int kThreadRows = 4;
__device__ __forceinline__ constexpr int row_offset(int i) { return 16 * (i / 2) + 8 * (i % 2); }

// Indices here are int: rows and columns are below 2**31 (check_rows), and the host keeps a
// block's (column tile, depth step) walk below 2**31 too. The register budget is 128 a thread
// (2 blocks per SM, so that one block's fold overlaps the other's products).
template <typename T, Precision P, Fold FOLD>
__global__ void __launch_bounds__(mma::Tile::kThreads, 2)
tensor_search_kernel(const TensorSearchArgs<T> args) {
  using Tile = mma::Tile;
  using Smem = TensorSearchSmem<FOLD>;
  constexpr bool kLabels = FOLD == Fold::kLabels;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* stages = reinterpret_cast<mma::Stage*>(smem);
  auto* col_norms = reinterpret_cast<float(*)[Tile::kCols]>(smem + Smem::kColNorms);
  auto* col_labels = reinterpret_cast<int64_t(*)[Tile::kCols]>(smem + Smem::kColLabels);
  auto* row_labels = reinterpret_cast<int64_t*>(smem + Smem::kRowLabels);
  auto* row_norms = reinterpret_cast<float*>(smem + Smem::kRowNorms);
  auto* row_excluded = reinterpret_cast<int*>(smem + Smem::kRowExcluded);

  const int split = static_cast<int>(blockIdx.x % args.splits);
  const int row_block = static_cast<int>(blockIdx.x / args.splits);
  const int batch = row_block / args.row_tiles;
  const int row0 = row_block % args.row_tiles * Tile::kRows;
  const int tile0 = split * args.tiles_per_split;
  const int tiles = min(args.tiles_per_split, args.col_tiles - tile0);
  const int rows = args.rows, cols = args.cols;
  mma::Operand<T> x = args.x, y = args.y;
  x.data += batch * args.x_batch;
  y.data += batch * args.y_batch;
  const float* x_norms = args.norms + int64_t{batch} * (rows + cols);
  const float* y_norms = x_norms + rows;
  const int64_t* y_labels = kLabels ? args.search.y_labels + int64_t{batch} * cols : nullptr;

  const int steps = args.depth_steps, total = tiles * steps;
  // Stage `it` of the walk over (column tile, depth step); the norms (and labels) of a tile come
  // with its first stage.
  auto issue = [&](int it) {
    if (it < total) {
      const int tile = it / steps, step = it % steps;
      const int col0 = (tile0 + tile) * Tile::kCols;
      mma::load_stage(stages[it % Tile::kStages], x, y, args.depth, row0, col0,
                      int64_t{step} * mma::stage_depth<T>());
      if (step == 0 && threadIdx.x < Tile::kCols) {
        const int c = threadIdx.x;
        const bool in = col0 + c < cols;
        copy_async<4>(&col_norms[tile % Smem::kRing][c], y_norms + (in ? col0 + c : 0),
                      in ? 4 : 0);
        if constexpr (kLabels)
          copy_async<8>(&col_labels[tile % Smem::kRing][c], y_labels + (in ? col0 + c : 0),
                        in ? 8 : 0);
      }
    }
    commit_async();  // empty groups too: wait_async counts groups
  };

  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int first_row = row0 + mma::Product<T, P>::warp_row() + g;
  const int warp_col = mma::Product<T, P>::warp_col();
  auto row_in = [&](int i) { return first_row + row_offset(i) < rows; };
  const int64_t row_index = int64_t{batch} * rows + first_row;  // of the thread's first row
  if (threadIdx.x < Tile::kRows) {  // read by the first fold, after the main loop's barrier
    const int r = row0 + threadIdx.x;
    const int64_t at = int64_t{batch} * rows + r;
    row_norms[threadIdx.x] = r < rows ? x_norms[r] : 0.0f;
    const int64_t e = r < rows && args.search.exclude ? args.search.exclude[at] : -1;
    row_excluded[threadIdx.x] = e >= 0 && e < cols ? static_cast<int>(e) : -1;
    if constexpr (kLabels) row_labels[threadIdx.x] = r < rows ? args.search.x_labels[at] : 0;
  }
  Best best[kThreadRows], other[kLabels ? kThreadRows : 1];

  mma::Product<T, P> product;
  auto fold = [&](int tile) {
    const int col0 = (tile0 + tile) * Tile::kCols;
    const int slot = tile % Smem::kRing;
    const int local_row = first_row - row0;
    float row_norm[kThreadRows];
    int excluded[kThreadRows];
    int64_t label[kLabels ? kThreadRows : 1];
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i) {
      row_norm[i] = row_norms[local_row + row_offset(i)];
      excluded[i] = row_excluded[local_row + row_offset(i)];
      if constexpr (kLabels) label[i] = row_labels[local_row + row_offset(i)];
    }
#pragma unroll
    for (int j = 0; j < Tile::kFragCols; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = warp_col + 8 * j + 2 * t + e, col = col0 + c;
        const float col_norm = col_norms[slot][c];
        if constexpr (FOLD == Fold::kBoth) {  // the column's best row: the lanes of a column meet
          Best col_best;
#pragma unroll
          for (int i = 0; i < kThreadRows; ++i)  // rows in increasing order
            if (row_in(i) && col < cols)
              col_best.fold(product_rank(row_norm[i], col_norm,
                                         product.acc[i / 2][j][2 * (i % 2) + e]),
                            first_row + row_offset(i));
          const long long key = warp_min(warp_min(warp_min(col_best.key(), 4), 8), 16);
          if (g == 0 && key != kNoKey)
            atomicMin(args.search.col_keys + int64_t{batch} * cols + col, key);
        }
        if (col >= cols) continue;
        const int64_t col_label = kLabels ? col_labels[slot][c] : 0;
#pragma unroll
        for (int i = 0; i < kThreadRows; ++i) {
          const float r =
              product_rank(row_norm[i], col_norm, product.acc[i / 2][j][2 * (i % 2) + e]);
          if constexpr (kLabels) {
            if (col_label == label[i]) best[i].fold(r, col);
            else other[i].fold(r, col);
          } else if (col != excluded[i]) {
            best[i].fold(r, col);
          }
        }
      }
  };

  for (int i = 0; i < Tile::kStages - 1; ++i) issue(i);
  product.clear();
  for (int it = 0; it < total; ++it) {
    wait_async<Tile::kStages - 2>();
    __syncthreads();  // stage `it` is visible to all; stage it - 1 is free for the next issue
    issue(it + Tile::kStages - 1);  // in flight during this stage's products and the next's
    product.step(stages[it % Tile::kStages]);
    if ((it + 1) % steps == 0) {
      fold(it / steps);
      product.clear();
    }
  }

  constexpr int kSlots = kLabels ? 2 : 1;
#pragma unroll
  for (int i = 0; i < kThreadRows; ++i) {
    // The 4 threads of a row (lanes 4g .. 4g + 3) meet here; the other column warp and the
    // splits by atomicMin.
    long long* row_keys = args.search.keys + (row_index + row_offset(i)) * kSlots;
    const long long key = warp_min(warp_min(best[i].key(), 1), 2);
    if (t == 0 && row_in(i) && key != kNoKey) atomicMin(row_keys, key);
    if constexpr (kLabels) {
      const long long other_key = warp_min(warp_min(other[i].key(), 1), 2);
      if (t == 0 && row_in(i) && other_key != kNoKey) atomicMin(row_keys + 1, other_key);
    }
  }
}

// Results (B, R, slots) with strides (batch, row, 1): the caller's outputs.
template <typename Acc>
struct Results {
  Acc* dist;
  int64_t* idx;
  int64_t batch, row;
  __device__ int64_t offset(int64_t b, int64_t r) const { return b * batch + r * row; }
};

// ---- The Hopper search (sm_90a): TMA, wgmma, two producer-consumer pairs ----

// Where a search of one column split writes its rows' winners itself (out.dist set): each row's
// exact distance and index, and the winning rows of y into `gathered` where its data is set
// (dw_quantize's codes); 16-byte stores into gathered where `gathered_chunks` (unit column
// stride, rows at 16-byte boundaries).
template <typename T>
struct Winners {
  Results<float> out;
  Matrix<const T> y;
  Matrix<T> gathered;
  bool gathered_chunks;
  int depth;  // D
};

// hopper.cuh's row-block walk, whose consumers fold each tile into their rows' bests. The search's
// own shared memory: each consumer's column norms of its current tile (1 KB in all: x's rows of
// 1024 bytes fit beside split products' low boxes), which first hold its x rows' squared norms
// (summed from x's boxes, so that no kernel before the walk reads x: at dw_quantize's size that
// read took 84 us of 918 on the H100).
template <typename T>
struct HopperSearchArgs {
  hopper::WalkShape shape;
  const float* y_norms;  // prepare_kernel's, (B, M)
  const int64_t* exclude;
  long long* keys;  // the splits' meeting point (atomicMin), where winners.out.dist is not set
  Winners<T> winners;
};

constexpr size_t kHopperSearchBytes = 2 * hopper::kBoxRows * sizeof(float);

// The differences' squares of a 16-byte chunk of x and of y, summed in float32.
template <typename T>
__device__ __forceinline__ float chunk_squared_distance(uint4 x, uint4 y) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (std::is_same_v<T, float>) {
      const float d = __uint_as_float(xs[w]) - __uint_as_float(ys[w]);
      sum = fmaf(d, d, sum);
    } else {
      T xp[2], yp[2];
      memcpy(xp, &xs[w], sizeof(xp));
      memcpy(yp, &ys[w], sizeof(yp));
      const float d0 = widen(xp[0]) - widen(yp[0]), d1 = widen(xp[1]) - widen(yp[1]);
      sum = fmaf(d1, d1, fmaf(d0, d0, sum));
    }
  }
  return sum;
}

// One split's end: the block's rows' winners, written here rather than by pair_distance_kernel,
// which read x's rows from global memory again (at dw_quantize's size 134 MB, 167 us of its 758
// on the H100).
// The two consumers' keys meet in the first slots of their rings (each ring is free once its
// consumer's last tile is multiplied); then each row's kLanesPerRow lanes take one 16-byte chunk
// of each of x's boxes (shared memory, swizzled) and of the winner's row of y (L2), and sum
// (x - y)^2 in float32 as pair_distance_kernel does. A thread's kWinnerRows rows go together, their
// loads of y issued before any use: one row after another, each waiting for its loads, the end
// took ~4 us a block (~110 us of dw_quantize's 628 on the H200). `keys`: the thread's rows' keys
// (t == 0's).
template <typename T>
__device__ __forceinline__ void write_winners(const hopper::RowBlockWalk& walk,
                                              const Winners<T>& w, int batch, int row0, int rows,
                                              const long long (&keys)[hopper::kAccRows]) {
  using namespace hopper;
  constexpr int kChunk = 16 / sizeof(T);  // elements
  constexpr int kRowsAtOnce = 256 / kLanesPerRow, kWinnerRows = kBoxRows / kRowsAtOnce;
  const int c = threadIdx.x / 128 - 1, thread = threadIdx.x % 128;
  auto ring_keys = [&](int consumer) {
    return reinterpret_cast<long long*>(walk.rings + size_t(consumer) * walk.stages * kBoxBytes);
  };
  if (thread % 4 == 0)
#pragma unroll
    for (int r = 0; r < kAccRows; ++r) ring_keys(c)[acc_row(r)] = keys[r];
  sync_threads(3, 256);  // named barrier 3: both consumers
  const int lane = threadIdx.x % kLanesPerRow, depth = w.depth;
  const int first = (threadIdx.x - 128) / kLanesPerRow;  // rows first + kRowsAtOnce q
  const T* winner[kWinnerRows];  // y's row, or null: no winner, or past N
  int index[kWinnerRows];
  float sum[kWinnerRows];
#pragma unroll
  for (int q = 0; q < kWinnerRows; ++q) {
    const int row = first + kRowsAtOnce * q;
    const long long key = row0 + row < rows ? min(ring_keys(0)[row], ring_keys(1)[row]) : kNoKey;
    index[q] = key == kNoKey ? -1 : static_cast<int>(key & 0xFFFFFFFFLL);
    // TMA's rules: y's rows have a unit column stride and start at 16-byte boundaries.
    winner[q] = index[q] < 0 ? nullptr
                             : w.y.data + int64_t{batch} * w.y.batch + int64_t{index[q]} * w.y.row;
    sum[q] = 0.0f;
  }
  auto gathered_row = [&](int q) {
    return w.gathered.data + int64_t{batch} * w.gathered.batch +
           int64_t{row0 + first + kRowsAtOnce * q} * w.gathered.row;
  };
  for (int k = 0; k < walk.boxes; ++k) {
    const int d0 = k * box_depth<T>() + lane * kChunk;
    if (d0 >= depth) break;
    const bool whole = d0 + kChunk <= depth;
    uint4 y_chunk[kWinnerRows];
#pragma unroll
    for (int q = 0; q < kWinnerRows; ++q)
      if (winner[q] && whole) y_chunk[q] = *reinterpret_cast<const uint4*>(winner[q] + d0);
#pragma unroll
    for (int q = 0; q < kWinnerRows; ++q) {
      if (!winner[q]) continue;
      const int row = first + kRowsAtOnce * q;
      const uint4 x_chunk = *reinterpret_cast<const uint4*>(
          walk.x_tile + size_t(k) * kBoxBytes + row * kRowBytes + ((lane ^ (row % 8)) << 4));
      if (whole) {
        sum[q] += chunk_squared_distance<T>(x_chunk, y_chunk[q]);
        if (w.gathered.data && w.gathered_chunks)
          *reinterpret_cast<uint4*>(gathered_row(q) + d0) = y_chunk[q];
        if (!w.gathered.data || w.gathered_chunks) continue;
      }
      // The depth's tail (x's box reads 0 past D), and stores element by element.
      T xs[kChunk];
      memcpy(xs, &x_chunk, sizeof(xs));
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        if (d0 + e >= depth) break;
        const T yv = winner[q][d0 + e];
        if (!whole) {
          const float diff = widen(xs[e]) - widen(yv);
          sum[q] = fmaf(diff, diff, sum[q]);
        }
        if (w.gathered.data) gathered_row(q)[(d0 + e) * w.gathered.col] = yv;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kWinnerRows; ++q) {
    const int row = row0 + first + kRowsAtOnce * q;
    const float total = row_lanes_sum(sum[q]);
    if (lane != 0 || row >= rows) continue;
    const int64_t o = w.out.offset(batch, row);
    w.out.dist[o] = index[q] < 0 ? INFINITY : total;
    w.out.idx[o] = index[q];
  }
}

template <typename T, bool kSplit>
__global__ void __launch_bounds__(hopper::kWalkThreads, 1)
hopper_search_kernel(const __grid_constant__ CUtensorMap x_map,
                     const __grid_constant__ CUtensorMap y_map, const HopperSearchArgs<T> args) {
#if defined(PK_HOPPER_DEVICE)
  using namespace hopper;
  constexpr int kCols = kBoxRows;
  extern __shared__ unsigned char smem_raw[];
  const RowBlockWalk walk(smem_raw, args.shape.depth_boxes, args.shape.stages, kSplit);
  const WalkBlock block(args.shape);
  const int batch = block.batch, row0 = block.row0, tile0 = block.tile0, tiles = block.tiles;
  const int rows = args.shape.rows, cols = args.shape.cols;
  const float* y_norms = args.y_norms + int64_t{batch} * cols;
  const int warpgroup = threadIdx.x / 128;

  walk.init();
  __syncthreads();
  if (warpgroup == 0) return walk.produce<T>(&x_map, &y_map, block);

  const int c = warpgroup - 1, thread = threadIdx.x % 128;
  const int t = threadIdx.x % 4;
  float* tile_norms = reinterpret_cast<float*>(walk.extra()) + c * kCols;
  int excluded[kAccRows];
#pragma unroll
  for (int r = 0; r < kAccRows; ++r) {
    const int row = row0 + acc_row(r);
    const int64_t e = row < rows && args.exclude ? args.exclude[int64_t{batch} * rows + row] : -1;
    excluded[r] = e >= 0 && e < cols ? static_cast<int>(e) : -1;
  }
  walk.start_consumer();
  // Thread `thread` sums row `thread` of x's boxes (rows past N and depth past D read as 0) into
  // tile_norms, before the first tile's norms; named barriers 1 and 2: each consumer's 128
  // threads meet without the other's (all_of's is the one between these reads and the first
  // tile's stores).
  float squares = 0.0f;
  for (int k = 0; k < walk.boxes; ++k)
    squares += row_squares<T>(walk.x_tile + size_t(k) * kBoxBytes + thread * kRowBytes);
  tile_norms[thread] = squares;
  sync_threads(1 + c, 128);
  float row_norm[kAccRows];
  bool rows_finite = true;
#pragma unroll
  for (int r = 0; r < kAccRows; ++r) {
    row_norm[r] = tile_norms[acc_row(r)];
    rows_finite = rows_finite && fabsf(row_norm[r]) <= FLT_MAX;
  }
  rows_finite = all_of(rows_finite, 1 + c, 128);
  float acc[2][64];
  Best best[kAccRows];
  RingPlace place;
  for (int tile = c; tile < tiles; tile += 2) {
    const int col0 = (tile0 + tile) * kCols;
    // The tile's column norms, read now and stored after the products (all_of below is the
    // barrier between the stores and the fold's reads; the one after the fold keeps the next
    // tile's stores behind every warp's reads).
    const float my_norm = col0 + thread < cols ? y_norms[col0 + thread] : 0.0f;
    walk.multiply<T, kSplit>(c, place, acc, [](const unsigned char*, int) {});
    tile_norms[thread] = my_norm;
    const bool fast = all_of(fabsf(my_norm) <= FLT_MAX, 1 + c, 128) && rows_finite &&
                      col0 + kCols <= cols;

    if (fast) {
      // Finite norms and a whole tile: each pair's rank is its distance's float bits with the
      // low 4 bits replaced by its column's j among the thread's 16 pairs (8 j + e; e picks
      // tile_best's slot), read as a signed integer, so that one min per pair picks the nearest
      // column, ties to the smaller index; an excluded pair gets the largest key. Signed, the
      // bits of non-negative floats order as the floats do, and a distance that rounds below 0
      // (x at a prototype, within the products' error) ranks before every positive one; the
      // clamp at 0 comes once a tile (below), where all of those rank as 0. A pair takes 4
      // instructions: add and FMA, then a LOP3 and the min on the ALU pipe, which issues at half
      // the FMA pipe's rate. (With a clamp per pair and j as an immediate, 4 of 6 on the ALU
      // pipe, the search took 1-12 % longer: RESULTS.md "The fold's ALU work".) 6 in the tiles
      // where a row of the thread has its excluded column (a compare and a select more); the
      // general fold below takes about 10.
      // Ranks keep 19 bits of mantissa: pairs closer than 2^-19 relative (2e-6, inside split
      // products' float32 precision) count as ties.
      int32_t tile_best[kAccRows][2];
#pragma unroll
      for (int r = 0; r < kAccRows; ++r) tile_best[r][0] = tile_best[r][1] = INT32_MAX;
      int excluded_here[kAccRows];  // the excluded column's place 8 j + e, if in the tile
      bool exclusions = false;
#pragma unroll
      for (int r = 0; r < kAccRows; ++r) {
        excluded_here[r] = excluded[r] - col0 - 2 * t;
        exclusions = exclusions || (excluded[r] >= col0 && excluded[r] < col0 + kCols);
      }
      // 0, from an argument the compiler cannot see is non-negative.
      const uint32_t unknown_zero = uint32_t(args.shape.rows) >> 31;
      auto fold_tile = [&](auto with_exclusions) {
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) {
          // j in a register the compiler cannot fold (unknown_zero is 0): then (bits & mask) | j
          // is one LOP3 (with j an immediate, two), at 16 ORs a tile.
          const uint32_t j_bits = uint32_t(j) | unknown_zero;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float col_norm = tile_norms[8 * j + 2 * t + e];
#pragma unroll
            for (int r = 0; r < kAccRows; ++r) {
              const float d =
                  fmaf(-2.0f, acc[r / 2][4 * j + 2 * (r % 2) + e], row_norm[r] + col_norm);
              int32_t key = static_cast<int32_t>((__float_as_uint(d) & 0xFFFFFFF0u) | j_bits);
              if (decltype(with_exclusions)::value && excluded_here[r] == 8 * j + e)
                key = INT32_MAX;
              tile_best[r][e] = min(tile_best[r][e], key);
            }
          }
        }
      };
      if (exclusions)
        fold_tile(std::true_type{});
      else
        fold_tile(std::false_type{});
#pragma unroll
      for (int r = 0; r < kAccRows; ++r) {
        const int e = tile_best[r][1] < tile_best[r][0];  // a tie: (j, 0) is the smaller column
        const int32_t key = e ? tile_best[r][1] : tile_best[r][0];
        const float rank = __uint_as_float(static_cast<uint32_t>(key) & 0xFFFFFFF0u);
        if (key != INT32_MAX)
          best[r].fold(fminf(fmaxf(rank, 0.0f), FLT_MAX), col0 + 8 * (key & 0xF) + 2 * t + e);
      }
    } else {
      // The general fold: pair_rank's rules for NaN and infinite rows, columns past M.
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + 8 * j + 2 * t + e;
          if (col >= cols) continue;
          const float col_norm = tile_norms[8 * j + 2 * t + e];
#pragma unroll
          for (int r = 0; r < kAccRows; ++r) {
            const float p = acc[r / 2][4 * j + 2 * (r % 2) + e];
            if (col != excluded[r]) best[r].fold(product_rank(row_norm[r], col_norm, p), col);
          }
        }
    }
    sync_threads(1 + c, 128);
  }
  // compute-sanitizer's racecheck orders two threads' shared accesses by how many barriers each
  // has passed (sinkhorn.cu's groups showed it: RESULTS.md "Sinkhorn's racecheck, settled"). With
  // an odd number of tiles consumer 1 would pass one tile's barriers fewer than consumer 0, and
  // racecheck reported write_winners' exchange, which barrier 3 orders, as RAW hazards; so it
  // passes them once more.
  if (c == 1 && tiles % 2 == 1) {
    if constexpr (kSplit)
      for (int k = 0; k < walk.boxes; ++k) sync_threads(2, 128);  // split_box's, a box each
    all_of(true, 2, 128);
    sync_threads(2, 128);
  }
  long long keys[kAccRows];  // the 4 threads of a row meet
#pragma unroll
  for (int r = 0; r < kAccRows; ++r) keys[r] = warp_min(warp_min(best[r].key(), 1), 2);
  if (args.winners.out.dist)
    return write_winners(walk, args.winners, batch, row0, rows, keys);
#pragma unroll
  for (int r = 0; r < kAccRows; ++r) {  // the other consumer and the splits by atomicMin
    const int row = row0 + acc_row(r);
    if (t == 0 && row < rows && keys[r] != kNoKey)
      atomicMin(args.keys + int64_t{batch} * rows + row, keys[r]);
  }
#endif
}

__global__ void fill_kernel(long long* data, int64_t n, long long value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    data[i] = value;
}

// kLanesPerRow lanes per (row, slot) pair: idx = the key's index (-1 for none), dist =
// sum((a_r - b_idx)^2) exactly in the accumulate type (inf for none). `gathered` (B, R, D), if its
// data is set (one slot): receives the winner b_idx, read here anyway (dw_quantize's codes,
// without a lookup launch); a row without a winner is left as it is.
template <typename T>
__global__ void pair_distance_kernel(const long long* keys, Matrix<const T> a, Matrix<const T> b,
                                     Results<typename Accumulate<T>::type> out, Matrix<T> gathered,
                                     int64_t pairs, int64_t rows, int64_t slots, int64_t depth) {
  using Acc = typename Accumulate<T>::type;
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t groups = int64_t{gridDim.x} * (blockDim.x / kLanesPerRow);
  for (int64_t p = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kLanesPerRow; p < pairs;
       p += groups) {
    const long long key = keys[p];
    const int64_t batch = p / (rows * slots), r = p / slots % rows;
    const int64_t o = out.offset(batch, r) + p % slots;
    if (key == kNoKey) {
      if (lane == 0) out.dist[o] = Acc(INFINITY), out.idx[o] = -1;
      continue;
    }
    const int64_t j = key & 0xFFFFFFFFLL;
    const T* ar = a.data + batch * a.batch + r * a.row;
    const T* bj = b.data + batch * b.batch + j * b.row;
    T* gj = gathered.data + batch * gathered.batch + r * gathered.row;
    Acc sum = 0;
#pragma unroll 4
    for (int64_t d = lane; d < depth; d += kLanesPerRow) {
      const T bv = bj[d * b.col];
      const Acc diff = widen(ar[d * a.col]) - widen(bv);
      sum += diff * diff;
      if (gathered.data) gj[d * gathered.col] = bv;
    }
    sum = row_lanes_sum(sum);
    if (lane == 0) out.dist[o] = sum, out.idx[o] = j;
  }
}

// Top-k slots in ascending order of (exact distance rank, index), one thread per row: insertion
// sort of at most kMaxK pairs.
template <typename Acc>
__global__ void sort_slots_kernel(Results<Acc> out, int64_t batches, int64_t rows, int slots) {
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < batches * rows;
       p += int64_t{gridDim.x} * blockDim.x) {
    Acc* d = out.dist + out.offset(p / rows, p % rows);
    int64_t* i = out.idx + out.offset(p / rows, p % rows);
    auto before = [](Acc da, int64_t ia, Acc db, int64_t ib) {
      // Ranks: NaN first, no candidate (index -1) last; then distance, then index.
      const float ra = ia < 0 ? INFINITY : rank_of(da), rb = ib < 0 ? INFINITY : rank_of(db);
      return ra < rb || (ra == rb && static_cast<uint64_t>(ia) < static_cast<uint64_t>(ib));
    };
    for (int s = 1; s < slots; ++s) {
      const Acc dv = d[s];
      const int64_t iv = i[s];
      int j = s - 1;
      for (; j >= 0 && before(dv, iv, d[j], i[j]); --j) d[j + 1] = d[j], i[j + 1] = i[j];
      d[j + 1] = dv, i[j + 1] = iv;
    }
  }
}

// ga[b, r] = 2 sum_s g (a_r - b_idx); the negated pair terms are atomically added into gb_acc
// (B, T, D) contiguous. One block per (batch, row) at a time, threads over D.
template <typename T>
__global__ void gather_grad_kernel(const typename Accumulate<T>::type* grad, const int64_t* idx,
                                   Matrix<const T> a, Matrix<const T> b, Matrix<T> ga,
                                   typename Accumulate<T>::type* gb_acc, int64_t batches,
                                   int64_t rows, int64_t slots, int64_t depth, int64_t b_rows) {
  using Acc = typename Accumulate<T>::type;
  for (int64_t p = blockIdx.x; p < batches * rows; p += gridDim.x) {
    const int64_t batch = p / rows, r = p % rows;
    for (int64_t d = threadIdx.x; d < depth; d += blockDim.x) {
      const Acc av = widen(a.data[batch * a.batch + r * a.row + d * a.col]);
      Acc total = 0;
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t j = idx[p * slots + s];
        if (j < 0) continue;
        const Acc bv = widen(b.data[batch * b.batch + j * b.row + d * b.col]);
        const Acc term = Acc(2) * grad[p * slots + s] * (av - bv);
        total += term;
        atomicAdd(gb_acc + (batch * b_rows + j) * depth + d, -term);
      }
      ga.data[batch * ga.batch + r * ga.row + d * ga.col] = narrow<T>(total);
    }
  }
}

// gb = gb_acc in T (half types); float and double use gb_acc as the result directly.
template <typename T>
__global__ void narrow_kernel(const typename Accumulate<T>::type* in, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = narrow<T>(in[i]);
}

template <typename T, typename Tile, Precision P>
void launch_search(const SearchArgs<T>& args, int64_t batch, cudaStream_t stream) {
  SearchArgs<T> a = args;
  a.tiles_r = (a.rows + Tile::kRows - 1) / Tile::kRows;
  const int64_t blocks = batch * a.tiles_r;
  PK_CHECK(blocks < (int64_t{1} << 31), "nearest", "too many row tiles (", blocks, ")");
  search_kernel<T, Tile, P><<<static_cast<unsigned>(blocks), Tile::kThreads, 0, stream>>>(a);
  PK_CHECK_LAUNCH();
}

template <typename T>
void search(const SearchArgs<T>& args, int64_t batch, Precision precision, cudaStream_t stream) {
  dispatch_tile<T>(precision, [&](auto tile, auto product) {
    launch_search<T, decltype(tile), decltype(product)::value>(args, batch, stream);
  });
}

ScalarType dist_dtype(const Tensor& t) {
  return t.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

void check_rows(const char* op, const Tensor& x, const Tensor& y) {
  check_batched_rows(op, x, y);
  PK_CHECK(y.size(1) <= kMaxRows && x.size(1) <= kMaxRows, op,
           "the packed keys hold 31-bit indices: N and M must be below 2**31");
}

// The searches rank by float32 keys (the gradient kernels take float64 too).
void check_search(const char* op, const Tensor& x, const Tensor& y) {
  check_rows(op, x, y);
  PK_CHECK(x.scalar_type() != ScalarType::Double, op,
           "float64 is ranked by the reference backend (these keys rank by float32 scores)");
}

void check_index(const char* op, const char* name, const Tensor& t, const Tensor& x, int64_t rows) {
  PK_CHECK(t.is_cuda() && t.scalar_type() == ScalarType::Long && t.dim() == 2 &&
               t.size(0) == x.size(0) && t.size(1) == rows && t.is_contiguous(),
           op, "argument '", name, "' must be a contiguous int64 CUDA tensor of shape (B, ", rows,
           ")");
}

// The caller's (dist, idx) outputs of shape (B, R, slots): float32 and int64 CUDA tensors with a
// unit slot stride.
template <typename Acc>
Results<Acc> results(const char* op, const Tensor& dist, const Tensor& idx, int64_t batch,
                     int64_t rows, int64_t slots) {
  PK_CHECK(dist.is_cuda() && idx.is_cuda() && dist.scalar_type() == ScalarType::Float &&
               idx.scalar_type() == ScalarType::Long && dist.dim() == 3 && idx.dim() == 3,
           op, "the outputs must be (B, R, slots) float32 and int64 CUDA tensors");
  PK_CHECK(dist.size(0) == batch && dist.size(1) == rows && dist.size(2) == slots &&
               idx.size(0) == batch && idx.size(1) == rows && idx.size(2) == slots,
           op, "the outputs must have shape (", batch, ", ", rows, ", ", slots, ")");
  PK_CHECK((slots == 1 || (dist.stride(2) == 1 && idx.stride(2) == 1)) &&
               dist.stride(0) == idx.stride(0) && dist.stride(1) == idx.stride(1),
           op, "the outputs must share their strides, with a unit slot stride");
  return {static_cast<Acc*>(dist.mutable_data_ptr()), static_cast<int64_t*>(idx.mutable_data_ptr()),
          dist.stride(0), dist.stride(1)};
}

// The caller's `gathered` (B, R, D) for b's chosen rows: one slot, b's dtype.
void check_gathered(const char* op, const Tensor& gathered, const Tensor& b, int64_t batch,
                    int64_t rows, int64_t slots) {
  PK_CHECK(slots == 1 && gathered.is_cuda() && gathered.scalar_type() == b.scalar_type() &&
               gathered.dim() == 3 && gathered.size(0) == batch && gathered.size(1) == rows &&
               gathered.size(2) == b.size(2),
           op, "argument 'gathered' must be a (B, N, D) CUDA tensor of y's dtype, for k = 1");
}

// Keys (B, R, slots) -> (dist, idx) with exact distances between a's rows and b's chosen rows;
// `ranked` slots (top k) sorted by them; `gathered` (B, R, D), one slot: the chosen rows of b.
void finish(const char* op, const Tensor& keys, const Tensor& a, const Tensor& b, const Tensor& dist,
            const Tensor& idx, bool ranked, cudaStream_t stream,
            const std::optional<Tensor>& gathered = std::nullopt) {
  const int64_t batch = keys.size(0), rows = keys.size(1), slots = keys.size(2);
  const int64_t pairs = batch * rows * slots;
  Results<float> out = results<float>(op, dist, idx, batch, rows, slots);
  if (gathered) check_gathered(op, *gathered, b, batch, rows, slots);
  if (pairs == 0) return;
  dispatch_floating(a.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      pair_distance_kernel<T><<<blocks_for(pairs, kThreads / kLanesPerRow), kThreads, 0, stream>>>(
          static_cast<const long long*>(keys.const_data_ptr()), input<T>(a, 1, 2),
          input<T>(b, 1, 2), out, gathered ? output<T>(*gathered) : Matrix<T>{nullptr, 0, 0, 0},
          pairs, rows, slots, a.size(2));
      PK_CHECK_LAUNCH();
      if (ranked) {
        sort_slots_kernel<float><<<blocks_for(batch * rows), kThreads, 0, stream>>>(
            out, batch, rows, static_cast<int>(slots));
        PK_CHECK_LAUNCH();
      }
    }
  });
}

// x (or y) as an operand of the tensor-core search: copied by 16-byte chunks where its rows
// allow it.
template <typename T>
mma::Operand<T> tensor_operand(const Tensor& t) {
  const int64_t per_chunk = 16 / sizeof(T);
  const bool vector = (t.size(2) <= 1 || t.stride(2) == 1) &&
                      (t.size(1) <= 1 || t.stride(1) % per_chunk == 0) &&
                      (t.size(0) <= 1 || t.stride(0) % per_chunk == 0) &&
                      reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return {static_cast<const T*>(t.const_data_ptr()), t.stride(1), t.stride(2), t.size(1), vector};
}

// prepare_kernel's launch: the squared norms of y's rows, after x's where `x_norms` ((B, N + M);
// else (B, M)), and the keys (where given) filled.
template <typename T>
Tensor prepare(const Tensor& x, const Tensor& y, bool x_norms, long long* keys, int slots,
               long long* col_keys, cudaStream_t stream) {
  const int64_t batch = x.size(0), rows = x.size(1), cols = y.size(1), depth = x.size(2);
  Tensor norms =
      torch::stable::new_empty(x, {batch, (x_norms ? rows : 0) + cols}, ScalarType::Float);
  const int64_t listed = (x_norms || keys ? rows : 0) + cols;
  prepare_kernel<T><<<blocks_for(batch * listed, kThreads / kLanesPerRow), kThreads, 0, stream>>>(
      input<T>(x, 1, 2), input<T>(y, 1, 2), batch, rows, cols, depth,
      static_cast<float*>(norms.mutable_data_ptr()), x_norms, keys, slots, col_keys);
  PK_CHECK_LAUNCH();
  return norms;
}

// Enough blocks for this many waves of the GPU (2 blocks per SM fit at once).
constexpr int64_t kSearchWaves = 2;

// The tensor-core search's launch, or false where its int bookkeeping cannot hold the walk (a
// block's column tiles x depth steps, or the blocks, at 2**31): search_kernel takes those.
template <typename T, Precision P, Fold FOLD>
bool launch_tensor_search(const Tensor& x, const Tensor& y, const Search& search, int slots,
                          cudaStream_t stream) {
  using Tile = mma::Tile;
  const int64_t batch = x.size(0), rows = x.size(1), cols = y.size(1), depth = x.size(2);
  const int64_t row_tiles = (rows + Tile::kRows - 1) / Tile::kRows;
  const int64_t col_tiles = (cols + Tile::kCols - 1) / Tile::kCols;
  const int64_t steps = std::max<int64_t>(1, (depth + mma::stage_depth<T>() - 1) / mma::stage_depth<T>());
  const int64_t row_blocks = batch * row_tiles;  // >= 1: the caller has rows
  const ColumnSplits split = split_columns(col_tiles, row_blocks, 2 * kSearchWaves * sm_count(x));
  if (split.tiles_per_split * steps >= kIntLimit || row_blocks * split.splits >= kIntLimit)
    return false;

  Tensor norms = prepare<T>(x, y, true, search.keys, slots, search.col_keys, stream);
  if (cols == 0) return true;  // every key stays "none"

  const TensorSearchArgs<T> args{
      tensor_operand<T>(x), tensor_operand<T>(y), x.stride(0), y.stride(0), depth,
      static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(steps),
      static_cast<const float*>(norms.const_data_ptr()), static_cast<int>(row_tiles),
      static_cast<int>(col_tiles), static_cast<int>(split.tiles_per_split),
      static_cast<int>(split.splits), search};
  constexpr auto kernel = tensor_search_kernel<T, P, FOLD>;
  constexpr size_t bytes = TensorSearchSmem<FOLD>::kBytes;
  once_per_device(x.get_device_index(), [&] {  // above the 48 KB default
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
  kernel<<<static_cast<unsigned>(row_blocks * split.splits), Tile::kThreads, bytes, stream>>>(args);
  PK_CHECK_LAUNCH();
  return true;
}

// The caller's outputs (B, N, 1) of a search of one best per row, which the Hopper search of one
// column split fills itself (write_winners) instead of leaving keys for finish().
struct WinnerOutputs {
  const Tensor& dist;
  const Tensor& idx;
  const std::optional<Tensor>& gathered;
};

// `outputs` as the Hopper search writes them, for x (batch, rows, D) against y (as plan_walk left
// it), or none (out.dist null) where plan_walk folded x's batches into one (y shared by all) and
// an output's rows do not run on from batch to batch as the folded rows do.
template <typename T>
Winners<T> winners_of(const char* op, const WinnerOutputs& outputs, const Tensor& y,
                      int64_t batch, int64_t rows, bool folded) {
  Winners<T> w{results<float>(op, outputs.dist, outputs.idx, batch, rows, 1), input<T>(y, 1, 2),
               {nullptr, 0, 0, 0}, false, static_cast<int>(y.size(2))};
  if (outputs.gathered) {
    const Tensor& g = *outputs.gathered;
    check_gathered(op, g, y, batch, rows, 1);
    w.gathered = output<T>(g);
    auto whole_chunks = [](int64_t size, int64_t stride) {
      return size <= 1 || stride * int64_t{sizeof(T)} % 16 == 0;
    };
    w.gathered_chunks = g.stride(2) == 1 && whole_chunks(g.size(1), g.stride(1)) &&
                        whole_chunks(g.size(0), g.stride(0)) &&
                        reinterpret_cast<uintptr_t>(g.const_data_ptr()) % 16 == 0;
  }
  if (folded) {
    if (w.out.batch != rows * w.out.row ||
        (w.gathered.data && w.gathered.batch != rows * w.gathered.row))
      return {};
    w.out.batch = w.gathered.batch = 0;
  }
  return w;
}

// The Hopper search's launch (k = 1, with an optional excluded column), or false where the walk
// does not apply (hopper::plan_walk says why). Where it has `outputs` and runs as one column split,
// it writes them itself and sets *wrote_outputs; else it leaves search.keys.
template <typename T>
bool launch_hopper_search(Tensor x, Tensor y, const Search& search, Precision precision,
                          const WinnerOutputs* outputs, bool* wrote_outputs, cudaStream_t stream) {
  const int64_t batch = x.size(0), rows = x.size(1);
  hopper::WalkPlan plan;
  // A folded batch (y shared by every batch) reads the keys (B, N, 1) and exclude (B, N) as they
  // are: both are contiguous.
  if (!hopper::plan_walk<T>(&plan, x, y, precision, kHopperSearchBytes)) return false;
  const Winners<T> winners =
      outputs && plan.shape.splits == 1
          ? winners_of<T>("nearest_cuda", *outputs, y, batch, rows, x.size(0) != batch)
          : Winners<T>{};
  *wrote_outputs = winners.out.dist != nullptr;
  Tensor norms = prepare<T>(x, y, false, *wrote_outputs ? nullptr : search.keys, 1, nullptr,
                            stream);
  const HopperSearchArgs<T> args{plan.shape, static_cast<const float*>(norms.const_data_ptr()),
                                 search.exclude, search.keys, winners};
  hopper::launch_walk<hopper_search_kernel<T, false>,
                      hopper_search_kernel<T, std::is_same_v<T, float>>>(
      plan, args, x.get_device_index(), stream);
  return true;
}

// The tensor-core search for one best per row (k = 1, labels, both ways) on tensor-core products
// (float32 at "tf32"/"tf32x3", the half types); false where it does not apply. The Hopper search
// may write `outputs` itself (launch_hopper_search).
template <typename T>
bool tensor_search(const Tensor& x, const Tensor& y, const Search& search, int slots,
                   Precision precision, const WinnerOutputs* outputs, bool* wrote_outputs,
                   cudaStream_t stream) {
  if (search.k != 1) return false;
  bool launched = false;
  // dispatch_tile's rule: tensor-core tiles for every precision but float32 "ieee" (and float64).
  dispatch_tile<T>(precision, [&](auto tile, auto product) {
    constexpr Precision kP = decltype(product)::value;
    if constexpr (std::is_same_v<decltype(tile), MmaTile>) {
      if (search.x_labels)
        launched = launch_tensor_search<T, kP, Fold::kLabels>(x, y, search, slots, stream);
      else if (search.col_keys)
        launched = launch_tensor_search<T, kP, Fold::kBoth>(x, y, search, slots, stream);
      else
        launched = launch_hopper_search<T>(x, y, search, kP, outputs, wrote_outputs, stream) ||
                   launch_tensor_search<T, kP, Fold::kNearest>(x, y, search, slots, stream);
    }
  });
  return launched;
}

// Runs the search on x's rows against y's and returns its keys (B, N, slots), or nothing where the
// search wrote `outputs` (one best per row) itself; col_keys, if given, receives the best row per
// column.
std::optional<Tensor> search_keys(const char* op, const Tensor& x, const Tensor& y, Search search,
                                  int64_t slots, const std::string& precision, cudaStream_t stream,
                                  const WinnerOutputs* outputs = nullptr) {
  const Precision p = parse_precision(precision, op);
  Tensor keys = torch::stable::new_empty(x, {x.size(0), x.size(1), slots}, ScalarType::Long);
  search.keys = static_cast<long long*>(keys.mutable_data_ptr());
  auto fill_col_keys = [&] {
    const int64_t count = y.size(0) * y.size(1);
    if (!search.col_keys || count == 0) return;
    fill_kernel<<<blocks_for(count), kThreads, 0, stream>>>(search.col_keys, count, kNoKey);
    PK_CHECK_LAUNCH();
  };
  if (keys.numel() == 0) {
    fill_col_keys();
    return keys;
  }
  bool wrote_outputs = false;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {  // check_search refused it
      if (tensor_search<T>(x, y, search, static_cast<int>(slots), p, outputs, &wrote_outputs,
                           stream))
        return;
      fill_col_keys();
      SearchArgs<T> args{input<T>(x, 1, 2), input<T>(y, 1, 2), x.size(1), y.size(1), x.size(2),
                         0, search};
      ::protokernels::search<T>(args, x.size(0), p, stream);
    }
  });
  if (wrote_outputs) return std::nullopt;
  return keys;
}

}  // namespace

// x (B, N, D), y (B, M, D), exclude (B, N) or None -> dist, idx (B, N, k) ascending, filled;
// gathered (B, N, D) or None (k = 1): the winners' rows of y.
void nearest_cuda(Tensor x, Tensor y, std::optional<Tensor> exclude, int64_t k,
                  std::string precision, Tensor dist, Tensor idx, std::optional<Tensor> gathered) {
  const char* op = "nearest_cuda";
  check_search(op, x, y);
  PK_CHECK(k >= 1 && k <= kMaxK && k <= y.size(1), op, "k must be in [1, min(M, ", kMaxK,
           ")], got ", k);
  if (exclude) check_index(op, "exclude", *exclude, x, x.size(1));
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x);
  Search search{exclude ? static_cast<const int64_t*>(exclude->const_data_ptr()) : nullptr,
                nullptr, nullptr, nullptr, nullptr, static_cast<int>(k)};
  const WinnerOutputs outputs{dist, idx, gathered};
  const std::optional<Tensor> keys =
      search_keys(op, x, y, search, k, precision, stream, k == 1 ? &outputs : nullptr);
  if (keys) finish(op, *keys, x, y, dist, idx, k > 1, stream, gathered);
}

// -> dist, idx (B, N, 2): slot 0 the nearest y of x's label, slot 1 of any other label.
void nearest_by_label_cuda(Tensor x, Tensor x_labels, Tensor y, Tensor y_labels,
                           std::string precision, Tensor dist, Tensor idx) {
  const char* op = "nearest_by_label_cuda";
  check_search(op, x, y);
  check_index(op, "x_labels", x_labels, x, x.size(1));
  check_index(op, "y_labels", y_labels, x, y.size(1));
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x);
  Search search{nullptr, static_cast<const int64_t*>(x_labels.const_data_ptr()),
                static_cast<const int64_t*>(y_labels.const_data_ptr()), nullptr, nullptr, 1};
  const Tensor keys = *search_keys(op, x, y, search, 2, precision, stream);
  finish(op, keys, x, y, dist, idx, false, stream);
}

// -> row_dist, row_idx (B, N): nearest y per x; col_dist, col_idx (B, M): nearest x per y.
void nearest_both_cuda(Tensor x, Tensor y, std::string precision, Tensor row_dist, Tensor row_idx,
                       Tensor col_dist, Tensor col_idx) {
  const char* op = "nearest_both_cuda";
  check_search(op, x, y);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x);
  Tensor col_keys = torch::stable::new_empty(x, {y.size(0), y.size(1), 1}, ScalarType::Long);
  Search search{nullptr, nullptr, nullptr, nullptr,
                static_cast<long long*>(col_keys.mutable_data_ptr()), 1};
  const Tensor keys = *search_keys(op, x, y, search, 1, precision, stream);
  auto slot = [](const Tensor& t) { return torch::stable::unsqueeze(t, 2); };
  finish(op, keys, x, y, slot(row_dist), slot(row_idx), false, stream);
  finish(op, col_keys, y, x, slot(col_dist), slot(col_idx), false, stream);
}

// Depthwise VQ's search (dw_nearest, and dw_quantize with `quantize`): x (N, G*Dg) against
// codebooks (G, K >= 1, Dg) -> quantized (N, G*Dg) (the winning codes; (0, G*Dg) without
// `quantize`), dist and idx (N, G). The batched search with the group as the batch: x, the results
// and the codes are viewed as (G, N, .) in place. One C++ call allocates the outputs and makes the
// views, where the Python implementation's allocations and views cost 30 us of host time per call
// on the H100 machine (RESULTS.md "One call for the VQ step").
std::tuple<Tensor, Tensor, Tensor> dw_nearest_cuda(Tensor x, Tensor codebooks, std::string precision,
                                                   bool quantize) {
  const char* op = "dw_nearest_cuda";
  PK_CHECK_DIM(op, "x", x, 2);
  PK_CHECK_DIM(op, "codebooks", codebooks, 3);
  const int64_t rows = x.size(0), groups = codebooks.size(0), depth = codebooks.size(2);
  PK_CHECK(x.size(1) == groups * depth, op, "x must be (N, G*Dg) for codebooks (G, K, Dg)");
  PK_CHECK(groups == 0 || codebooks.size(1) > 0, op, "every group needs a code (K >= 1)");
  Tensor dist = torch::stable::new_empty(x, {rows, groups}, ScalarType::Float);
  Tensor idx = torch::stable::new_empty(x, {rows, groups}, ScalarType::Long);
  Tensor quantized = torch::stable::new_empty(codebooks, {quantize ? rows : 0, groups * depth});
  if (rows * groups == 0) return {quantized, dist, idx};
  const int64_t row = x.stride(0), col = x.stride(1);
  std::optional<Tensor> codes;
  if (quantize) codes = reinterpret(quantized, {groups, rows, depth}, {depth, groups * depth, 1});
  nearest_cuda(reinterpret(x, {groups, rows, depth}, {depth * col, row, col}), codebooks,
               std::nullopt, 1, precision, reinterpret(dist, {groups, rows, 1}, {1, groups, 1}),
               reinterpret(idx, {groups, rows, 1}, {1, groups, 1}), codes);
  return {quantized, dist, idx};
}

// What these kernels can take, for the Python dispatch (protokernels/_capabilities.py).
// hopper_depth_bytes: on the current device, one best per row (nearest, dw_nearest; with an
// excluded column) at "tf32" or in half precision runs the Hopper search for rows up to this many
// bytes, hopper_split_depth_bytes at "tf32x3" (0: it does not run here), which _backend.py's
// `auto` table reads.
std::string nearest_cuda_capabilities() {
  int device = 0;
  cudaGetDevice(&device);
  return "dtypes=float16,bfloat16,float32;max_rows=" + std::to_string(kMaxRows) +
         ";max_k=" + std::to_string(kMaxK) +
         ";hopper_depth_bytes=" +
         std::to_string(hopper::walk_depth_bytes(device, false, kHopperSearchBytes)) +
         ";hopper_split_depth_bytes=" +
         std::to_string(hopper::walk_depth_bytes(device, true, kHopperSearchBytes)) +
         ";why=indices are packed in 31 bits and scores ranked as float32 keys; the reference "
         "backend takes float64";
}

// Gradient of dist (B, R, S) = ||a_r - b_idx[r,s]||^2 w.r.t. a (B, R, D) and b (B, T, D).
std::tuple<Tensor, Tensor> gather_sqdist_grad_cuda(Tensor grad, Tensor a, Tensor b, Tensor idx) {
  const char* op = "gather_sqdist_grad_cuda";
  check_rows(op, a, b);
  PK_CHECK(idx.is_cuda() && idx.scalar_type() == ScalarType::Long && idx.dim() == 3 &&
               idx.size(0) == a.size(0) && idx.size(1) == a.size(1) && idx.is_contiguous(),
           op, "argument 'idx' must be a contiguous int64 CUDA tensor of shape (B, R, S)");
  PK_CHECK(grad.is_cuda() && grad.scalar_type() == dist_dtype(a) && grad.is_contiguous() &&
               grad.dim() == 3 && grad.size(2) == idx.size(2) && grad.size(1) == idx.size(1) &&
               grad.size(0) == idx.size(0),
           op, "argument 'grad' must be a contiguous CUDA tensor shaped like 'idx', of the "
           "distances' dtype");
  torch::stable::accelerator::DeviceGuard guard(a.get_device_index());
  const cudaStream_t stream = current_stream(a);
  const int64_t batch = a.size(0), rows = a.size(1), depth = a.size(2), b_rows = b.size(1);
  Tensor ga = torch::stable::new_empty(a, {batch, rows, depth});
  Tensor gb_acc = new_zeroed(a, {batch, b_rows, depth}, dist_dtype(a));
  if (a.numel() == 0 || b.numel() == 0) {
    if (ga.numel() > 0) torch::stable::zero_(ga);
    return {ga, a.scalar_type() == dist_dtype(a) ? gb_acc
                                                 : torch::stable::new_zeros(b, {batch, b_rows, depth})};
  }
  Tensor gb = gb_acc;
  dispatch_floating(a.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accumulate<T>::type;
    auto* acc = static_cast<Acc*>(gb_acc.mutable_data_ptr());
    gather_grad_kernel<T><<<blocks_for(batch * rows, 1), 128, 0, stream>>>(
        static_cast<const Acc*>(grad.const_data_ptr()),
        static_cast<const int64_t*>(idx.const_data_ptr()), input<T>(a, 1, 2), input<T>(b, 1, 2),
        output<T>(ga), acc, batch, rows, idx.size(2), depth, b_rows);
    PK_CHECK_LAUNCH();
    if constexpr (!std::is_same_v<T, Acc>) {
      gb = torch::stable::new_empty(b, {batch, b_rows, depth});
      narrow_kernel<T><<<blocks_for(gb.numel()), kThreads, 0, stream>>>(
          acc, static_cast<T*>(gb.mutable_data_ptr()), gb.numel());
      PK_CHECK_LAUNCH();
    }
  });
  return {ga, gb};
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("nearest_cuda(Tensor x, Tensor y, Tensor? exclude, int k, str precision, "
        "Tensor(a!) dist, Tensor(b!) idx, Tensor(c!)? gathered=None) -> ()");
  m.def("nearest_by_label_cuda(Tensor x, Tensor x_labels, Tensor y, Tensor y_labels, "
        "str precision, Tensor(a!) dist, Tensor(b!) idx) -> ()");
  m.def("nearest_both_cuda(Tensor x, Tensor y, str precision, Tensor(a!) row_dist, "
        "Tensor(b!) row_idx, Tensor(c!) col_dist, Tensor(d!) col_idx) -> ()");
  m.def("gather_sqdist_grad_cuda(Tensor grad, Tensor a, Tensor b, Tensor idx) -> (Tensor, Tensor)");
  m.def("dw_nearest_cuda(Tensor x, Tensor codebooks, str precision, bool quantize) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("nearest_cuda_capabilities() -> str");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("nearest_cuda", TORCH_BOX(&protokernels::nearest_cuda));
  m.impl("nearest_by_label_cuda", TORCH_BOX(&protokernels::nearest_by_label_cuda));
  m.impl("nearest_both_cuda", TORCH_BOX(&protokernels::nearest_both_cuda));
  m.impl("dw_nearest_cuda", TORCH_BOX(&protokernels::dw_nearest_cuda));
  m.impl("gather_sqdist_grad_cuda", TORCH_BOX(&protokernels::gather_sqdist_grad_cuda));
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CompositeExplicitAutograd, m) {
  m.impl("nearest_cuda_capabilities", TORCH_BOX(&protokernels::nearest_cuda_capabilities));
}
