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

// lane_dot of four rows with the same b, sharing each load of b: the same lanes, tail and
// reduction per row as lane_dot, so the same results bit for bit.
template <typename T>
FT_INLINE void lane_dot4(const T* __restrict__ a0, const T* __restrict__ a1,
                         const T* __restrict__ a2, const T* __restrict__ a3,
                         const T* __restrict__ b, int64_t n, T* out) {
  constexpr int kLanes = kDotLanes<T>;
  if (n < kLanes) {
    out[0] = lane_dot(a0, b, n);
    out[1] = lane_dot(a1, b, n);
    out[2] = lane_dot(a2, b, n);
    out[3] = lane_dot(a3, b, n);
    return;
  }
  T acc0[kLanes] = {}, acc1[kLanes] = {}, acc2[kLanes] = {}, acc3[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T bk = b[k + l];
      acc0[l] += a0[k + l] * bk;
      acc1[l] += a1[k + l] * bk;
      acc2[l] += a2[k + l] * bk;
      acc3[l] += a3[k + l] * bk;
    }
  }
  T tail0 = T(0), tail1 = T(0), tail2 = T(0), tail3 = T(0);
  for (; k < n; ++k) {
    tail0 += a0[k] * b[k];
    tail1 += a1[k] * b[k];
    tail2 += a2[k] * b[k];
    tail3 += a3[k] * b[k];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      acc0[l] += acc0[l + width];
      acc1[l] += acc1[l + width];
      acc2[l] += acc2[l + width];
      acc3[l] += acc3[l + width];
    }
  }
  out[0] = acc0[0] + tail0;
  out[1] = acc1[0] + tail1;
  out[2] = acc2[0] + tail2;
  out[3] = acc3[0] + tail3;
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
