// The CPU kernel of fusedtrain::linear_mse_train_step_ (schema in csrc/ops.cpp): one training step
// of a linear layer under MSE, the depth-1 case of the layer-stack train steps (stack_cpu.h), which
// run it. The op takes the optimizer's state as one list: for Adam exp_avgs, exp_avg_sqs,
// max_exp_avg_sqs (amsgrad only) and steps, one of each per param (weight, then bias if any);
// for SGD with momentum the momentum buffers; nothing for SGD without.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace fusedtrain {
namespace cpu {

// The op's optimizer arguments after `state`, in its order.
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

}  // namespace cpu
}  // namespace fusedtrain
