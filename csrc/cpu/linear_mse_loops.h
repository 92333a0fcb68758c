// The row loops of the linear + MSE kernels, compiled once per instruction set like
// element_loops.h (included after it, inside the same target region and namespace macro).
#ifndef FT_ISA_NAMESPACE
#error "define FT_ISA_NAMESPACE before including linear_mse_loops.h"
#endif

namespace fusedtrain {
namespace cpu {
namespace FT_ISA_NAMESPACE {

template <typename T>
void linear_mse_rows(const LinearMseRows<T>& a, int64_t row_begin, int64_t row_end,
                     double* loss, T* grad_weight, T* grad_bias) {
  T g[kMaxFusedOut];
  double row_loss = 0.0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* x = a.x + i * a.in;
    const T* y = a.target + i * a.out;
    for (int64_t o = 0; o < a.out; ++o) {
      T pred = math::lane_dot(x, a.weight + o * a.in, a.in);
      if (a.bias != nullptr) pred += a.bias[o];
      const T r = pred - y[o];
      row_loss += static_cast<double>(r) * static_cast<double>(r);
      g[o] = math::mse_grad(r, a.two_over_count);
    }
    if (a.need_params_grad) {
      for (int64_t o = 0; o < a.out; ++o) {
        math::axpy(grad_weight + o * a.in, g[o], x, a.in);
        if (grad_bias != nullptr) grad_bias[o] += g[o];
      }
    }
    if (a.grad_x != nullptr) {
      T* gx = a.grad_x + i * a.in;
      for (int64_t k = 0; k < a.in; ++k) gx[k] = T(0);
      for (int64_t o = 0; o < a.out; ++o) math::axpy(gx, g[o], a.weight + o * a.in, a.in);
    }
  }
  *loss += row_loss;
}

template <typename T>
void residual_rows(const ResidualRows<T>& a, int64_t row_begin, int64_t row_end, double* loss,
                   T* grad_bias) {
  double rows_loss = 0.0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    T* __restrict__ pred = a.pred + i * a.out;
    const T* __restrict__ y = a.target + i * a.out;
    T row_loss = T(0);
    for (int64_t o = 0; o < a.out; ++o) {
      const T r = pred[o] - y[o];
      row_loss += r * r;
      pred[o] = math::mse_grad(r, a.two_over_count);
    }
    rows_loss += static_cast<double>(row_loss);
    if (grad_bias != nullptr) {
      for (int64_t o = 0; o < a.out; ++o) grad_bias[o] += pred[o];
    }
  }
  *loss += rows_loss;
}

}  // namespace FT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedtrain
