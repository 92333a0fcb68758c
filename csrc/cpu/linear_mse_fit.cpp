// The CPU kernel of fusedtrain::linear_mse_train_step_ (see linear_mse_fit.h): the op's arguments
// as the depth-1 MSE stack and the typed state lists of the stack train steps, which run it.
#include "linear_mse_fit.h"

#include <torch/library.h>

#include "../linear_mse_checks.h"
#include "stack_cpu.h"

namespace fusedtrain {
namespace cpu {
namespace {

constexpr const char* kOp = "linear_mse_train_step_";

at::Tensor linear_mse_train_step_cpu(const at::Tensor& x, const at::Tensor& target,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t reduction,
                                     at::TensorList state, bool adam, double lr,
                                     double weight_decay, bool maximize, double beta1,
                                     double beta2, double eps, bool decoupled, bool amsgrad,
                                     double momentum, double dampening, bool nesterov,
                                     bool first_step) {
  check_linear_mse_inputs(kOp, x, weight, bias, target, reduction);
  const std::vector<at::Tensor> params = bias.has_value() ? std::vector<at::Tensor>{weight, *bias}
                                                          : std::vector<at::Tensor>{weight};
  const size_t n = params.size();
  const StackSpec spec = make_stack_spec(kOp, {bias.has_value()}, {0}, {static_cast<int64_t>(math::Activation::kIdentity)},
                                         {0.0}, static_cast<int64_t>(math::Loss::kMse), reduction, 0.0, -100, 0.0);
  if (adam) {
    check_list_length(kOp, "state", state, (amsgrad ? 4 : 3) * n);
    return stack_adam_step_cpu(x, target, params, spec, state.slice(0, n), state.slice(n, n),
                               amsgrad ? state.slice(2 * n, n) : at::TensorList{},
                               state.slice((amsgrad ? 3 : 2) * n, n),
                               AdamHyper{lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize});
  }
  check_list_length(kOp, "state", state, momentum != 0.0 ? n : 0);
  return stack_sgd_step_cpu(x, target, params, spec, state,
                            SgdHyper{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step});
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("linear_mse_train_step_", &linear_mse_train_step_cpu);
}

}  // namespace cpu
}  // namespace fusedtrain
