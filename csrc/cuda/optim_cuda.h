// The CUDA optimizer kernels (optim_cuda.cu), for the fused train step to call directly.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace fusedtrain {
namespace cuda {

// lr_tensor, when given, replaces lr: a one-element float32 or float64 tensor on the params'
// device, read by the kernels, so a captured CUDA graph follows changes made to it in place.
void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& lr_tensor = std::nullopt);

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool first_step,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& lr_tensor = std::nullopt);

}  // namespace cuda
}  // namespace fusedtrain
