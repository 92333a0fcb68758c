// SGD with momentum, dampening, Nesterov and weight decay: the per-element update, written once
// for the CPU and CUDA kernels.
//
// For one element, with g the gradient and b the momentum buffer:
//   g <- -g                         if maximize
//   g <- g + wd * p                 if wd != 0
//   b <- g                          on the first step (torch clones the gradient)
//   b <- momentum * b + (1 - dampening) * g      afterwards
//   g <- g + momentum * b  (nesterov)   or   g <- b
//   p <- p - lr * g
// The order of operations follows torch.optim.SGD (foreach=False).
#pragma once

#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace math {

template <typename T>
struct SgdCoeffs {
  T lr;
  T momentum;
  T one_minus_dampening;
  T weight_decay;
  T grad_sign;  // -1 when maximizing, else 1
};

template <typename T>
FT_INLINE SgdCoeffs<T> make_sgd_coeffs(double lr, double momentum, double dampening,
                                       double weight_decay, bool maximize) {
  SgdCoeffs<T> c;
  c.lr = static_cast<T>(lr);
  c.momentum = static_cast<T>(momentum);
  c.one_minus_dampening = static_cast<T>(1.0 - dampening);
  c.weight_decay = static_cast<T>(weight_decay);
  c.grad_sign = static_cast<T>(maximize ? -1.0 : 1.0);
  return c;
}

// Which terms exist is decided once per call (template flags), not per element: a term with a
// zero coefficient is not a no-op when p, g or b hold inf or NaN. `grad` arrives unscaled.
template <bool kDecay, bool kMomentum, bool kFirstStep, bool kNesterov, typename T>
FT_INLINE void sgd_element(T& param, T grad, T& momentum_buffer, const SgdCoeffs<T>& c) {
  T g = c.grad_sign * grad;
  if (kDecay) g = g + c.weight_decay * param;
  if (kMomentum) {
    momentum_buffer = kFirstStep ? g : momentum_buffer * c.momentum + c.one_minus_dampening * g;
    g = kNesterov ? g + c.momentum * momentum_buffer : momentum_buffer;
  }
  param = param - c.lr * g;
}

}  // namespace math
}  // namespace fusedtrain
