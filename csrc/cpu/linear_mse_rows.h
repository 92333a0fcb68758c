// What the linear + MSE op and the fused training loop share on the CPU: running the row loops
// over many rows into thread-private accumulators that are summed at the end.
#pragma once

#include <algorithm>
#include <vector>

#include <optional>

#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>

#include "../linear_mse_checks.h"
#include "cpu_isa.h"
#include "multi_tensor.h"

namespace fusedtrain {
namespace cpu {

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
  // With no in-features grad_weight is empty and its pointer null, but grad_bias is still wanted.
  const bool need_params = grad_weight != nullptr || grad_bias != nullptr;
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
