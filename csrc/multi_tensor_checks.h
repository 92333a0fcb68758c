// Argument checks shared by the multi-tensor optimizer ops on every device. They all run before
// a kernel touches memory, so a rejected call leaves params and state as they were.
#pragma once

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fusedtrain {

inline bool is_optimizer_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_list_length(const char* op, const char* name, at::TensorList list,
                              size_t expected) {
  TORCH_CHECK_VALUE(list.size() == expected, op, ": ", name, " has ", list.size(),
                    " tensors, expected ", expected, " (one per param)");
}

inline void check_param(const char* op, at::TensorList params, size_t i, at::Device device) {
  const at::Tensor& p = params[i];
  TORCH_CHECK_VALUE(p.layout() == at::kStrided, op, ": params[", i, "] must be a dense tensor");
  TORCH_CHECK_VALUE(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                    ", expected ", device);
  TORCH_CHECK_TYPE(is_optimizer_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ",
                   p.scalar_type(), ", expected float32, float64, bfloat16 or float16");
}

// A tensor that is updated alongside params[i]: same shape, dtype and device, dense.
inline void check_like_param(const char* op, const char* name, at::TensorList list, size_t i,
                             const at::Tensor& param) {
  const at::Tensor& t = list[i];
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, "[", i,
                    "] must be a dense tensor, got layout ", t.layout(),
                    " (sparse gradients are not supported)");
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), op, ": ", name, "[", i, "] has shape ",
                    t.sizes(), " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == param.scalar_type(), op, ": ", name, "[", i,
                   "] has dtype ", t.scalar_type(), " but params[", i, "] has dtype ",
                   param.scalar_type());
  TORCH_CHECK_VALUE(t.device() == param.device(), op, ": ", name, "[", i, "] is on ",
                    t.device(), " but params[", i, "] is on ", param.device());
}

// "name" or "name[index]" for error messages (built only when a check fails).
inline std::string argument_name(const char* name, int64_t index) {
  return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
}

// A one-element float tensor: a step count (index >= 0: steps[index]), grad_scale or found_inf.
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                                at::Device device, int64_t index = -1) {
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", argument_name(name, index),
                    " must have one element, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                   argument_name(name, index), " must be float32 or float64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", argument_name(name, index), " is on ",
                    t.device(), ", expected ", device);
}

// The optional one-element tensors of an optimizer op: GradScaler's and a tensor learning rate.
inline void check_scale_inf_lr(const char* op, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf,
                               const std::optional<at::Tensor>& lr_tensor, at::Device device) {
  if (grad_scale.has_value()) check_scalar_tensor(op, "grad_scale", *grad_scale, device);
  if (found_inf.has_value()) check_scalar_tensor(op, "found_inf", *found_inf, device);
  if (lr_tensor.has_value()) check_scalar_tensor(op, "lr_tensor", *lr_tensor, device);
}

// Everything adam_step_ takes, on `device`.
inline void check_adam_step_args(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                 at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                 bool amsgrad, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, at::Device device,
                                 const std::optional<at::Tensor>& lr_tensor = std::nullopt) {
  constexpr const char* kOp = "adam_step_";
  const size_t n = params.size();
  check_list_length(kOp, "grads", grads, n);
  check_list_length(kOp, "exp_avgs", exp_avgs, n);
  check_list_length(kOp, "exp_avg_sqs", exp_avg_sqs, n);
  check_list_length(kOp, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  check_list_length(kOp, "steps", steps, n);
  check_scale_inf_lr(kOp, grad_scale, found_inf, lr_tensor, device);
  for (size_t i = 0; i < n; ++i) {
    check_param(kOp, params, i, device);
    check_like_param(kOp, "grads", grads, i, params[i]);
    check_like_param(kOp, "exp_avgs", exp_avgs, i, params[i]);
    check_like_param(kOp, "exp_avg_sqs", exp_avg_sqs, i, params[i]);
    if (amsgrad) check_like_param(kOp, "max_exp_avg_sqs", max_exp_avg_sqs, i, params[i]);
    check_scalar_tensor(kOp, "steps", steps[i], device, static_cast<int64_t>(i));
  }
}

// Everything sgd_step_ takes, on `device`.
inline void check_sgd_step_args(at::TensorList params, at::TensorList grads,
                                at::TensorList momentum_buffers, bool has_momentum,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, at::Device device,
                                const std::optional<at::Tensor>& lr_tensor = std::nullopt) {
  constexpr const char* kOp = "sgd_step_";
  const size_t n = params.size();
  check_list_length(kOp, "grads", grads, n);
  check_list_length(kOp, "momentum_buffers", momentum_buffers, has_momentum ? n : 0);
  check_scale_inf_lr(kOp, grad_scale, found_inf, lr_tensor, device);
  for (size_t i = 0; i < n; ++i) {
    check_param(kOp, params, i, device);
    check_like_param(kOp, "grads", grads, i, params[i]);
    if (has_momentum) check_like_param(kOp, "momentum_buffers", momentum_buffers, i, params[i]);
  }
}

}  // namespace fusedtrain
