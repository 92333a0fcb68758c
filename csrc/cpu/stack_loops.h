// The loops of a layer stack's forward and backward on small layers, compiled once per
// instruction set like element_loops.h (included after it, inside the same target region and
// namespace macro). Every loop's innermost dimension is contiguous and carries no reduction, so
// the compiler vectorizes it without reassociating sums: each output element is summed in the
// same order on every instruction set (and, with -ffp-contract=off, rounded the same way).
#ifndef FT_ISA_NAMESPACE
#error "define FT_ISA_NAMESPACE before including stack_loops.h"
#endif

namespace fusedtrain {
namespace cpu {
namespace FT_ISA_NAMESPACE {

// f(Act<kAct>{}) for a runtime activation code.
template <typename F>
void with_activation(math::Activation act, F&& f) {
  using math::Act;
  using math::Activation;
  switch (act) {
    case Activation::kIdentity: f(Act<Activation::kIdentity>{}); break;
    case Activation::kRelu: f(Act<Activation::kRelu>{}); break;
    case Activation::kLeakyRelu: f(Act<Activation::kLeakyRelu>{}); break;
    case Activation::kTanh: f(Act<Activation::kTanh>{}); break;
    case Activation::kSigmoid: f(Act<Activation::kSigmoid>{}); break;
    case Activation::kGelu: f(Act<Activation::kGelu>{}); break;
    case Activation::kGeluTanh: f(Act<Activation::kGeluTanh>{}); break;
    case Activation::kSilu: f(Act<Activation::kSilu>{}); break;
  }
}

// y = act(z) elementwise (nothing for the identity, where y is z).
template <typename T>
void stack_activate(const StackLayer<T>& l, const T* z, int64_t count, T* y) {
  if (l.activation == math::Activation::kIdentity) return;
  with_activation(l.activation, [&](auto act) {
    const T p = l.activation_param;
    for (int64_t i = 0; i < count; ++i) y[i] = act.forward(z[i], p);
  });
}

// g *= act'(z) elementwise, for the layer described by `l` (nothing for the identity).
template <typename T>
void stack_scale_by_derivative(const StackLayer<T>& l, const T* z, const T* y, int64_t count, T* g) {
  if (l.activation == math::Activation::kIdentity) return;
  with_activation(l.activation, [&](auto act) {
    const T p = l.activation_param;
    for (int64_t i = 0; i < count; ++i) g[i] *= act.derivative(z[i], y[i], p);
  });
}

// z = a W^T + b row by row (wt = W^T, in x out): z starts at b and adds a_k * row k of W^T for
// k = 0, 1, ...; then y = act(z) (y == z for the identity).
template <typename T>
void stack_forward(const StackLayer<T>& l, const T* a, int64_t rows, T* z, T* y) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict__ zr = z + r * l.out;
    const T* __restrict__ ar = a + r * l.in;
    for (int64_t j = 0; j < l.out; ++j) zr[j] = l.bias != nullptr ? l.bias[j] : T(0);
    for (int64_t k = 0; k < l.in; ++k) {
      const T ak = ar[k];
      const T* __restrict__ wk = l.weight_t + k * l.out;
      for (int64_t j = 0; j < l.out; ++j) zr[j] += ak * wk[j];
    }
  }
  stack_activate(l, z, rows * l.out, y);
}

// grad_weight += g^T a and grad_bias += column sums of g, row by row (g: rows x out, a: rows x in).
template <typename T>
void stack_weight_grad(const StackLayer<T>& l, const T* g, const T* a, int64_t rows,
                       T* grad_weight, T* grad_bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ ar = a + r * l.in;
    const T* gr = g + r * l.out;
    for (int64_t j = 0; j < l.out; ++j) {
      const T gj = gr[j];
      T* __restrict__ dw = grad_weight + j * l.in;
      for (int64_t k = 0; k < l.in; ++k) dw[k] += gj * ar[k];
    }
    if (grad_bias != nullptr) {
      for (int64_t j = 0; j < l.out; ++j) grad_bias[j] += gr[j];
    }
  }
}

// The gradient of the layer below's pre-activation: g_below = (g W) * act'(z_below), where the
// layer below has `below` as its description (its activation), z_below and y_below its outputs.
template <typename T>
void stack_input_grad(const StackLayer<T>& l, const T* g, int64_t rows, const StackLayer<T>& below,
                      const T* z_below, const T* y_below, T* g_below) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict__ gb = g_below + r * l.in;
    const T* gr = g + r * l.out;
    for (int64_t k = 0; k < l.in; ++k) gb[k] = T(0);
    for (int64_t j = 0; j < l.out; ++j) {
      const T gj = gr[j];
      const T* __restrict__ wj = l.weight + j * l.in;
      for (int64_t k = 0; k < l.in; ++k) gb[k] += gj * wj[k];
    }
  }
  stack_scale_by_derivative(below, z_below, y_below, rows * l.in, g_below);
}

// The loss of `rows` rows of the top layer's output y (pre-activation z) and its gradient with
// respect to z, written to g; returns the rows' summed loss (in double, before the reduction's
// 1/R, which `scale` applies to the gradient).
template <typename T>
double stack_loss(const StackLoss<T>& s, const StackLayer<T>& top, const T* z, const T* y,
                  const void* target, int64_t rows, T* g) {
  const int64_t out = top.out;
  const int64_t count = rows * out;
  double total = 0.0;
  using math::Loss;
  if (s.loss == Loss::kCrossEntropy) {
    const int64_t* classes = static_cast<const int64_t*>(target);
    for (int64_t r = 0; r < rows; ++r) {
      T* gr = g + r * out;
      if (classes[r] == s.ignore_index) {  // an ignored row: no loss, no gradient
        for (int64_t c = 0; c < out; ++c) gr[c] = T(0);
        continue;
      }
      total += static_cast<double>(
          math::cross_entropy_row(y + r * out, out, classes[r], s.label_smoothing, s.scale, gr));
    }
  } else if (s.loss == Loss::kBceWithLogits) {
    const T* t = static_cast<const T*>(target);
    for (int64_t i = 0; i < count; ++i) {
      total += static_cast<double>(math::bce_with_logits_value(y[i], t[i]));
      g[i] = math::bce_with_logits_grad(y[i], t[i]) * s.scale;
    }
  } else {
    const T* t = static_cast<const T*>(target);
    auto regression = [&](auto head) {
      for (int64_t i = 0; i < count; ++i) {
        const T r = y[i] - t[i];
        total += static_cast<double>(head.value(r, s.loss_param));
        g[i] = head.grad(r, s.loss_param) * s.scale;
      }
    };
    switch (s.loss) {
      case Loss::kMse: regression(math::Regression<Loss::kMse>{}); break;
      case Loss::kL1: regression(math::Regression<Loss::kL1>{}); break;
      case Loss::kSmoothL1: regression(math::Regression<Loss::kSmoothL1>{}); break;
      default: regression(math::Regression<Loss::kHuber>{}); break;
    }
  }
  stack_scale_by_derivative(top, z, y, count, g);
  return total;
}

}  // namespace FT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedtrain
