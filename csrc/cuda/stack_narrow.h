// The one-launch CUDA train step of a narrow layer stack (csrc/cuda/stack_narrow_cuda.cu): every
// width <= kMaxNarrowWidth, forward, loss, backward and the optimizer update of all params in a
// single kernel launch. csrc/cuda/stack_cuda.cu (the stack ops' CUDA kernels) checks the call
// (check_stack_tensors and the optimizer state) and picks this path when narrow_stack_supported
// says it takes the stack.
#pragma once

#include <ATen/core/Tensor.h>

#include "../optimizer_hyper.h"
#include "../stack_spec.h"

namespace fusedtrain {
namespace cuda {

constexpr int64_t kMaxNarrowWidth = 128;

// Whether the one-launch kernel takes this (already checked) call on this device: every layer's
// in and out <= kMaxNarrowWidth, and its shared-memory and co-residency needs are met.
bool narrow_stack_supported(const StackSpec& spec, at::TensorList params, const at::Tensor& x);

// One train step, in place; returns the loss before the update (0-dim, x's dtype, on x's device).
// The arguments are those of stack_adam_step_ / stack_sgd_step_, already checked.
at::Tensor narrow_stack_adam_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                  const StackSpec& spec, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& hyper);
at::Tensor narrow_stack_sgd_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                 const StackSpec& spec, at::TensorList momentum_buffers, const SgdHyper& hyper);

}  // namespace cuda
}  // namespace fusedtrain
