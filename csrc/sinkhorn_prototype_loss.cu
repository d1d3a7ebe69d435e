// sinkhorn_prototype_loss's unit rows in CUDA: the normalizations of z and the prototypes,
// forward and backward, a warp per row of both matrices in one launch each (formulas:
// protokernels/reference/sinkhorn_prototype_loss.py). In PyTorch they were 20 of the Sinkhorn
// head's 29 launches per training step, which at the in-model sizes is host time (RESULTS.md
// "The in-model grid, sixteenth session").
#include <cmath>
#include <tuple>

#include "common.h"
#include "losses.cuh"

namespace protokernels {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp each

template <typename T>
struct UnitRows {  // one matrix: its rows (any strides), their unit rows (contiguous) and norms
  const T* rows;
  int64_t stride_row, stride_col;
  T* unit;
  T* norm;
};

template <typename T>
struct UnitRowsGrad {  // one matrix: the unit rows' gradient (any strides), the forward's unit
                       // rows and norms, the gradient w.r.t. the rows (contiguous)
  const T* grad;
  int64_t stride_row, stride_col;
  const T* unit;
  const T* norm;
  T* out;
};

// Rows [0, first_rows) of the launch are the first matrix's, the rest the second's.
template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    unit_rows_kernel(UnitRows<T> first, UnitRows<T> second, int64_t first_rows, int64_t rows,
                     int64_t depth, typename Accumulate<T>::type eps) {
  using A = typename Accumulate<T>::type;
  const int lane = threadIdx.x % 32;
  int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const UnitRows<T> m = row < first_rows ? first : second;
  if (row >= first_rows) row -= first_rows;
  const T* t = m.rows + row * m.stride_row;
  A squares = 0;
  for (int64_t j = lane; j < depth; j += 32) {
    const A v = widen(t[j * m.stride_col]);
    squares += v * v;
  }
  const A root = sqrt(warp_sum(squares));
  // at least eps (a NaN stays NaN), rounded to the rows' dtype first, as F.normalize divides by
  // its denominator in that dtype
  const T norm = narrow<T>(root < eps ? eps : root);
  if (lane == 0) m.norm[row] = norm;
  const A divisor = widen(norm);
  for (int64_t j = lane; j < depth; j += 32) {
    m.unit[row * depth + j] = narrow<T>(widen(t[j * m.stride_col]) / divisor);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    unit_rows_grad_kernel(UnitRowsGrad<T> first, UnitRowsGrad<T> second, int64_t first_rows,
                          int64_t rows, int64_t depth, typename Accumulate<T>::type eps) {
  using A = typename Accumulate<T>::type;
  const int lane = threadIdx.x % 32;
  int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const UnitRowsGrad<T> m = row < first_rows ? first : second;
  if (row >= first_rows) row -= first_rows;
  const T* g = m.grad + row * m.stride_row;
  const T* unit = m.unit + row * depth;
  A dot = 0;
  for (int64_t j = lane; j < depth; j += 32) dot += widen(g[j * m.stride_col]) * widen(unit[j]);
  const A norm = widen(m.norm[row]);
  // where the norm is eps, it is a constant: no radial part
  const A radial = norm <= eps ? A(0) : warp_sum(dot);
  for (int64_t j = lane; j < depth; j += 32) {
    m.out[row * depth + j] =
        narrow<T>((widen(g[j * m.stride_col]) - widen(unit[j]) * radial) / norm);
  }
}

unsigned row_blocks(int64_t rows, const char* op) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  PK_CHECK(blocks < (int64_t{1} << 31), op, "too many rows: ", rows);
  return static_cast<unsigned>(blocks);
}

}  // namespace

// z (B, D), prototypes (K, D) of one floating dtype, any strides -> (z_unit, p_unit) contiguous,
// (z_norm, p_norm): the rows' norms, at least eps, all in that dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor> unit_rows_cuda(Tensor z, Tensor prototypes,
                                                          double eps) {
  const char* op = "unit_rows_cuda";
  PK_CHECK_CUDA(op, "z", z);
  PK_CHECK_CUDA(op, "prototypes", prototypes);
  PK_CHECK_DIM(op, "z", z, 2);
  PK_CHECK_DIM(op, "prototypes", prototypes, 2);
  PK_CHECK(prototypes.size(1) == z.size(1) && prototypes.scalar_type() == z.scalar_type(), op,
           "argument 'prototypes' must have z's feature size and dtype");
  const int64_t b = z.size(0), k = prototypes.size(0), depth = z.size(1);
  const ScalarType dtype = z.scalar_type();
  Tensor z_unit = torch::stable::new_empty(z, {b, depth}, dtype);
  Tensor p_unit = torch::stable::new_empty(z, {k, depth}, dtype);
  Tensor z_norm = torch::stable::new_empty(z, {b}, dtype);
  Tensor p_norm = torch::stable::new_empty(z, {k}, dtype);
  if (b + k == 0) return {z_unit, p_unit, z_norm, p_norm};
  torch::stable::accelerator::DeviceGuard guard(z.get_device_index());
  const cudaStream_t stream = current_stream(z);
  dispatch_floating(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    const auto rows_of = [](const Tensor& t, Tensor& unit, Tensor& norm) {
      return UnitRows<T>{static_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1),
                         static_cast<T*>(unit.mutable_data_ptr()),
                         static_cast<T*>(norm.mutable_data_ptr())};
    };
    unit_rows_kernel<T><<<row_blocks(b + k, op), kRowsPerBlock * 32, 0, stream>>>(
        rows_of(z, z_unit, z_norm), rows_of(prototypes, p_unit, p_norm), b, b + k, depth,
        static_cast<A>(eps));
    PK_CHECK_LAUNCH();
  });
  return {z_unit, p_unit, z_norm, p_norm};
}

// The gradients w.r.t. z and the prototypes (contiguous, in their dtype) from the unit rows'
// gradients grad_z_unit (B, D) and grad_p_unit (K, D) (any strides) and unit_rows_cuda's outputs.
std::tuple<Tensor, Tensor> unit_rows_grad_cuda(Tensor grad_z_unit, Tensor z_unit, Tensor z_norm,
                                               Tensor grad_p_unit, Tensor p_unit, Tensor p_norm,
                                               double eps) {
  const char* op = "unit_rows_grad_cuda";
  PK_CHECK_CUDA(op, "z_unit", z_unit);
  PK_CHECK_DIM(op, "z_unit", z_unit, 2);
  PK_CHECK_DIM(op, "p_unit", p_unit, 2);
  const int64_t b = z_unit.size(0), k = p_unit.size(0), depth = z_unit.size(1);
  const ScalarType dtype = z_unit.scalar_type();
  const auto matches = [&](const Tensor& grad, const Tensor& unit, const Tensor& norm,
                           int64_t rows) {
    return grad.is_cuda() && unit.is_cuda() && norm.is_cuda() && grad.dim() == 2 &&
           grad.size(0) == rows && grad.size(1) == depth && unit.size(0) == rows &&
           unit.size(1) == depth && unit.is_contiguous() && norm.dim() == 1 &&
           norm.size(0) == rows && norm.is_contiguous() && grad.scalar_type() == dtype &&
           unit.scalar_type() == dtype && norm.scalar_type() == dtype;
  };
  PK_CHECK(matches(grad_z_unit, z_unit, z_norm, b) && matches(grad_p_unit, p_unit, p_norm, k),
           op, "arguments must be unit_rows_cuda's outputs (unit rows contiguous) and gradients "
           "shaped like the unit rows, all of one dtype");
  Tensor grad_z = torch::stable::new_empty(z_unit, {b, depth}, dtype);
  Tensor grad_p = torch::stable::new_empty(z_unit, {k, depth}, dtype);
  if (b + k == 0) return {grad_z, grad_p};
  torch::stable::accelerator::DeviceGuard guard(z_unit.get_device_index());
  const cudaStream_t stream = current_stream(z_unit);
  dispatch_floating(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Accumulate<T>::type;
    const auto rows_of = [](const Tensor& grad, const Tensor& unit, const Tensor& norm,
                            Tensor& out) {
      return UnitRowsGrad<T>{static_cast<const T*>(grad.const_data_ptr()), grad.stride(0),
                             grad.stride(1), static_cast<const T*>(unit.const_data_ptr()),
                             static_cast<const T*>(norm.const_data_ptr()),
                             static_cast<T*>(out.mutable_data_ptr())};
    };
    unit_rows_grad_kernel<T><<<row_blocks(b + k, op), kRowsPerBlock * 32, 0, stream>>>(
        rows_of(grad_z_unit, z_unit, z_norm, grad_z),
        rows_of(grad_p_unit, p_unit, p_norm, grad_p), b, b + k, depth, static_cast<A>(eps));
    PK_CHECK_LAUNCH();
  });
  return {grad_z, grad_p};
}

}  // namespace protokernels

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) {
  m.def("unit_rows_cuda(Tensor z, Tensor prototypes, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("unit_rows_grad_cuda(Tensor grad_z_unit, Tensor z_unit, Tensor z_norm, "
        "Tensor grad_p_unit, Tensor p_unit, Tensor p_norm, float eps) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(protokernels, CUDA, m) {
  m.impl("unit_rows_cuda", TORCH_BOX(&protokernels::unit_rows_cuda));
  m.impl("unit_rows_grad_cuda", TORCH_BOX(&protokernels::unit_rows_grad_cuda));
}
