// The forward and backward of a layer stack on CUDA as per-layer GEMMs with the elementwise work
// fused around them (stack_gemm_cuda.cu): the stacks too wide for the one-launch narrow kernel,
// and stack_fwd_bwd of every stack but one nn.Linear under MSE.
#pragma once

#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include "../stack_spec.h"

namespace fusedtrain {
namespace cuda {

// (loss, the gradient of every param in params' order; none unless need_grads). The loss is a
// 0-dim tensor of x's dtype on x's device, never read on the host. The caller has checked the
// call (check_stack_tensors) and made x's device current.
std::tuple<at::Tensor, std::vector<at::Tensor>> gemm_stack_fwd_bwd(const at::Tensor& x, const at::Tensor& target,
                                                                   at::TensorList params, const StackSpec& spec,
                                                                   bool need_grads);

}  // namespace cuda
}  // namespace fusedtrain
