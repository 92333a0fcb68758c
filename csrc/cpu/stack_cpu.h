// CPU kernels of the layer-stack ops (schemas in csrc/ops.cpp): the forward and backward of a
// stack in one call, its training step with the Adam or SGD update, and the native training loop
// of fusedtrain.fit over a stack.
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include "../fit_data.h"
#include "../stack_spec.h"
#include "param_update.h"

namespace fusedtrain {
namespace cpu {

// (loss, gradients of params in their order; none unless need_grads).
std::tuple<at::Tensor, std::vector<at::Tensor>> stack_fwd_bwd_cpu(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, const StackSpec& spec,
    bool need_grads);

// One step: forward, loss, backward and the update of params (and their state) in place; returns
// the loss before the update.
at::Tensor stack_adam_step_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                               const StackSpec& spec, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList steps, const AdamHyper& hyper);
at::Tensor stack_sgd_step_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                              const StackSpec& spec, at::TensorList momentum_buffers,
                              const SgdHyper& hyper);

// Trains params in place; returns (per-epoch mean batch loss, per-epoch validation loss or an
// empty tensor), in x's dtype.
std::tuple<at::Tensor, at::Tensor> stack_fit_adam_cpu(const FitData& data, at::TensorList params,
                                                      const StackSpec& spec, at::TensorList exp_avgs,
                                                      at::TensorList exp_avg_sqs,
                                                      at::TensorList max_exp_avg_sqs,
                                                      at::TensorList steps, const AdamHyper& hyper);
std::tuple<at::Tensor, at::Tensor> stack_fit_sgd_cpu(const FitData& data, at::TensorList params,
                                                     const StackSpec& spec,
                                                     at::TensorList momentum_buffers,
                                                     const SgdHyper& hyper);

// The train steps of one stack, keeping their gradient buffers and workspace from one call to the
// next (FusedTrainStep): a wide stack's gradients are as large as its weights, and allocating them
// anew at every step costs a page fault per 4 KiB. Each call checks its arguments as the ops do,
// and builds the buffers again when the params' memory or dtype has changed. One call at a time.
class StackTrainer {
 public:
  explicit StackTrainer(StackSpec spec);
  ~StackTrainer();
  at::Tensor adam_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                       at::TensorList steps, const AdamHyper& hyper);
  at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                      at::TensorList momentum_buffers, const SgdHyper& hyper);

 private:
  struct Kept;
  template <typename Updater>
  at::Tensor step(const at::Tensor& x, const at::Tensor& target, at::TensorList params, Updater& updater);

  StackSpec spec_;
  std::unique_ptr<Kept> kept_;
  std::mutex mutex_;
};

}  // namespace cpu
}  // namespace fusedtrain
