// CPU kernels of the fused linear + MSE ops (schemas in csrc/ops.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fusedtrain {
namespace cpu {

// (loss, grad_weight, grad_bias, grad_x); the gradients not asked for are empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_mse_fwd_bwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, bool need_grad_x, bool need_grad_params);

}  // namespace cpu
}  // namespace fusedtrain
