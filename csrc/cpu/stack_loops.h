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

using math::with_activation;

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

// C(m, n) = init(m, n) + sum over p = 0, 1, ..., P-1 of A(m, p) B(p, n), each element summed in
// that order (so every instruction set rounds alike), where init is a bias row, C's own value
// (accumulate) or 0. B's n dimension is contiguous; A and C are addressed by strides. Tiles of
// kTileRows x kTileCols outputs stay in registers while p runs, so the short rows of small layers
// cost no load and store of C per p: the loop over a tile's columns has a constant length, which
// the compiler turns into whole vectors.
template <typename T>
struct SmallGemm {
  int64_t rows, cols, depth;        // M, N, P
  const T* a; int64_t a_row, a_depth;  // A(m, p) = a[m * a_row + p * a_depth]
  const T* b; int64_t b_depth;         // B(p, n) = b[p * b_depth + n]
  T* c; int64_t c_row, c_col;          // C(m, n) = c[m * c_row + n * c_col]
  const T* init_row;                   // init(m, n) = init_row[n], if not null
  bool accumulate;                     // else init(m, n) = C(m, n) if accumulate, else 0
};

constexpr int64_t kTileRows = 4;

// A register of the instruction set (FT_VECTOR_BYTES, set by each isa_*.cpp) as a GCC vector of
// T: its arithmetic is elementwise, rounding as the scalar code does.
template <typename T>
struct Register;
template <>
struct Register<float> { typedef float type __attribute__((vector_size(FT_VECTOR_BYTES))); };
template <>
struct Register<double> { typedef double type __attribute__((vector_size(FT_VECTOR_BYTES))); };
// A tile is kTileRows rows of two registers.
template <typename T>
constexpr int64_t kTileCols = 2 * FT_VECTOR_BYTES / sizeof(T);

template <typename T>
T gemm_init(const SmallGemm<T>& g, int64_t m, int64_t n) {
  return g.init_row != nullptr ? g.init_row[n] : g.accumulate ? g.c[m * g.c_row + n * g.c_col] : T(0);
}

// The tile of kRows rows from m0 and kTileCols columns from n0 of C.
template <typename T, int64_t kRows>
void small_gemm_tile(const SmallGemm<T>& g, int64_t m0, int64_t n0) {
  using V = typename Register<T>::type;
  constexpr int64_t kLanes = FT_VECTOR_BYTES / sizeof(T);
  V lo[kRows], hi[kRows];
  const T* a_rows[kRows];
  for (int64_t i = 0; i < kRows; ++i) {
    a_rows[i] = g.a + (m0 + i) * g.a_row;
    for (int64_t j = 0; j < kLanes; ++j) {
      lo[i][j] = gemm_init(g, m0 + i, n0 + j);
      hi[i][j] = gemm_init(g, m0 + i, n0 + kLanes + j);
    }
  }
  const T* b = g.b + n0;
  for (int64_t p = 0; p < g.depth; ++p, b += g.b_depth) {
    V b_lo, b_hi;
    std::memcpy(&b_lo, b, sizeof(V));
    std::memcpy(&b_hi, b + kLanes, sizeof(V));
    const int64_t ap = p * g.a_depth;
    for (int64_t i = 0; i < kRows; ++i) {
      const T am = a_rows[i][ap];
      lo[i] += am * b_lo;
      hi[i] += am * b_hi;
    }
  }
  for (int64_t i = 0; i < kRows; ++i) {
    T* c = g.c + (m0 + i) * g.c_row + n0 * g.c_col;
    for (int64_t j = 0; j < kLanes; ++j) {
      c[j * g.c_col] = lo[i][j];
      c[(kLanes + j) * g.c_col] = hi[i][j];
    }
  }
}

template <typename T>
void small_gemm(const SmallGemm<T>& g) {
  constexpr int64_t kCols = kTileCols<T>;
  for (int64_t m0 = 0; m0 < g.rows; m0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, g.rows - m0);
    int64_t n0 = 0;
    for (; n0 + kCols <= g.cols; n0 += kCols) {
      switch (rows) {
        case 4: small_gemm_tile<T, 4>(g, m0, n0); break;
        case 3: small_gemm_tile<T, 3>(g, m0, n0); break;
        case 2: small_gemm_tile<T, 2>(g, m0, n0); break;
        default: small_gemm_tile<T, 1>(g, m0, n0); break;
      }
    }
    // The last columns, fewer than a tile: the same sums, one output at a time.
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t n = n0; n < g.cols; ++n) {
        T sum = gemm_init(g, m0 + i, n);
        for (int64_t p = 0; p < g.depth; ++p) sum += g.a[(m0 + i) * g.a_row + p * g.a_depth] * g.b[p * g.b_depth + n];
        g.c[(m0 + i) * g.c_row + n * g.c_col] = sum;
      }
    }
  }
}

// z = a W^T + b (wt = W^T, in x out): z starts at b and adds a_k W^T_k for k = 0, 1, ...;
// then y = act(z) (y == z for the identity).
template <typename T>
void stack_forward(const StackLayer<T>& l, const T* a, int64_t rows, T* z, T* y) {
  small_gemm(SmallGemm<T>{rows, l.out, l.in, a, l.in, 1, l.weight_t, l.out, z, l.out, 1, l.bias, false});
  stack_activate(l, z, rows * l.out, y);
}

// grad_weight += g^T a, summed over the rows in order, and grad_bias += the column sums of g (g:
// rows x out, a: rows x in). The tiles run along in, or along out when in is the narrower.
template <typename T>
void stack_weight_grad(const StackLayer<T>& l, const T* g, const T* a, int64_t rows,
                       T* grad_weight, T* grad_bias) {
  if (l.in >= kTileCols<T> || l.in >= l.out) {
    small_gemm(SmallGemm<T>{l.out, l.in, rows, g, 1, l.out, a, l.in, grad_weight, l.in, 1, nullptr, true});
  } else {
    small_gemm(SmallGemm<T>{l.in, l.out, rows, a, 1, l.in, g, l.out, grad_weight, 1, l.in, nullptr, true});
  }
  if (grad_bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict__ gr = g + r * l.out;
      for (int64_t j = 0; j < l.out; ++j) grad_bias[j] += gr[j];
    }
  }
}

// The gradient of the layer below's pre-activation: g_below = (g W) * act'(z_below), where the
// layer below has `below` as its description (its activation), z_below and y_below its outputs.
template <typename T>
void stack_input_grad(const StackLayer<T>& l, const T* g, int64_t rows, const StackLayer<T>& below,
                      const T* z_below, const T* y_below, T* g_below) {
  small_gemm(SmallGemm<T>{rows, l.in, l.out, g, l.out, 1, l.weight, l.in, g_below, l.in, 1, nullptr, false});
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
