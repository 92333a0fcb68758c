// The description of a layer stack that every stack op takes after x, target and params (the
// schema fragment kStackSpecSchema, written once), as one typed struct, and the checks of a
// call, shared by every device: named errors, raised before anything is computed or written.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "fusedtrain/stack_math.h"

namespace fusedtrain {

// The schema of the description's arguments, in the order of StackSpec's fields below and of
// fusedtrain.stacks.StackSpec.
constexpr const char* kStackSpecSchema =
    "bool[] has_bias, int[] layer_params, int[] activations, float[] activation_params, int loss, "
    "int reduction, float loss_param, int ignore_index, float label_smoothing";

struct StackSpec {
  std::vector<bool> has_bias;          // per layer
  // Per layer: the index of its weight in params, its bias (if any) next. An nn.Linear applied
  // twice is two layers with one index: its gradient adds up both uses.
  std::vector<int64_t> layer_params;
  std::vector<math::Activation> activations;  // per layer
  std::vector<double> activation_params;      // per layer (LeakyReLU's negative slope)
  math::Loss loss;
  int64_t reduction;                   // at::Reduction::Mean or Sum
  double loss_param;                   // SmoothL1's beta, Huber's delta
  int64_t ignore_index;                // cross entropy
  double label_smoothing;              // cross entropy

  size_t layers() const { return activations.size(); }
  bool classification() const {
    return loss == math::Loss::kCrossEntropy || loss == math::Loss::kBceWithLogits;
  }
};

// The op arguments as a StackSpec, checked (values, not yet the tensors).
inline StackSpec make_stack_spec(const char* op, const std::vector<bool>& has_bias,
                                 c10::IntArrayRef layer_params, c10::IntArrayRef activations,
                                 c10::ArrayRef<double> activation_params, int64_t loss,
                                 int64_t reduction, double loss_param, int64_t ignore_index,
                                 double label_smoothing) {
  const size_t layers = activations.size();
  TORCH_CHECK_VALUE(layers >= 1, op, ": a stack needs at least one layer, got activations of length 0");
  TORCH_CHECK_VALUE(has_bias.size() == layers && layer_params.size() == layers &&
                        activation_params.size() == layers,
                    op, ": has_bias, layer_params, activations and activation_params need one entry "
                    "per layer, got ", has_bias.size(), ", ", layer_params.size(), ", ", layers, " and ",
                    activation_params.size());
  StackSpec s;
  s.has_bias = has_bias;
  s.layer_params = layer_params.vec();
  for (size_t l = 0; l < layers; ++l) {
    TORCH_CHECK_VALUE(activations[l] >= 0 && activations[l] <= 7, op, ": activations[", l,
                      "] must be an Activation code 0-7 (fusedtrain.stacks.Activation), got ",
                      activations[l]);
    s.activations.push_back(static_cast<math::Activation>(activations[l]));
  }
  s.activation_params.assign(activation_params.begin(), activation_params.end());
  TORCH_CHECK_VALUE(loss >= 0 && loss <= 5, op,
                    ": loss must be a Loss code 0-5 (fusedtrain.stacks.Loss), got ", loss);
  s.loss = static_cast<math::Loss>(loss);
  TORCH_CHECK_VALUE(reduction == at::Reduction::Mean || reduction == at::Reduction::Sum, op,
                    ": reduction must be ", at::Reduction::Mean, " (mean) or ", at::Reduction::Sum,
                    " (sum), got ", reduction);
  s.reduction = reduction;
  TORCH_CHECK_VALUE(loss_param >= 0.0, op, ": loss_param (beta or delta) must be >= 0, got ", loss_param);
  TORCH_CHECK_VALUE(s.loss != math::Loss::kHuber || loss_param > 0.0, op,
                    ": HuberLoss needs delta > 0, got ", loss_param);
  s.loss_param = loss_param;
  s.ignore_index = ignore_index;
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  s.label_smoothing = label_smoothing;
  return s;
}

// params: weight (out, in) then bias (out) if the layer has one, layer by layer; x (N, in_0);
// target (N, out_L) for regression and BCE (same dtype), (N,) int64 classes for cross entropy.
inline void check_stack_tensors(const char* op, const StackSpec& s, const at::Tensor& x,
                                const at::Tensor& target, at::TensorList params) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (N, in), got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64, got ", x.scalar_type());
  // Each param has one role (a weight, or the bias after it), every param is used, and layers
  // that share an index agree on it.
  std::vector<int> role(params.size(), 0);  // 0 unused, 1 weight, 2 bias
  for (size_t l = 0; l < s.layers(); ++l) {
    const int64_t i = s.layer_params[l];
    const int64_t last = i + (s.has_bias[l] ? 1 : 0);
    TORCH_CHECK_VALUE(i >= 0 && last < static_cast<int64_t>(params.size()), op, ": layer_params[", l, "] = ",
                      i, " is outside the ", params.size(), " params");
    TORCH_CHECK_VALUE(role[i] != 2 && (last == i || role[last] != 1), op, ": layer_params[", l,
                      "] gives params[", i, "] or params[", last, "] a second role (weight and bias)");
    role[i] = 1;
    if (last != i) role[last] = 2;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(role[i] != 0, op, ": params[", i, "] is used by no layer (layer_params)");
  }
  int64_t width = x.size(1);
  for (size_t l = 0; l < s.layers(); ++l) {
    const size_t i = static_cast<size_t>(s.layer_params[l]);
    const at::Tensor& w = params[i];
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op, ": params[", i, "] (layer ", l,
                     "'s weight) has dtype ", w.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(w.device() == x.device(), op, ": params[", i, "] (layer ", l, "'s weight) is on ",
                      w.device(), " but x is on ", x.device());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == width, op, ": params[", i, "] (layer ", l,
                      "'s weight) must have shape (out, ", width, "), got ", w.sizes());
    TORCH_CHECK_VALUE(w.layout() == at::kStrided && w.is_contiguous(), op, ": params[", i,
                      "] must be a dense contiguous tensor: it is updated in place");
    width = w.size(0);
    if (s.has_bias[l]) {
      const at::Tensor& b = params[i + 1];
      TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), op, ": params[", i + 1, "] (layer ", l,
                       "'s bias) has dtype ", b.scalar_type(), " but x has dtype ", x.scalar_type());
      TORCH_CHECK_VALUE(b.device() == x.device(), op, ": params[", i + 1, "] (layer ", l, "'s bias) is on ",
                        b.device(), " but x is on ", x.device());
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == width, op, ": params[", i + 1, "] (layer ", l,
                        "'s bias) must have shape (", width, "), got ", b.sizes());
      TORCH_CHECK_VALUE(b.layout() == at::kStrided && b.is_contiguous(), op, ": params[", i + 1,
                        "] must be a dense contiguous tensor: it is updated in place");
    }
  }
  TORCH_CHECK_VALUE(target.device() == x.device(), op, ": target is on ", target.device(),
                    " but x is on ", x.device());
  if (s.loss == math::Loss::kCrossEntropy) {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                     ": cross entropy takes class indices: target must be int64, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == x.size(0), op, ": target must have shape (",
                      x.size(0), "), got ", target.sizes());
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == x.scalar_type(), op, ": target has dtype ",
                     target.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == x.size(0) && target.size(1) == width, op,
                      ": target must have shape (", x.size(0), ", ", width, ") (expand it first), got ",
                      target.sizes());
  }
}

}  // namespace fusedtrain
