// The rows, epochs and batches of one layer-stack fit (fusedtrain.fit), as the native training
// loops of every device take them (stack_fit_*_cpu in csrc/cpu/stack_cpu.h, stack_fit_*_cuda in
// csrc/cuda/stack_fit.h).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace fusedtrain {

// x (N, in) and target, in batches of batch_size rows (0: the whole set). Each epoch takes the
// rows in the order orders[epoch] ((epochs, M) int64, M <= N: a DataLoader's drop_last leaves rows
// out), else in a new torch.randperm(N, generator) drawn on the host, else in order 0..N-1. An
// optional validation set is evaluated after each epoch.
struct FitData {
  at::Tensor x, target;
  int64_t epochs;
  int64_t batch_size;
  std::optional<at::Tensor> orders;
  std::optional<at::Generator> generator;
  std::optional<at::Tensor> val_x, val_target;
};

}  // namespace fusedtrain
