// The optimizer update inside a fused training step or loop: the params are updated in place
// from gradients held in plain buffers, by the active instruction set's Adam or SGD element loops
// over the multi-tensor launcher's chunks, the same code that adam_step_ and sgd_step_ run. Built
// once per call (checks, pointers), then step() per optimizer step.
#pragma once

#include <cmath>
#include <vector>

#include <ATen/core/Tensor.h>

#include "../multi_tensor_checks.h"
#include "../optimizer_hyper.h"
#include "cpu_isa.h"
#include "multi_tensor.h"

namespace fusedtrain {
namespace cpu {

// run(t, begin, end) over every element of every param: small params (a tutorial MLP's, stepped
// thousands of times in a loop) one after another, with no chunk table to build; large ones in
// the multi-tensor launcher's one parallel region over all of them.
template <typename Run>
void for_each_param_range(const std::vector<int64_t>& numels, const Run& run) {
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  if (total >= kMinParallelElements) {
    for_each_chunk(numels, run);
    return;
  }
  for (size_t t = 0; t < numels.size(); ++t) run(static_cast<int64_t>(t), 0, numels[t]);
}

// A state tensor that the loops address by raw pointer beside its param.
inline void check_contiguous_state(const char* op, at::TensorList params, at::TensorList state) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].is_contiguous(), op, ": params[", i, "] must be contiguous: it is updated in place");
  }
  for (const at::Tensor& s : state) {
    TORCH_CHECK_VALUE(s.numel() <= 1 || s.is_contiguous(), op, ": optimizer state must be contiguous");
  }
}

class AdamUpdater {
 public:
  AdamUpdater(const char* op, at::TensorList params, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
              const AdamHyper& h)
      : h_(h), steps_(steps.vec()) {
    const size_t n = params.size();
    check_list_length(op, "exp_avgs", exp_avgs, n);
    check_list_length(op, "exp_avg_sqs", exp_avg_sqs, n);
    check_list_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, h.amsgrad ? n : 0);
    check_list_length(op, "steps", steps, n);
    for (size_t i = 0; i < n; ++i) {
      check_like_param(op, "exp_avgs", exp_avgs, i, params[i]);
      check_like_param(op, "exp_avg_sqs", exp_avg_sqs, i, params[i]);
      if (h.amsgrad) check_like_param(op, "max_exp_avg_sqs", max_exp_avg_sqs, i, params[i]);
      check_scalar_tensor(op, "steps", steps[i], at::kCPU, static_cast<int64_t>(i));
    }
    check_contiguous_state(op, params, exp_avgs);
    check_contiguous_state(op, params, exp_avg_sqs);
    check_contiguous_state(op, params, max_exp_avg_sqs);
    for (size_t i = 0; i < n; ++i) {
      tensors_.push_back(AdamTensor{storage_of(params[i].scalar_type()), params[i].data_ptr(), nullptr,
                                    exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                                    h.amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, {}, {}});
      numels_.push_back(params[i].numel());
    }
  }

  // One Adam step of every param, grads[i] holding params[i]'s gradient (param's dtype).
  void step(const std::vector<void*>& grads) {
    const IsaKernels& kernels = active_kernels();
    const AdamOptions options{h_.amsgrad, h_.weight_decay != 0.0 && !h_.decoupled, false, 1.0};
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const double t = read_scalar(steps_[i]) + 1.0;
      write_scalar(steps_[i], t);
      if (t != coeffs_step_) {  // params usually share a step count: fold it once
        // A loop of tiny steps spends much of its time in pow(): from one step to the next,
        // one multiplication gives beta^t to within a few ulps of a double.
        if (t == coeffs_step_ + 1.0) {
          beta1_pow_ *= h_.beta1;
          beta2_pow_ *= h_.beta2;
        } else {
          beta1_pow_ = std::pow(h_.beta1, t);
          beta2_pow_ = std::pow(h_.beta2, t);
        }
        coeffs_step_ = t;
        coeffs_f32_ = math::make_adam_coeffs_from_powers<float>(
            h_.lr, h_.beta1, h_.beta2, h_.eps, h_.weight_decay, h_.decoupled, h_.maximize, beta1_pow_, beta2_pow_);
        coeffs_f64_ = math::make_adam_coeffs_from_powers<double>(
            h_.lr, h_.beta1, h_.beta2, h_.eps, h_.weight_decay, h_.decoupled, h_.maximize, beta1_pow_, beta2_pow_);
      }
      AdamTensor& tensor = tensors_[i];
      tensor.grad = grads[i];
      tensor.coeffs_f32 = coeffs_f32_;
      tensor.coeffs_f64 = coeffs_f64_;
    }
    for_each_param_range(numels_, [&](int64_t t, int64_t begin, int64_t end) {
      kernels.adam(options, tensors_[t], begin, end);
    });
  }

 private:
  AdamHyper h_;
  std::vector<at::Tensor> steps_;
  std::vector<AdamTensor> tensors_;
  std::vector<int64_t> numels_;
  double coeffs_step_ = -2.0;  // the step count the coefficients were folded for
  double beta1_pow_ = 1.0;
  double beta2_pow_ = 1.0;
  math::AdamCoeffs<float> coeffs_f32_{};
  math::AdamCoeffs<double> coeffs_f64_{};
};

class SgdUpdater {
 public:
  SgdUpdater(const char* op, at::TensorList params, at::TensorList momentum_buffers, const SgdHyper& h)
      : h_(h) {
    const size_t n = params.size();
    const bool momentum = h.momentum != 0.0;
    check_list_length(op, "momentum_buffers", momentum_buffers, momentum ? n : 0);
    for (size_t i = 0; momentum && i < n; ++i) {
      check_like_param(op, "momentum_buffers", momentum_buffers, i, params[i]);
    }
    check_contiguous_state(op, params, momentum_buffers);
    for (size_t i = 0; i < n; ++i) {
      tensors_.push_back(SgdTensor{storage_of(params[i].scalar_type()), params[i].data_ptr(), nullptr,
                                   momentum ? momentum_buffers[i].data_ptr() : nullptr});
      numels_.push_back(params[i].numel());
    }
  }

  // One SGD step of every param, grads[i] holding params[i]'s gradient (param's dtype).
  void step(const std::vector<void*>& grads) {
    const SgdOptions options{h_.weight_decay != 0.0, h_.momentum != 0.0, h_.first_step, h_.nesterov,
                             false, 1.0,
                             math::make_sgd_coeffs<float>(h_.lr, h_.momentum, h_.dampening,
                                                          h_.weight_decay, h_.maximize),
                             math::make_sgd_coeffs<double>(h_.lr, h_.momentum, h_.dampening,
                                                           h_.weight_decay, h_.maximize)};
    const IsaKernels& kernels = active_kernels();
    for (size_t i = 0; i < tensors_.size(); ++i) tensors_[i].grad = grads[i];
    for_each_param_range(numels_, [&](int64_t t, int64_t begin, int64_t end) {
      kernels.sgd(options, tensors_[t], begin, end);
    });
    h_.first_step = false;  // the buffers exist from now on
  }

 private:
  SgdHyper h_;
  std::vector<SgdTensor> tensors_;
  std::vector<int64_t> numels_;
};

}  // namespace cpu
}  // namespace fusedtrain
