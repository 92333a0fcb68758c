// CUDA kernels of the layer-stack ops (schemas: csrc/ops.cpp; the CPU's: csrc/cpu/stack_cpu.cpp).
// Every call is checked first, with the CPU's named errors, before anything runs. Then the kernel
// choice:
//   * one nn.Linear under MSELoss (depth 1, no activation): the linear + MSE kernels
//     (linear_mse_cuda.h), the train step in ONE cooperative launch for out <= 16, else their
//     forward/backward followed by the optimizer kernels;
//   * the train step of a narrow stack (every width <= 128): ONE launch (stack_narrow.h);
//   * everything else: per-layer GEMMs with the elementwise work fused around them
//     (stack_gemm_cuda.h), then the multi-tensor optimizer kernels (optim_cuda.h) on all params.
// The one-launch train steps take the learning rate as a float; a tensor lr (read by the kernels,
// so that a captured CUDA graph follows it) goes to the paths that end in the optimizer kernels.
// No path reads a device value on the host (cross entropy's classes are checked by its loss
// kernel, as torch's nll_loss does on the GPU), so a train step can be captured in a CUDA graph.
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../multi_tensor_checks.h"
#include "../optimizer_hyper.h"
#include "../stack_spec.h"
#include "linear_mse_cuda.h"
#include "optim_cuda.h"
#include "stack_gemm_cuda.h"
#include "stack_narrow.h"
#include "stack_state_checks.h"

namespace fusedtrain {
namespace cuda {
namespace {

void check_call(const char* op, const StackSpec& spec, const at::Tensor& x, const at::Tensor& target,
                at::TensorList params) {
  check_stack_tensors(op, spec, x, target, params);
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": this is the CUDA kernel, x is on ", x.device());
}

void check_lr_tensor(const char* op, const std::optional<at::Tensor>& lr_tensor, const at::Tensor& x) {
  if (lr_tensor.has_value()) check_scalar_tensor(op, "lr_tensor", *lr_tensor, x.device());
}

// One nn.Linear under MSE: params are its weight and, if it has one, its bias.
bool is_linear_mse(const StackSpec& spec) {
  return spec.layers() == 1 && spec.activations[0] == math::Activation::kIdentity &&
         spec.loss == math::Loss::kMse;
}

// The forward and backward by the linear + MSE kernels or the GEMM path.
std::tuple<at::Tensor, std::vector<at::Tensor>> fwd_bwd(const at::Tensor& x, const at::Tensor& target,
                                                        at::TensorList params, const StackSpec& spec,
                                                        bool need_grads) {
  if (!is_linear_mse(spec)) return gemm_stack_fwd_bwd(x, target, params, spec, need_grads);
  const bool has_bias = params.size() > 1;
  auto [loss, grad_weight, grad_bias, grad_x] = linear_mse_fwd_bwd_cuda(
      x, params[0], has_bias ? std::optional<at::Tensor>(params[1]) : std::nullopt, target, spec.reduction,
      false, need_grads);
  std::vector<at::Tensor> grads;
  if (need_grads) grads.push_back(grad_weight);
  if (need_grads && has_bias) grads.push_back(grad_bias);
  return {loss, grads};
}

// The one-launch train steps: nullopt where neither takes the call.
std::optional<at::Tensor> one_launch_adam_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                               const StackSpec& spec, at::TensorList exp_avgs,
                                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                               at::TensorList steps, const AdamHyper& hyper) {
  if (is_linear_mse(spec)) {
    if (!linear_mse_fused_step_available(params[0].size(0))) return std::nullopt;
    return linear_mse_fused_adam_step(x, target, params, spec.reduction, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                      steps, hyper);
  }
  if (!narrow_stack_supported(spec, params, x)) return std::nullopt;
  return narrow_stack_adam_step(x.contiguous(), target.contiguous(), params, spec, exp_avgs, exp_avg_sqs,
                                max_exp_avg_sqs, steps, hyper);
}

std::optional<at::Tensor> one_launch_sgd_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                              const StackSpec& spec, at::TensorList momentum_buffers,
                                              const SgdHyper& hyper) {
  if (is_linear_mse(spec)) {
    if (!linear_mse_fused_step_available(params[0].size(0))) return std::nullopt;
    return linear_mse_fused_sgd_step(x, target, params, spec.reduction, momentum_buffers, hyper);
  }
  if (!narrow_stack_supported(spec, params, x)) return std::nullopt;
  return narrow_stack_sgd_step(x.contiguous(), target.contiguous(), params, spec, momentum_buffers, hyper);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> stack_fwd_bwd_cuda(const at::Tensor& x, const at::Tensor& target,
                                                                   at::TensorList params, const StackSpec& spec,
                                                                   bool need_grads) {
  check_call("stack_fwd_bwd", spec, x, target, params);
  const c10::DeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;
  return fwd_bwd(x, target, params, spec, need_grads);
}

at::Tensor stack_adam_step_cuda(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                const StackSpec& spec, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& hyper,
                                const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "stack_adam_step_";
  check_call(kOp, spec, x, target, params);
  check_adam_state(kOp, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper.amsgrad);
  check_lr_tensor(kOp, lr_tensor, x);
  const c10::DeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;
  if (!lr_tensor.has_value()) {
    std::optional<at::Tensor> loss =
        one_launch_adam_step(x, target, params, spec, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper);
    if (loss.has_value()) return *loss;
  }
  auto [loss, grads] = fwd_bwd(x, target, params, spec, true);
  adam_step_cuda(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper.lr, hyper.beta1, hyper.beta2,
                 hyper.eps, hyper.weight_decay, hyper.decoupled, hyper.amsgrad, hyper.maximize, std::nullopt,
                 std::nullopt, lr_tensor);
  return loss;
}

at::Tensor stack_sgd_step_cuda(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                               const StackSpec& spec, at::TensorList momentum_buffers, const SgdHyper& hyper,
                               const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "stack_sgd_step_";
  check_call(kOp, spec, x, target, params);
  check_sgd_state(kOp, params, momentum_buffers, hyper.momentum != 0.0);
  check_lr_tensor(kOp, lr_tensor, x);
  const c10::DeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;
  if (!lr_tensor.has_value()) {
    std::optional<at::Tensor> loss = one_launch_sgd_step(x, target, params, spec, momentum_buffers, hyper);
    if (loss.has_value()) return *loss;
  }
  auto [loss, grads] = fwd_bwd(x, target, params, spec, true);
  sgd_step_cuda(params, grads, momentum_buffers, hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay,
                hyper.nesterov, hyper.maximize, hyper.first_step, std::nullopt, std::nullopt, lr_tensor);
  return loss;
}

// The ops' CUDA kernels: the schema's arguments into StackSpec and the optimizer's hyperparameters
// (as stack_cpu.cpp's).
std::vector<bool> bools(const c10::List<bool>& list) { return std::vector<bool>(list.begin(), list.end()); }

std::tuple<at::Tensor, std::vector<at::Tensor>> stack_fwd_bwd_op(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, const c10::List<bool>& has_bias,
    at::IntArrayRef layer_params, at::IntArrayRef activations, c10::ArrayRef<double> activation_params, int64_t loss,
    int64_t reduction, double loss_param, int64_t ignore_index, double label_smoothing, bool need_grads) {
  return stack_fwd_bwd_cuda(x, target, params,
                            make_stack_spec("stack_fwd_bwd", bools(has_bias), layer_params, activations,
                                            activation_params, loss, reduction, loss_param, ignore_index,
                                            label_smoothing),
                            need_grads);
}

at::Tensor stack_adam_step_op(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, const c10::List<bool>& has_bias,
    at::IntArrayRef layer_params, at::IntArrayRef activations, c10::ArrayRef<double> activation_params, int64_t loss,
    int64_t reduction, double loss_param, int64_t ignore_index, double label_smoothing, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps, double lr, double beta1,
    double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
    const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "stack_adam_step_";
  return stack_adam_step_cuda(
      x, target, params,
      make_stack_spec(kOp, bools(has_bias), layer_params, activations, activation_params, loss, reduction,
                      loss_param, ignore_index, label_smoothing),
      exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
      AdamHyper{lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize}, lr_tensor);
}

at::Tensor stack_sgd_step_op(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, const c10::List<bool>& has_bias,
    at::IntArrayRef layer_params, at::IntArrayRef activations, c10::ArrayRef<double> activation_params, int64_t loss,
    int64_t reduction, double loss_param, int64_t ignore_index, double label_smoothing,
    at::TensorList momentum_buffers, double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize, bool first_step, const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "stack_sgd_step_";
  return stack_sgd_step_cuda(
      x, target, params,
      make_stack_spec(kOp, bools(has_bias), layer_params, activations, activation_params, loss, reduction,
                      loss_param, ignore_index, label_smoothing),
      momentum_buffers, SgdHyper{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step},
      lr_tensor);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("stack_fwd_bwd", &stack_fwd_bwd_op);
  m.impl("stack_adam_step_", &stack_adam_step_op);
  m.impl("stack_sgd_step_", &stack_sgd_step_op);
}

}  // namespace cuda
}  // namespace fusedtrain
