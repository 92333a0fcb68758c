// CPU implementation of fusedtrain::linear_mse_fwd_bwd. Small outputs (<= kMaxFusedOut) take one
// pass over x: each thread runs the row loops of the active instruction set into private
// gradient accumulators, which are summed at the end. Large outputs are GEMM-bound: block by
// block of rows, the prediction comes from ATen's GEMM, the residual, loss and bias gradient are
// fused into one pass over it (turning it into dloss/dpred in place), and two more GEMMs
// accumulate the gradients.
#include "linear_mse_cpu.h"

#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <torch/library.h>

#include "linear_mse_rows.h"

namespace fusedtrain {
namespace cpu {
namespace {

// Rows per block of the GEMM path: 2^21 values, 8 MiB of fp32 predictions.
constexpr int64_t kLargeOutBlockElements = int64_t{1} << 21;

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_in, int64_t reduction, bool need_grad_x, bool need_grad_params) {
  const LinearMseCall c = prepare_linear_mse(x_in, weight_in, bias, target_in, reduction,
                                             need_grad_x, need_grad_params);
  const at::Tensor &x = c.x, &weight = c.weight, &b = c.bias, &target = c.target;
  const at::Tensor &grad_weight = c.grad_weight, &grad_bias = c.grad_bias, &grad_x = c.grad_x;
  const int64_t n = c.n, in = c.in, out = c.out, count = c.count;
  const double two_over_count = c.two_over_count;
  const auto opts = x.options();
  double loss_sum = 0.0;

  if (out <= kMaxFusedOut) {
    std::vector<T> workspace;
    loss_sum = fused_linear_mse_rows<T>(
        x.data_ptr<T>(), weight.data_ptr<T>(), b.defined() ? b.data_ptr<T>() : nullptr,
        target.data_ptr<T>(), n, in, out, static_cast<T>(two_over_count),
        need_grad_params ? grad_weight.data_ptr<T>() : nullptr,
        need_grad_params && b.defined() ? grad_bias.data_ptr<T>() : nullptr,
        need_grad_x ? grad_x.data_ptr<T>() : nullptr, workspace);
  } else {
    // Blocks of rows: the prediction of one block (at most kLargeOutBlockElements values) is
    // turned into dloss/dpred in place and consumed by the gradient GEMMs before the next, so
    // memory grows by one block rather than by N x out.
    const int64_t block = std::min(n, std::max<int64_t>(1, kLargeOutBlockElements / out));
    at::Tensor grad_pred_block = at::empty({block, out}, opts);
    if (need_grad_params) grad_weight.zero_();
    std::vector<T> bias_total(out, T(0));  // dloss/dbias: the column sums of dloss/dpred
    std::vector<T> workspace;
    const ResidualRowsFn<T> kernel = residual_kernel<T>();
    for (int64_t first = 0; first < n; first += block) {
      const int64_t rows = std::min(block, n - first);
      at::Tensor grad_pred = grad_pred_block.narrow(0, 0, rows);
      const at::Tensor x_rows = x.narrow(0, first, rows);
      if (b.defined()) {
        at::addmm_out(grad_pred, b, x_rows, weight.t());
      } else {
        at::mm_out(grad_pred, x_rows, weight.t());
      }
      const ResidualRows<T> args{grad_pred.data_ptr<T>(), target.data_ptr<T>() + first * out,
                                 out, static_cast<T>(two_over_count)};
      loss_sum += run_rows_per_thread<T>(rows, out, out, workspace,
                                         [&](int64_t begin, int64_t end, double* loss, T* acc) {
                                           kernel(args, begin, end, loss, acc);
                                         });
      for (int64_t o = 0; o < out; ++o) bias_total[o] += workspace[o];
      if (need_grad_params) grad_weight.addmm_(grad_pred.t(), x_rows);
      if (need_grad_x) {
        at::Tensor grad_x_rows = grad_x.narrow(0, first, rows);
        at::mm_out(grad_x_rows, grad_pred, weight);
      }
    }
    if (need_grad_params && b.defined()) {
      std::copy(bias_total.begin(), bias_total.end(), grad_bias.data_ptr<T>());
    }
  }
  const double loss = reduction == at::Reduction::Mean ? loss_sum / count : loss_sum;
  return {at::scalar_tensor(loss, opts), grad_weight, grad_bias, grad_x};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_mse_fwd_bwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, bool need_grad_x, bool need_grad_params) {
  check_linear_mse_inputs("linear_mse_fwd_bwd", x, weight, bias, target, reduction);
  // A kernel: its GEMMs must not record autograd history (the op's gradients are its outputs).
  const at::NoGradGuard no_grad;
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
