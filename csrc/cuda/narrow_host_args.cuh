// The host side that the narrow step (stack_narrow_cuda.cu) and the one-launch fit
// (stack_fit_cuda.cu) share, both running stack_narrow_kernel.cuh's tiles and updates: the
// kernels' fixed limits, a stack's shape, the stack's part of the kernels' arguments, and their
// Adam and SGD updates from the optimizer's tensors and hyperparameters.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "../optimizer_hyper.h"
#include "../stack_spec.h"
#include "stack_narrow.h"
#include "stack_narrow_kernel.cuh"
#include "stack_narrow_layout.h"

namespace fusedtrain {
namespace cuda {
namespace narrow {

// Whether a kernel taking Args<T> and an Adam or SGD update by value fits the classic 4 KB kernel
// parameter space, for T = double, the larger.
template <template <typename> class Args>
constexpr bool fits_kernel_parameter_space() {
  return sizeof(Args<double>) + sizeof(NarrowAdam<double>) <= 4096 &&
         sizeof(Args<double>) + sizeof(NarrowSgd<double>) <= 4096;
}

// Whether the stack is within the kernels' fixed limits: at most kMaxNarrowLayers layers and
// kMaxNarrowParams params, every width <= kMaxNarrowWidth.
inline bool within_narrow_limits(const StackSpec& spec, at::TensorList params, const at::Tensor& x) {
  if (spec.layers() > static_cast<size_t>(kMaxNarrowLayers) || params.size() > static_cast<size_t>(kMaxNarrowParams)) {
    return false;
  }
  if (x.size(1) > kMaxNarrowWidth) return false;
  for (size_t l = 0; l < spec.layers(); ++l) {
    if (params[static_cast<size_t>(spec.layer_params[l])].size(0) > kMaxNarrowWidth) return false;
  }
  return true;
}

// The stack's widths (in_0, out_0, ..., out_L-1) and which layers keep an output apart from z.
inline std::pair<std::vector<int64_t>, std::vector<bool>> stack_shape(const StackSpec& spec, at::TensorList params,
                                                                      const at::Tensor& x) {
  std::vector<int64_t> widths{x.size(1)};
  std::vector<bool> keeps_output;
  for (size_t l = 0; l < spec.layers(); ++l) {
    widths.push_back(params[static_cast<size_t>(spec.layer_params[l])].size(0));
    keeps_output.push_back(spec.activations[l] != Activation::kIdentity);
  }
  return {widths, keeps_output};
}

// The stack's layers, param table and loss head into `a`.
template <typename T>
void set_stack_args(NarrowArgs<T>& a, const StackSpec& spec, at::TensorList params) {
  for (size_t l = 0; l < spec.layers(); ++l) {
    a.layer[l] = NarrowLayer<T>{static_cast<int>(spec.layer_params[l]), static_cast<bool>(spec.has_bias[l]),
                                spec.activations[l], static_cast<T>(spec.activation_params[l])};
  }
  a.params.count = static_cast<int>(params.size());
  a.params.offset[0] = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    a.params.data[i] = params[i].data_ptr<T>();
    a.params.offset[i + 1] = a.params.offset[i] + params[i].numel();
  }
  a.loss = spec.loss;
  a.loss_param = static_cast<T>(spec.loss_param);
  a.ignore_index = spec.ignore_index;
  a.label_smoothing = static_cast<T>(spec.label_smoothing);
}

template <typename T>
NarrowAdam<T> adam_update(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                          at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& hyper) {
  NarrowAdam<T> update{};
  for (size_t i = 0; i < params.size() && i < static_cast<size_t>(kMaxNarrowParams); ++i) {
    update.exp_avg[i] = exp_avgs[i].data_ptr<T>();
    update.exp_avg_sq[i] = exp_avg_sqs[i].data_ptr<T>();
    update.max_exp_avg_sq[i] = hyper.amsgrad ? max_exp_avg_sqs[i].data_ptr<T>() : nullptr;
    update.step[i] = steps[i].data_ptr<float>();
  }
  update.h = hyper;
  return update;
}

template <typename T>
NarrowSgd<T> sgd_update(at::TensorList params, at::TensorList momentum_buffers, const SgdHyper& hyper) {
  NarrowSgd<T> update{};
  const bool momentum = hyper.momentum != 0.0;
  for (size_t i = 0; momentum && i < params.size() && i < static_cast<size_t>(kMaxNarrowParams); ++i) {
    update.momentum_buffer[i] = momentum_buffers[i].data_ptr<T>();
  }
  update.c = math::make_sgd_coeffs<T>(hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay, hyper.maximize);
  update.decay = hyper.weight_decay != 0.0;
  update.momentum = momentum;
  update.first_step = hyper.first_step;
  update.nesterov = hyper.nesterov;
  return update;
}

}  // namespace narrow
}  // namespace cuda
}  // namespace fusedtrain
