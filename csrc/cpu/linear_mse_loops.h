// The row loops of the linear + MSE kernels, compiled once per instruction set like
// element_loops.h (included after it, inside the same target region and namespace macro).
#ifndef FT_ISA_NAMESPACE
#error "define FT_ISA_NAMESPACE before including linear_mse_loops.h"
#endif

namespace fusedtrain {
namespace cpu {
namespace FT_ISA_NAMESPACE {

// Rows go in blocks of kRowBlock: the dot products of a block share each load of the weight,
// and the weight-gradient update loads and stores each grad_weight element once per block
// instead of once per row; loads and stores are what bound the loop (x itself streams through
// once; a block's rows stay in L1 between the dot products and the update).
constexpr int64_t kRowBlock = 4;

template <typename T>
void linear_mse_rows(const LinearMseRows<T>& a, int64_t row_begin, int64_t row_end,
                     double* loss, T* grad_weight, T* grad_bias) {
  T g[kRowBlock][kMaxFusedOut];
  double rows_loss = 0.0;
  for (int64_t first = row_begin; first < row_end; first += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, row_end - first);
    const T* x = a.x + first * a.in;
    const T* y = a.target + first * a.out;
    for (int64_t o = 0; o < a.out; ++o) {
      const T* w = a.weight + o * a.in;
      T pred[kRowBlock];
      if (rows == kRowBlock) {
        math::lane_dot4(x, x + a.in, x + 2 * a.in, x + 3 * a.in, w, a.in, pred);
      } else {
        for (int64_t r = 0; r < rows; ++r) pred[r] = math::lane_dot(x + r * a.in, w, a.in);
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (a.bias != nullptr) pred[r] += a.bias[o];
        const T residual = pred[r] - y[r * a.out + o];
        rows_loss += static_cast<double>(residual) * static_cast<double>(residual);
        g[r][o] = math::mse_grad(residual, a.two_over_count);
      }
    }
    if (a.need_params_grad) {
      for (int64_t o = 0; o < a.out; ++o) {
        T* __restrict__ gw = grad_weight + o * a.in;
        if (rows == kRowBlock) {
          const T g0 = g[0][o], g1 = g[1][o], g2 = g[2][o], g3 = g[3][o];
          const T* __restrict__ x0 = x;
          const T* __restrict__ x1 = x + a.in;
          const T* __restrict__ x2 = x + 2 * a.in;
          const T* __restrict__ x3 = x + 3 * a.in;
          for (int64_t k = 0; k < a.in; ++k) {
            gw[k] += ((g0 * x0[k] + g1 * x1[k]) + g2 * x2[k]) + g3 * x3[k];
          }
        } else {
          for (int64_t r = 0; r < rows; ++r) math::axpy(gw, g[r][o], x + r * a.in, a.in);
        }
        if (grad_bias != nullptr) {
          for (int64_t r = 0; r < rows; ++r) grad_bias[o] += g[r][o];
        }
      }
    }
    if (a.grad_x != nullptr) {
      for (int64_t r = 0; r < rows; ++r) {
        T* gx = a.grad_x + (first + r) * a.in;
        for (int64_t k = 0; k < a.in; ++k) gx[k] = T(0);
        for (int64_t o = 0; o < a.out; ++o) math::axpy(gx, g[r][o], a.weight + o * a.in, a.in);
      }
    }
  }
  *loss += rows_loss;
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
