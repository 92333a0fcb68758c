// adam_step_hyper_tensor_ and sgd_step_hyper_tensor_ (schemas in ops.cpp): the optimizer ops as
// torch.compile calls them, with the float hyperparameters in one tensor. They read it on the host
// and call adam_step_ / sgd_step_ through the dispatcher, so every device's kernel serves them.
#include <array>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace fusedtrain {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

template <size_t N>
std::array<double, N> read_hyper(const char* op, const at::Tensor& hyper) {
  TORCH_CHECK_VALUE(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble &&
                        hyper.numel() == static_cast<int64_t>(N),
                    op, ": hyper must be a float64 CPU tensor of ", N, " elements, got ",
                    hyper.scalar_type(), " on ", hyper.device(), " of shape ", hyper.sizes());
  const at::Tensor values = hyper.contiguous();
  std::array<double, N> read{};
  std::copy_n(values.data_ptr<double>(), N, read.begin());
  return read;
}

void adam_step_hyper_tensor(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            at::TensorList steps, const at::Tensor& hyper, bool decoupled,
                            bool amsgrad, bool maximize, const OptionalTensor& grad_scale,
                            const OptionalTensor& found_inf, const OptionalTensor& lr_tensor) {
  static const auto adam_step =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedtrain::adam_step_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, at::TensorList, double, double, double, double, double,
                      bool, bool, bool, const OptionalTensor&, const OptionalTensor&,
                      const OptionalTensor&)>();
  const auto [lr, beta1, beta2, eps, weight_decay] =
      read_hyper<5>("adam_step_hyper_tensor_", hyper);
  adam_step.call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
                 eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf,
                 lr_tensor);
}

void sgd_step_hyper_tensor(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers, const at::Tensor& hyper,
                           bool nesterov, bool maximize, bool first_step,
                           const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                           const OptionalTensor& lr_tensor) {
  static const auto sgd_step =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedtrain::sgd_step_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, double, double, double,
                      double, bool, bool, bool, const OptionalTensor&, const OptionalTensor&,
                      const OptionalTensor&)>();
  const auto [lr, momentum, dampening, weight_decay] =
      read_hyper<4>("sgd_step_hyper_tensor_", hyper);
  sgd_step.call(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                maximize, first_step, grad_scale, found_inf, lr_tensor);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CompositeExplicitAutograd, m) {
  m.impl("adam_step_hyper_tensor_", &adam_step_hyper_tensor);
  m.impl("sgd_step_hyper_tensor_", &sgd_step_hyper_tensor);
}

}  // namespace fusedtrain
