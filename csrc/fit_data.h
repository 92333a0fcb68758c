// The rows, epochs and batches of one layer-stack fit (fusedtrain.fit), as the native training
// loops of every device take them (stack_fit_*_cpu in csrc/cpu/stack_cpu.h, stack_fit_*_cuda in
// csrc/cuda/stack_fit.h).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

// The checks of a fit's data that every device makes; check_rows(x, target) checks a set of rows
// against the stack as that device's kernels need it (the training set, then the validation set).
template <typename CheckRows>
void check_fit_data(const char* op, const FitData& d, const CheckRows& check_rows) {
  check_rows(d.x, d.target);
  TORCH_CHECK_VALUE(d.x.is_contiguous() && d.target.is_contiguous(), op, ": x and target must be contiguous");
  TORCH_CHECK_VALUE(d.epochs >= 0, op, ": epochs must be >= 0, got ", d.epochs);
  TORCH_CHECK_VALUE(d.batch_size >= 0, op, ": batch_size must be >= 0 (0: the whole set), got ", d.batch_size);
  TORCH_CHECK_VALUE(d.val_x.has_value() == d.val_target.has_value(), op, ": val_x and val_target come together");
  if (d.val_x.has_value()) {
    check_rows(*d.val_x, *d.val_target);
    TORCH_CHECK_VALUE(d.val_x->is_contiguous() && d.val_target->is_contiguous(), op,
                      ": val_x and val_target must be contiguous");
  }
}

}  // namespace fusedtrain
