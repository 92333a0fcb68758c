// What the linear + MSE ops share on every device: the argument checks (named errors, raised
// before anything is computed or written) and the preparation of a call.
#pragma once

#include <optional>

#include <ATen/ATen.h>
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

// A checked call, as every device's kernel starts it: contiguous inputs, the sizes, dL/dpred's
// scale 2 / R, and the gradient outputs (empty where not asked for).
struct LinearMseCall {
  at::Tensor x, weight, bias, target;  // bias undefined when absent
  int64_t n, in, out, count;           // count: the number of residuals, N * out
  double two_over_count;               // 2 / count for "mean", 2 for "sum"
  at::Tensor grad_weight, grad_bias, grad_x;
};

inline LinearMseCall prepare_linear_mse(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& target, int64_t reduction,
                                        bool need_grad_x, bool need_grad_params) {
  LinearMseCall c;
  c.x = x.contiguous();
  c.weight = weight.contiguous();
  c.target = target.contiguous();
  c.bias = bias.has_value() ? bias->contiguous() : at::Tensor();
  c.n = c.x.size(0);
  c.in = c.x.size(1);
  c.out = c.weight.size(0);
  c.count = c.n * c.out;
  c.two_over_count = reduction == at::Reduction::Mean ? 2.0 / c.count : 2.0;
  const auto opts = c.x.options();
  c.grad_weight = at::empty(need_grad_params ? at::IntArrayRef{c.out, c.in} : at::IntArrayRef{0}, opts);
  c.grad_bias = at::empty({need_grad_params && c.bias.defined() ? c.out : 0}, opts);
  c.grad_x = at::empty(need_grad_x ? at::IntArrayRef{c.n, c.in} : at::IntArrayRef{0}, opts);
  return c;
}

}  // namespace fusedtrain
