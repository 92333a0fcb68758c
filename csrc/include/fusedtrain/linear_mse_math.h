// Linear layer + MSE loss: the forward and both gradients from one pass over a row of x.
//
// For rows x_i (in), weight W (out x in), bias b, target y_i (out), and R = N * out residuals
// under reduction "mean" (R = 1 under "sum"):
//   pred_io = W_o . x_i + b_o          r_io = pred_io - y_io          loss = sum r_io^2 / R
//   g_io = dloss/dpred_io = (2 / R) r_io
//   grad_W_o = sum_i g_io x_i          grad_b_o = sum_i g_io          grad_x_i = sum_o g_io W_o
// so once r_io is known the gradients need nothing but x_i again, which is still in cache: the
// prediction is never stored. Dot products use fixed lanes and a fixed reduction order, so the
// result is the same on every instruction set.
#pragma once

#include <cstdint>

#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace math {

// Enough independent partial sums to hide the add latency: 128 bytes of accumulators.
template <typename T>
constexpr int kDotLanes = 128 / sizeof(T);

template <typename T>
FT_INLINE T lane_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  constexpr int kLanes = kDotLanes<T>;
  if (n < kLanes) {  // what the lanes below reduce to when they stay empty, without the work
    T sum = T(0);
    for (int64_t k = 0; k < n; ++k) sum += a[k] * b[k];
    return sum;
  }
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  }
  T tail = T(0);
  for (; k < n; ++k) tail += a[k] * b[k];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0] + tail;
}

// y += alpha * x
template <typename T>
FT_INLINE void axpy(T* __restrict__ y, T alpha, const T* __restrict__ x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

// dloss/dpred for one residual: 2 r / R.
template <typename T>
FT_INLINE T mse_grad(T residual, T two_over_count) {
  return two_over_count * residual;
}

}  // namespace math
}  // namespace fusedtrain
