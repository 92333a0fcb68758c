// The fused training loop for a linear layer with an MSE loss: forward, loss, gradients and
// the SGD or Adam update in native code, for one step (FusedTrainStep) or a whole fit.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "linear_mse_cpu.h"

namespace fusedtrain {
namespace cpu {

// Hyperparameters of the optimizer that updates weight and bias (one param group).
struct FitOptimizer {
  bool adam = false;  // else SGD
  double lr = 0.0;
  double weight_decay = 0.0;
  bool maximize = false;
  // Adam / AdamW
  double beta1 = 0.0;
  double beta2 = 0.0;
  double eps = 0.0;
  bool decoupled = false;
  bool amsgrad = false;
  // SGD
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  bool first_step = false;  // the momentum buffers are new: they start as the first gradient
};

// Trains weight (out, in) and bias (out) in place on x (N, in), target (N, out) for `epochs`
// passes of mini-batches of `batch_size` rows (0: the whole set), shuffled with `generator`
// when given, and returns (per-epoch mean batch loss, per-epoch validation loss or an empty
// tensor), in x's dtype. Optimizer state tensors are updated in place: for Adam `state` is exp_avgs,
// exp_avg_sqs, max_exp_avg_sqs (amsgrad) and steps, two of each (weight, bias) or one without
// bias; for SGD with momentum it is the momentum buffers.
std::tuple<at::Tensor, at::Tensor> linear_mse_fit_cpu(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t reduction, int64_t epochs,
    int64_t batch_size, std::optional<at::Generator> generator,
    const std::optional<at::Tensor>& val_x, const std::optional<at::Tensor>& val_target,
    at::TensorList state, const FitOptimizer& optimizer);

}  // namespace cpu
}  // namespace fusedtrain
