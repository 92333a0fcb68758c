// The checks of the optimizer state that the CUDA layer-stack kernels (stack_cuda.cu,
// stack_fit_cuda.cu) address by raw pointer beside the params: named errors, raised before
// anything runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../multi_tensor_checks.h"

namespace fusedtrain {
namespace cuda {

// A state tensor that the kernels address by raw pointer beside its param (as on the CPU).
inline void check_contiguous_state(const char* op, at::TensorList state) {
  for (const at::Tensor& s : state) {
    TORCH_CHECK_VALUE(s.numel() <= 1 || s.is_contiguous(), op, ": optimizer state must be contiguous");
  }
}

// Adam's state, one entry per param; the kernels read and increment the step counts on the
// device, as float32 (optim_cuda.cu).
inline void check_adam_state(const char* op, at::TensorList params, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                             bool amsgrad) {
  const size_t n = params.size();
  check_list_length(op, "exp_avgs", exp_avgs, n);
  check_list_length(op, "exp_avg_sqs", exp_avg_sqs, n);
  check_list_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  check_list_length(op, "steps", steps, n);
  for (size_t i = 0; i < n; ++i) {
    check_like_param(op, "exp_avgs", exp_avgs, i, params[i]);
    check_like_param(op, "exp_avg_sqs", exp_avg_sqs, i, params[i]);
    if (amsgrad) check_like_param(op, "max_exp_avg_sqs", max_exp_avg_sqs, i, params[i]);
    check_scalar_tensor(op, "steps", steps[i], params[i].device(), static_cast<int64_t>(i));
    TORCH_CHECK_TYPE(steps[i].scalar_type() == at::kFloat, op, ": steps[", i, "] must be float32 on CUDA, got ",
                     steps[i].scalar_type());
  }
  check_contiguous_state(op, exp_avgs);
  check_contiguous_state(op, exp_avg_sqs);
  check_contiguous_state(op, max_exp_avg_sqs);
}

inline void check_sgd_state(const char* op, at::TensorList params, at::TensorList momentum_buffers, bool momentum) {
  const size_t n = params.size();
  check_list_length(op, "momentum_buffers", momentum_buffers, momentum ? n : 0);
  for (size_t i = 0; momentum && i < n; ++i) check_like_param(op, "momentum_buffers", momentum_buffers, i, params[i]);
  check_contiguous_state(op, momentum_buffers);
}

}  // namespace cuda
}  // namespace fusedtrain
