// Adam / AdamW: the per-element update, written once for the CPU and CUDA kernels.
//
// For one element at step t (t counted from 1), with g the gradient:
//   g  <- -g                          if maximize
//   g  <- g + wd * p                  Adam's L2 penalty (coupled)
//   p  <- p * (1 - lr * wd)           AdamW's decoupled decay
//   m  <- m + (1 - b1) * (g - m)      = b1 * m + (1 - b1) * g, as torch's lerp_
//   v  <- b2 * v + (1 - b2) * g * g
//   vmax <- max(vmax, v); v_hat = vmax           if amsgrad
//   p  <- p - step_size * m / (sqrt(v_hat) * inv_bc2_sqrt + eps)
//        with step_size = lr / (1 - b1^t) and inv_bc2_sqrt = 1 / sqrt(1 - b2^t)
// The order of operations follows torch.optim.Adam (foreach=False) so results agree to rounding,
// except that torch divides by sqrt(1 - b2^t) where this multiplies by its inverse: a division
// is the costliest vector instruction here (the loop is compute-bound for 16-bit params), and
// the two differ by at most an ulp of the denominator.
// Everything that depends only on the hyperparameters and t is folded on the host, in double,
// into AdamCoeffs; the element math runs in T (float for fp32/bf16/fp16 params, double for fp64).
#pragma once

#include <cmath>

#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace math {

template <typename T>
struct AdamCoeffs {
  T beta1;
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;           // coupled (L2) decay; 0 when decoupled
  T param_decay;            // 1 - lr * wd when decoupled, else 1 (multiplying by 1 is exact)
  T step_size;              // lr / (1 - beta1^t)
  T inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)
  T grad_sign;              // -1 when maximizing, else 1 (negation is exact)
};

// Hyperparameters and the step count t folded in double, as torch.optim does with Python
// floats; beta1_pow_t and beta2_pow_t are beta1^t and beta2^t.
template <typename T>
FT_INLINE AdamCoeffs<T> make_adam_coeffs_from_powers(double lr, double beta1, double beta2,
                                                     double eps, double weight_decay,
                                                     bool decoupled, bool maximize,
                                                     double beta1_pow_t, double beta2_pow_t) {
  AdamCoeffs<T> c;
  c.beta1 = static_cast<T>(beta1);
  c.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  c.beta2 = static_cast<T>(beta2);
  c.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  c.eps = static_cast<T>(eps);
  c.weight_decay = static_cast<T>(decoupled ? 0.0 : weight_decay);
  c.param_decay = static_cast<T>(decoupled ? 1.0 - lr * weight_decay : 1.0);
  c.step_size = static_cast<T>(lr / (1.0 - beta1_pow_t));
  c.inv_bias_correction2_sqrt = static_cast<T>(1.0 / std::sqrt(1.0 - beta2_pow_t));
  c.grad_sign = static_cast<T>(maximize ? -1.0 : 1.0);
  return c;
}

template <typename T>
FT_INLINE AdamCoeffs<T> make_adam_coeffs(double lr, double beta1, double beta2, double eps,
                                         double weight_decay, bool decoupled, bool maximize,
                                         double step) {
  return make_adam_coeffs_from_powers<T>(lr, beta1, beta2, eps, weight_decay, decoupled,
                                         maximize, std::pow(beta1, step), std::pow(beta2, step));
}

// torch.lerp's formula: it switches ends for weights >= 0.5 to stay accurate near the end point.
template <typename T>
FT_INLINE T lerp(T start, T end, T weight) {
  return weight < T(0.5) ? start + weight * (end - start) : end - (end - start) * (T(1) - weight);
}

// max that propagates NaN from either side, as torch.maximum does.
template <typename T>
FT_INLINE T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// One element. kCoupledDecay is a template flag rather than a test of weight_decay == 0 inside
// the loop: adding 0 * p is not a no-op when p is inf or NaN, so the term must be absent.
// `grad` arrives unscaled (divided by the GradScaler's scale by the kernel, which also stores it).
template <bool kAmsgrad, bool kCoupledDecay, typename T>
FT_INLINE void adam_element(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                            const AdamCoeffs<T>& c) {
  T g = c.grad_sign * grad;
  if (kCoupledDecay) g = g + c.weight_decay * param;
  const T p = param * c.param_decay;
  exp_avg = lerp(exp_avg, g, c.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
  T second_moment = exp_avg_sq;
  if (kAmsgrad) {
    max_exp_avg_sq = nan_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = std::sqrt(second_moment) * c.inv_bias_correction2_sqrt + c.eps;
  param = p - c.step_size * exp_avg / denom;
}

}  // namespace math
}  // namespace fusedtrain
