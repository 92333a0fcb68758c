// CPU implementation of fusedtrain::linear_mse_fwd_bwd. Small outputs (<= kMaxFusedOut) take one
// pass over x: each thread runs the row loops of the active instruction set into private
// gradient accumulators, which are summed at the end. Large outputs are GEMM-bound: the
// prediction comes from ATen's GEMM, the residual, loss and bias gradient are fused into one
// pass over it (turning it into dloss/dpred in place), and two more GEMMs give the gradients.
#include "linear_mse_cpu.h"

#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "multi_tensor.h"

namespace fusedtrain {
namespace cpu {
namespace {

constexpr const char* kOp = "linear_mse_fwd_bwd";

void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& target,
                  int64_t reduction) {
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
LinearMseRowsFn<float> rows_kernel<float>() { return active_kernels().linear_mse_f32; }
template <>
LinearMseRowsFn<double> rows_kernel<double>() { return active_kernels().linear_mse_f64; }

template <typename T>
ResidualRowsFn<T> residual_kernel();
template <>
ResidualRowsFn<float> residual_kernel<float>() { return active_kernels().residual_f32; }
template <>
ResidualRowsFn<double> residual_kernel<double>() { return active_kernels().residual_f64; }

// Runs `rows(begin, end, loss, accumulator)` over [0, n) rows, each thread into its own zeroed
// accumulator of `width` values; returns the summed loss and leaves the thread-summed
// accumulator in `total` (width values).
template <typename T, typename Rows>
double run_rows_per_thread(int64_t n, int64_t elements_per_row, int64_t width, T* total,
                           const Rows& rows) {
  const bool parallel = n * elements_per_row >= kMinParallelElements && n > 1;
  const int threads = parallel ? at::get_num_threads() : 1;
  std::vector<T> accumulators(static_cast<size_t>(threads) * width, T(0));
  std::vector<double> losses(threads, 0.0);
  if (parallel) {
    const int64_t grain = std::max<int64_t>(1, kMinParallelElements / 2 / elements_per_row);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      const int t = at::get_thread_num();
      rows(begin, end, &losses[t], accumulators.data() + static_cast<size_t>(t) * width);
    });
  } else {
    rows(0, n, &losses[0], accumulators.data());
  }
  double loss = 0.0;
  for (int t = 0; t < threads; ++t) {
    loss += losses[t];
    const T* acc = accumulators.data() + static_cast<size_t>(t) * width;
    for (int64_t k = 0; k < width; ++k) total[k] += acc[k];
  }
  return loss;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_in, int64_t reduction, bool need_grad_x, bool need_grad_params) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0);
  const int64_t count = n * out;
  const double two_over_count = reduction == at::Reduction::Mean ? 2.0 / count : 2.0;
  const auto opts = x.options();

  at::Tensor grad_weight = need_grad_params ? at::zeros({out, in}, opts) : at::empty({0}, opts);
  at::Tensor grad_bias = need_grad_params && bias.has_value() ? at::zeros({out}, opts)
                                                              : at::empty({0}, opts);
  at::Tensor grad_x = need_grad_x ? at::empty({n, in}, opts) : at::empty({0}, opts);
  double loss_sum = 0.0;

  if (out <= kMaxFusedOut) {
    const LinearMseRows<T> args{x.data_ptr<T>(),
                                weight.data_ptr<T>(),
                                b.defined() ? b.data_ptr<T>() : nullptr,
                                target.data_ptr<T>(),
                                in,
                                out,
                                static_cast<T>(two_over_count),
                                need_grad_params,
                                need_grad_x ? grad_x.data_ptr<T>() : nullptr};
    // accumulator layout: grad_weight (out x in), then grad_bias (out)
    std::vector<T> total(need_grad_params ? out * in + out : 0, T(0));
    const LinearMseRowsFn<T> kernel = rows_kernel<T>();
    loss_sum = run_rows_per_thread<T>(
        n, in * out, static_cast<int64_t>(total.size()), total.data(),
        [&](int64_t begin, int64_t end, double* loss, T* acc) {
          kernel(args, begin, end, loss, acc, need_grad_params ? acc + out * in : nullptr);
        });
    if (need_grad_params) {
      std::copy(total.begin(), total.begin() + out * in, grad_weight.data_ptr<T>());
      if (b.defined()) std::copy(total.begin() + out * in, total.end(), grad_bias.data_ptr<T>());
    }
  } else {
    at::Tensor grad_pred = b.defined() ? at::addmm(b, x, weight.t()) : at::mm(x, weight.t());
    const ResidualRows<T> args{grad_pred.data_ptr<T>(), target.data_ptr<T>(), out,
                               static_cast<T>(two_over_count)};
    std::vector<T> bias_total(out, T(0));
    const ResidualRowsFn<T> kernel = residual_kernel<T>();
    loss_sum = run_rows_per_thread<T>(n, out, out, bias_total.data(),
                                      [&](int64_t begin, int64_t end, double* loss, T* acc) {
                                        kernel(args, begin, end, loss, acc);
                                      });
    if (need_grad_params) {
      at::mm_out(grad_weight, grad_pred.t(), x);
      if (b.defined()) std::copy(bias_total.begin(), bias_total.end(), grad_bias.data_ptr<T>());
    }
    if (need_grad_x) at::mm_out(grad_x, grad_pred, weight);
  }
  const double loss = reduction == at::Reduction::Mean ? loss_sum / count : loss_sum;
  return {at::scalar_tensor(loss, opts), grad_weight, grad_bias, grad_x};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_mse_fwd_bwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, bool need_grad_x, bool need_grad_params) {
  check_inputs(x, weight, bias, target, reduction);
  if (x.scalar_type() == at::kDouble) {
    return fwd_bwd<double>(x, weight, bias, target, reduction, need_grad_x, need_grad_params);
  }
  return fwd_bwd<float>(x, weight, bias, target, reduction, need_grad_x, need_grad_params);
}

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("linear_mse_fwd_bwd", &linear_mse_fwd_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusedtrain
