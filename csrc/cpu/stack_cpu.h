// CPU kernels of the layer-stack ops (schemas in csrc/ops.cpp): the forward and backward of a
// stack in one call, its training step with the Adam or SGD update, and the native training loop
// of fusedtrain.fit over a stack.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

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

// The rows of one fit: x (N, in) and target, in batches of batch_size rows (0: the whole set).
// Each epoch takes the rows in the order orders[epoch] ((epochs, M) int64, M <= N: a DataLoader's
// drop_last leaves rows out), else in a new torch.randperm(N, generator), else in order 0..N-1.
// An optional validation set is evaluated after each epoch.
struct FitData {
  at::Tensor x, target;
  int64_t epochs;
  int64_t batch_size;
  std::optional<at::Tensor> orders;
  std::optional<at::Generator> generator;
  std::optional<at::Tensor> val_x, val_target;
};

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

}  // namespace cpu
}  // namespace fusedtrain
