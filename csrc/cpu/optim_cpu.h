// The CPU kernels of fusedtrain::adam_step_ and fusedtrain::sgd_step_ (schemas in csrc/ops.cpp).
// Registered with the dispatcher for torch.ops, and also bound directly in fusedtrain._C: for
// an eager step over many small tensors, torch.ops' conversion of six Python lists costs as much
// as the update itself.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace fusedtrain {
namespace cpu {

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& lr_tensor);

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  double lr, double momentum, double dampening, double weight_decay,
                  bool nesterov, bool maximize, bool first_step,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& lr_tensor);

}  // namespace cpu
}  // namespace fusedtrain
