// What the linear + MSE op and the fused training loop share: the argument checks, and running
// the row loops over many rows into thread-private accumulators that are summed at the end.
#pragma once

#include <algorithm>
#include <vector>

#include <optional>

#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>

#include "cpu_isa.h"
#include "multi_tensor.h"

namespace fusedtrain {
namespace cpu {

// Shapes, dtypes and devices of a linear + MSE call; named errors, nothing touched yet.
inline void check_linear_mse_inputs(const char* kOp, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const at::Tensor& target, int64_t reduction) {
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D (N, in), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), kOp,
                    ": weight must have shape (out, ", x.size(1), ") for x of shape ", x.sizes(),
                    ", got ", weight.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
                   ": x must be float32 or float64, got ", x.scalar_type());
  const auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ",
                     t.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(),
                      " but x is on ", x.device());
  };
  same(weight, "weight");
  same(target, "target");
  if (bias.has_value()) {
    same(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp,
                      ": bias must have shape (", weight.size(0), "), got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == x.size(0) &&
                        target.size(1) == weight.size(0),
                    kOp, ": target must have shape (", x.size(0), ", ", weight.size(0),
                    ") (expand it first), got ", target.sizes());
  TORCH_CHECK_VALUE(reduction == at::Reduction::Mean || reduction == at::Reduction::Sum, kOp,
                    ": reduction must be ", at::Reduction::Mean, " (mean) or ",
                    at::Reduction::Sum, " (sum), got ", reduction);
}

template <typename T>
LinearMseRowsFn<T> rows_kernel();
template <>
inline LinearMseRowsFn<float> rows_kernel<float>() { return active_kernels().linear_mse_f32; }
template <>
inline LinearMseRowsFn<double> rows_kernel<double>() { return active_kernels().linear_mse_f64; }

template <typename T>
ResidualRowsFn<T> residual_kernel();
template <>
inline ResidualRowsFn<float> residual_kernel<float>() { return active_kernels().residual_f32; }
template <>
inline ResidualRowsFn<double> residual_kernel<double>() { return active_kernels().residual_f64; }

// Runs `rows(begin, end, loss, accumulator)` over [0, n) rows, each thread into its own zeroed
// accumulator of `width` values in `accumulators` (which keeps its allocation between calls).
// Returns the summed loss; the thread-summed accumulator is left in accumulators[0, width).
template <typename T, typename Rows>
double run_rows_per_thread(int64_t n, int64_t elements_per_row, int64_t width,
                           std::vector<T>& accumulators, const Rows& rows) {
  const bool parallel = n * elements_per_row >= kMinParallelElements && n > 1;
  const int threads = parallel ? at::get_num_threads() : 1;
  accumulators.assign(static_cast<size_t>(threads) * width, T(0));
  if (!parallel) {
    double loss = 0.0;
    rows(0, n, &loss, accumulators.data());
    return loss;
  }
  std::vector<double> losses(threads, 0.0);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / 2 / elements_per_row);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const int t = at::get_thread_num();
    rows(begin, end, &losses[t], accumulators.data() + static_cast<size_t>(t) * width);
  });
  double loss = losses[0];
  for (int t = 1; t < threads; ++t) {
    loss += losses[t];
    const T* acc = accumulators.data() + static_cast<size_t>(t) * width;
    for (int64_t k = 0; k < width; ++k) accumulators[k] += acc[k];
  }
  return loss;
}

// Small outputs (out <= kMaxFusedOut), contiguous row-major inputs: the loss sum over all
// rows, with the gradients written (not accumulated) to grad_weight / grad_bias (null: not
// wanted) and grad_x (null: not wanted). `workspace` keeps its allocation between calls.
template <typename T>
double fused_linear_mse_rows(const T* x, const T* weight, const T* bias, const T* target,
                             int64_t n, int64_t in, int64_t out, T two_over_count,
                             T* grad_weight, T* grad_bias, T* grad_x, std::vector<T>& workspace) {
  const bool need_params = grad_weight != nullptr;
  const LinearMseRows<T> args{x, weight, bias, target, in, out, two_over_count, need_params, grad_x};
  // accumulator layout: grad_weight (out x in), then grad_bias (out)
  const int64_t width = need_params ? out * in + out : 0;
  const LinearMseRowsFn<T> kernel = rows_kernel<T>();
  const double loss = run_rows_per_thread<T>(
      n, in * out, width, workspace, [&](int64_t begin, int64_t end, double* loss_acc, T* acc) {
        kernel(args, begin, end, loss_acc, acc, need_params ? acc + out * in : nullptr);
      });
  if (need_params) {
    std::copy(workspace.begin(), workspace.begin() + out * in, grad_weight);
    if (grad_bias != nullptr) {
      std::copy(workspace.begin() + out * in, workspace.begin() + width, grad_bias);
    }
  }
  return loss;
}

}  // namespace cpu
}  // namespace fusedtrain
