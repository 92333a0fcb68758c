// Argument checks of the linear + MSE ops, shared by every device: named errors, raised before
// anything is computed or written.
#pragma once

#include <optional>

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fusedtrain {

// Shapes, dtypes and devices of a linear + MSE call; named errors, nothing touched yet.
inline void check_linear_mse_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const at::Tensor& target, int64_t reduction) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (N, in), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), op,
                    ": weight must have shape (out, ", x.size(1), ") for x of shape ", x.sizes(),
                    ", got ", weight.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64, got ", x.scalar_type());
  const auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                     t.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                      " but x is on ", x.device());
  };
  same(weight, "weight");
  same(target, "target");
  if (bias.has_value()) {
    same(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": bias must have shape (", weight.size(0), "), got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == x.size(0) &&
                        target.size(1) == weight.size(0),
                    op, ": target must have shape (", x.size(0), ", ", weight.size(0),
                    ") (expand it first), got ", target.sizes());
  TORCH_CHECK_VALUE(reduction == at::Reduction::Mean || reduction == at::Reduction::Sum, op,
                    ": reduction must be ", at::Reduction::Mean, " (mean) or ",
                    at::Reduction::Sum, " (sum), got ", reduction);
}

}  // namespace fusedtrain
