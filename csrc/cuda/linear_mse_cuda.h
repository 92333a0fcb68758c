// The linear + MSE CUDA kernels (linear_mse_cuda.cu) as the stack ops' CUDA kernels
// (stack_cuda.cu) run them for their depth-1 case: one nn.Linear under MSELoss, params
// [weight] or [weight, bias].
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "../optimizer_hyper.h"

namespace fusedtrain {
namespace cuda {

// linear_mse_fwd_bwd's CUDA kernel: (loss, grad_weight, grad_bias, grad_x), checked here.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_mse_fwd_bwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, bool need_grad_x, bool need_grad_params);

// Whether the current device runs the train step of a linear layer with `out` outputs as ONE
// cooperative launch of the fused kernel (forward, loss, backward, gradient reduction and update).
bool linear_mse_fused_step_available(int64_t out);

// That one-launch train step, in place; returns the loss before the update. The caller has
// checked the arguments (as stack_adam_step_ / stack_sgd_step_ do) and made x's device current.
at::Tensor linear_mse_fused_adam_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                      int64_t reduction, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                      const AdamHyper& hyper);
at::Tensor linear_mse_fused_sgd_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                     int64_t reduction, at::TensorList momentum_buffers, const SgdHyper& hyper);

}  // namespace cuda
}  // namespace fusedtrain
