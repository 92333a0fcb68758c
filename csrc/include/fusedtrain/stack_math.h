// Layer stacks: the activations and losses of a fused MLP step, written once for the CPU and CUDA
// kernels (each a template instantiated per activation or loss, so the element loops carry no
// switch).
//
// A stack of L layers on a batch of rows, A_0 = x:
//   Z_l = A_{l-1} W_l^T + b_l        A_l = act_l(Z_l)        loss = reduce(l(A_L, y))
// Backward, with G_l = dloss/dZ_l:
//   G_L = dloss/dA_L * act_L'(Z_L)   (the loss heads below give dloss/dA_L directly)
//   dW_l = G_l^T A_{l-1}    db_l = sum over rows of G_l    G_{l-1} = (G_l W_l) * act_{l-1}'(Z_{l-1})
// The derivatives follow torch's backward formulas, so that gradients agree to rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace math {

// The op's integer codes (fusedtrain/stacks.py has the same values).
enum class Activation : int64_t {
  kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3, kSigmoid = 4, kGelu = 5, kGeluTanh = 6, kSilu = 7
};
enum class Loss : int64_t {
  kMse = 0, kL1 = 1, kSmoothL1 = 2, kHuber = 3, kCrossEntropy = 4, kBceWithLogits = 5
};

// forward(z, p): the activation of a pre-activation z (p: LeakyReLU's negative slope).
// derivative(z, a, p): dA/dZ at z, where a = forward(z, p) is at hand too.
// kDerivativeFromOutput: derivative reads a alone, so a kernel may write a over z and keep one buffer.
template <Activation kAct>
struct Act;

template <>
struct Act<Activation::kIdentity> {
  static constexpr bool kDerivativeFromOutput = true;
  template <typename T> FT_INLINE T forward(T z, T) { return z; }
  template <typename T> FT_INLINE T derivative(T, T, T) { return T(1); }
};

// As torch: relu(NaN) is NaN, and threshold_backward stops the gradient where the output is
// <= 0 (so it passes at a NaN, and not at z == 0).
template <>
struct Act<Activation::kRelu> {
  static constexpr bool kDerivativeFromOutput = true;
  template <typename T> FT_INLINE T forward(T z, T) { return z <= T(0) ? T(0) : z; }
  template <typename T> FT_INLINE T derivative(T, T a, T) { return a <= T(0) ? T(0) : T(1); }
};

template <>
struct Act<Activation::kLeakyRelu> {
  static constexpr bool kDerivativeFromOutput = false;
  template <typename T> FT_INLINE T forward(T z, T slope) { return z > T(0) ? z : z * slope; }
  template <typename T> FT_INLINE T derivative(T z, T, T slope) { return z > T(0) ? T(1) : slope; }
};

// tanh' = 1 - tanh^2, from the output as torch's tanh_backward.
template <>
struct Act<Activation::kTanh> {
  static constexpr bool kDerivativeFromOutput = true;
  template <typename T> FT_INLINE T forward(T z, T) { return std::tanh(z); }
  template <typename T> FT_INLINE T derivative(T, T a, T) { return T(1) - a * a; }
};

// sigmoid' = s (1 - s), from the output as torch's sigmoid_backward.
template <>
struct Act<Activation::kSigmoid> {
  static constexpr bool kDerivativeFromOutput = true;
  template <typename T> FT_INLINE T forward(T z, T) { return T(1) / (T(1) + std::exp(-z)); }
  template <typename T> FT_INLINE T derivative(T, T a, T) { return a * (T(1) - a); }
};

// GELU(z) = z Phi(z) = z/2 (1 + erf(z / sqrt 2));  GELU'(z) = Phi(z) + z phi(z).
template <>
struct Act<Activation::kGelu> {
  static constexpr bool kDerivativeFromOutput = false;
  template <typename T> FT_INLINE T forward(T z, T) {
    return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
  }
  template <typename T> FT_INLINE T derivative(T z, T, T) {
    const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.70710678118654752440)));
    const T pdf = std::exp(T(-0.5) * z * z) * T(0.39894228040143267794);  // 1 / sqrt(2 pi)
    return cdf + z * pdf;
  }
};

// GELU, tanh approximation: z/2 (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3);
// derivative (1 + tanh u)/2 + z/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 z^2), as torch.
template <>
struct Act<Activation::kGeluTanh> {
  static constexpr bool kDerivativeFromOutput = false;
  template <typename T> FT_INLINE T inner_tanh(T z) {
    return std::tanh(T(0.79788456080286535588) * (z + T(0.044715) * z * z * z));
  }
  template <typename T> FT_INLINE T forward(T z, T) { return T(0.5) * z * (T(1) + inner_tanh(z)); }
  template <typename T> FT_INLINE T derivative(T z, T, T) {
    const T t = inner_tanh(z);
    const T inner_derivative = T(0.79788456080286535588) * (T(1) + T(3) * T(0.044715) * z * z);
    return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * inner_derivative;
  }
};

// SiLU(z) = z s(z);  SiLU'(z) = s(z) (1 + z (1 - s(z))), as torch's silu_backward.
template <>
struct Act<Activation::kSilu> {
  static constexpr bool kDerivativeFromOutput = false;
  template <typename T> FT_INLINE T sigmoid(T z) { return T(1) / (T(1) + std::exp(-z)); }
  template <typename T> FT_INLINE T forward(T z, T) { return z * sigmoid(z); }
  template <typename T> FT_INLINE T derivative(T z, T, T) {
    const T s = sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  }
};

// f(Act<a>{}) for a runtime activation code a: the element loops are instantiated per activation
// and the switch runs once per loop (on a GPU the code is the same in every thread: no divergence).
template <typename F>
FT_INLINE void with_activation(Activation activation, F&& f) {
  switch (activation) {
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

// Regression heads on a residual r = prediction - target, p the loss's parameter (SmoothL1's beta,
// Huber's delta): value(r, p) is the element's loss, grad(r, p) its derivative in r. The caller
// scales the gradient by 1/R (R = N * out under "mean", 1 under "sum").
template <Loss kLoss>
struct Regression;

template <>
struct Regression<Loss::kMse> {
  template <typename T> FT_INLINE T value(T r, T) { return r * r; }
  template <typename T> FT_INLINE T grad(T r, T) { return T(2) * r; }
};

// d|r|/dr = sign(r), 0 at r == 0 as torch's sgn.
template <>
struct Regression<Loss::kL1> {
  template <typename T> FT_INLINE T value(T r, T) { return std::fabs(r); }
  template <typename T> FT_INLINE T grad(T r, T) { return r > T(0) ? T(1) : (r < T(0) ? T(-1) : T(0)); }
};

// |r| < beta: r^2 / (2 beta), else |r| - beta / 2; beta == 0 is L1 (torch).
template <>
struct Regression<Loss::kSmoothL1> {
  template <typename T> FT_INLINE T value(T r, T beta) {
    const T a = std::fabs(r);
    return a < beta ? T(0.5) * r * r / beta : a - T(0.5) * beta;
  }
  template <typename T> FT_INLINE T grad(T r, T beta) {
    return r < -beta ? T(-1) : (r > beta ? T(1) : (beta == T(0) ? T(0) : r / beta));
  }
};

// |r| < delta: r^2 / 2, else delta (|r| - delta / 2).
template <>
struct Regression<Loss::kHuber> {
  template <typename T> FT_INLINE T value(T r, T delta) {
    const T a = std::fabs(r);
    return a < delta ? T(0.5) * r * r : delta * (a - T(0.5) * delta);
  }
  template <typename T> FT_INLINE T grad(T r, T delta) {
    return r <= -delta ? -delta : (r >= delta ? delta : r);
  }
};

// BCE with logits, one element: loss = max(z, 0) - z y + log(1 + exp(-|z|)) (stable for any z),
// dloss/dz = sigmoid(z) - y.
template <typename T>
FT_INLINE T bce_with_logits_value(T z, T y) {
  return (z > T(0) ? z : T(0)) - z * y + std::log1p(std::exp(-std::fabs(z)));
}
template <typename T>
FT_INLINE T bce_with_logits_grad(T z, T y) {
  return T(1) / (T(1) + std::exp(-z)) - y;
}

// Cross entropy of one row of C logits z against class t with label smoothing ls:
//   q = (1 - ls) onehot(t) + ls / C;  loss = -sum_c q_c log softmax(z)_c
//   dloss/dz = softmax(z) - q
// softmax is taken as exp(z - max) / sum exp(z - max). Writes dloss/dz * scale into grad (which
// may alias z) and returns the row's loss; the probabilities are never stored elsewhere.
template <typename T>
FT_INLINE T cross_entropy_row(const T* z, int64_t classes, int64_t target, T label_smoothing, T scale,
                              T* grad) {
  T max = z[0];
  for (int64_t c = 1; c < classes; ++c) max = z[c] > max || z[c] != z[c] ? z[c] : max;
  T sum = T(0);
  for (int64_t c = 0; c < classes; ++c) sum += std::exp(z[c] - max);
  const T log_sum = std::log(sum);
  const T smooth = label_smoothing / static_cast<T>(classes);
  T loss = T(0);
  for (int64_t c = 0; c < classes; ++c) {
    const T log_prob = z[c] - max - log_sum;
    const T q = (c == target ? T(1) - label_smoothing : T(0)) + smooth;
    loss -= q * log_prob;
    grad[c] = (std::exp(log_prob) - q) * scale;
  }
  return loss;
}

}  // namespace math
}  // namespace fusedtrain
