// CPU implementations of fusedtrain::adam_step_ and fusedtrain::sgd_step_: check every argument,
// prepare per-tensor pointers and coefficients, then run the active instruction set's element
// loops over all tensors in one parallel region.
#include "optim_cpu.h"

#include <torch/library.h>

#include "../multi_tensor_checks.h"
#include "cpu_isa.h"
#include "multi_tensor.h"

namespace fusedtrain {
namespace cpu {
namespace {

bool step_skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && read_scalar(*found_inf) != 0.0;
}

double grad_scale_value(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() ? read_scalar(*grad_scale) : 1.0;
}

// A tensor learning rate replaces the float one (on the CPU reading it costs nothing).
double lr_value(double lr, const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() ? read_scalar(*lr_tensor) : lr;
}

}  // namespace

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  check_adam_step_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad,
                       grad_scale, found_inf, at::kCPU, lr_tensor);
  if (n == 0 || step_skipped(found_inf)) return;
  lr = lr_value(lr, lr_tensor);

  const AdamOptions options{amsgrad, weight_decay != 0.0 && !decoupled, grad_scale.has_value(),
                            grad_scale_value(grad_scale)};
  std::vector<ParamTensors<5>> staged;
  std::vector<AdamTensor> tensors;
  std::vector<int64_t> numels;
  staged.reserve(n);
  tensors.reserve(n);
  numels.reserve(n);
  AdamTensor coeffs_of_last_step{};  // params usually share a step count: fold it once
  double last_step = -1.0;
  for (size_t i = 0; i < n; ++i) {
    if (amsgrad) {
      staged.emplace_back(std::initializer_list<const at::Tensor*>{
          &params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i], &max_exp_avg_sqs[i]});
    } else {
      staged.emplace_back(std::initializer_list<const at::Tensor*>{
          &params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]});
    }
    const double step = read_scalar(steps[i]) + 1.0;
    write_scalar(steps[i], step);
    if (step != last_step) {
      last_step = step;
      coeffs_of_last_step.coeffs_f32 = math::make_adam_coeffs<float>(
          lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step);
      coeffs_of_last_step.coeffs_f64 = math::make_adam_coeffs<double>(
          lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step);
    }
    const ParamTensors<5>& s = staged.back();
    AdamTensor t = coeffs_of_last_step;
    t.storage = storage_of(params[i].scalar_type());
    t.param = s.data(0);
    t.grad = s.data(1);
    t.exp_avg = s.data(2);
    t.exp_avg_sq = s.data(3);
    t.max_exp_avg_sq = amsgrad ? s.data(4) : nullptr;
    tensors.push_back(t);
    numels.push_back(params[i].numel());
  }

  const AdamRangeFn adam_range = active_kernels().adam;
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t end) {
    adam_range(options, tensors[t], begin, end);
  });

  // param, grad (written only when unscaled), exp_avg, exp_avg_sq, max_exp_avg_sq
  const std::array<bool, 5> mutated{true, options.has_grad_scale, true, true, true};
  for (const ParamTensors<5>& s : staged) s.finish(mutated);
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  double lr, double momentum, double dampening, double weight_decay,
                  bool nesterov, bool maximize, bool first_step,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  const bool has_momentum = momentum != 0.0;
  check_sgd_step_args(params, grads, momentum_buffers, has_momentum, grad_scale, found_inf,
                      at::kCPU, lr_tensor);
  if (n == 0 || step_skipped(found_inf)) return;
  lr = lr_value(lr, lr_tensor);

  const SgdOptions options{weight_decay != 0.0,
                           has_momentum,
                           first_step,
                           nesterov,
                           grad_scale.has_value(),
                           grad_scale_value(grad_scale),
                           math::make_sgd_coeffs<float>(lr, momentum, dampening, weight_decay,
                                                        maximize),
                           math::make_sgd_coeffs<double>(lr, momentum, dampening, weight_decay,
                                                         maximize)};
  std::vector<ParamTensors<3>> staged;
  std::vector<SgdTensor> tensors;
  std::vector<int64_t> numels;
  staged.reserve(n);
  tensors.reserve(n);
  numels.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (has_momentum) {
      staged.emplace_back(
          std::initializer_list<const at::Tensor*>{&params[i], &grads[i], &momentum_buffers[i]});
    } else {
      staged.emplace_back(std::initializer_list<const at::Tensor*>{&params[i], &grads[i]});
    }
    const ParamTensors<3>& s = staged.back();
    tensors.push_back(SgdTensor{storage_of(params[i].scalar_type()), s.data(0), s.data(1),
                                has_momentum ? s.data(2) : nullptr});
    numels.push_back(params[i].numel());
  }

  const SgdRangeFn sgd_range = active_kernels().sgd;
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t end) {
    sgd_range(options, tensors[t], begin, end);
  });

  // param, grad (written only when unscaled), momentum_buffer
  const std::array<bool, 3> mutated{true, options.has_grad_scale, true};
  for (const ParamTensors<3>& s : staged) s.finish(mutated);
}

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("sgd_step_", &sgd_step_cpu);
}

}  // namespace cpu
}  // namespace fusedtrain
