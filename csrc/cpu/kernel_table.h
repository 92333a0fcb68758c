// The interface between the CPU launchers (which know ATen) and the per-instruction-set element
// loops (which know only plain pointers): one table of range functions per instruction set.
//
// This header is included before the `#pragma GCC target` of each instruction-set translation
// unit, so it must stay free of anything but plain data and the math headers (whose functions
// have internal linkage, see macros.h).
#pragma once

#include <cstdint>

#include "fusedtrain/adam_math.h"
#include "fusedtrain/linear_mse_math.h"
#include "fusedtrain/sgd_math.h"
#include "fusedtrain/stack_math.h"

namespace fusedtrain {
namespace cpu {

// How a tensor's elements are stored; the math runs in fp32 for the 16-bit formats.
enum class Storage : uint8_t { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Options that are the same for every tensor of one call.
struct AdamOptions {
  bool amsgrad;
  bool coupled_decay;   // Adam's L2 term present (weight_decay != 0 and not decoupled)
  bool has_grad_scale;  // divide grads by grad_scale and store them back, as torch's fused Adam
  double grad_scale;
};

// One tensor of the call: its element pointers (all laid out like the param) and the
// coefficients that depend on its step count.
struct AdamTensor {
  Storage storage;
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null unless amsgrad
  math::AdamCoeffs<float> coeffs_f32;
  math::AdamCoeffs<double> coeffs_f64;
};

struct SgdOptions {
  bool weight_decay;
  bool momentum;
  bool first_step;
  bool nesterov;
  bool has_grad_scale;
  double grad_scale;
  math::SgdCoeffs<float> coeffs_f32;
  math::SgdCoeffs<double> coeffs_f64;
};

struct SgdTensor {
  Storage storage;
  void* param;
  void* grad;
  void* momentum_buffer;  // null without momentum
};

// Linear + MSE over rows of x (all contiguous, row-major). Each call adds its rows' squared
// residuals to *loss and their gradients to grad_weight/grad_bias (thread-private
// accumulators); grad_x rows are written, not accumulated.
template <typename T>
struct LinearMseRows {
  const T* x;            // N x in
  const T* weight;       // out x in
  const T* bias;         // out, or null
  const T* target;       // N x out
  int64_t in;
  int64_t out;
  T two_over_count;      // 2 / (N * out) for "mean", 2 for "sum"
  bool need_params_grad;  // false: loss only (and grad_x if asked)
  T* grad_x;             // N x in, or null
};
constexpr int64_t kMaxFusedOut = 16;  // larger outputs go through GEMMs (see linear_mse_cpu.cpp)

// Large outputs: pred (N x out) was computed by a GEMM; turn rows of it into dloss/dpred in
// place, adding squared residuals to *loss and column sums to grad_bias (may be null).
template <typename T>
struct ResidualRows {
  T* pred;
  const T* target;
  int64_t out;
  T two_over_count;
};

// One layer of a stack as the small-layer loops see it (csrc/cpu/stack_loops.h).
template <typename T>
struct StackLayer {
  const T* weight;    // out x in
  const T* weight_t;  // in x out: the weight transposed, whose rows the forward adds up
  const T* bias;      // out, or null
  int64_t in;
  int64_t out;
  math::Activation activation;
  T activation_param;  // LeakyReLU's negative slope
};

// The loss head of a stack: scale is the reduction's 1/R (1 under "sum").
template <typename T>
struct StackLoss {
  math::Loss loss;
  T loss_param;  // SmoothL1's beta, Huber's delta
  T scale;
  int64_t ignore_index;
  T label_smoothing;
};

// The loops of a stack's step on rows of a batch (row-major; see stack_loops.h for each).
template <typename T>
struct StackKernels {
  void (*forward)(const StackLayer<T>&, const T* a, int64_t rows, T* z, T* y);
  void (*activate)(const StackLayer<T>&, const T* z, int64_t count, T* y);
  void (*weight_grad)(const StackLayer<T>&, const T* g, const T* a, int64_t rows, T* grad_weight,
                      T* grad_bias);
  void (*input_grad)(const StackLayer<T>&, const T* g, int64_t rows, const StackLayer<T>& below,
                     const T* z_below, const T* y_below, T* g_below);
  void (*scale_by_derivative)(const StackLayer<T>&, const T* z, const T* y, int64_t count, T* g);
  double (*loss)(const StackLoss<T>&, const StackLayer<T>& top, const T* z, const T* y,
                 const void* target, int64_t rows, T* g);
};

// Update elements [begin, end) of one tensor.
using AdamRangeFn = void (*)(const AdamOptions&, const AdamTensor&, int64_t begin, int64_t end);
using SgdRangeFn = void (*)(const SgdOptions&, const SgdTensor&, int64_t begin, int64_t end);

template <typename T>
using LinearMseRowsFn = void (*)(const LinearMseRows<T>&, int64_t row_begin, int64_t row_end,
                                 double* loss, T* grad_weight, T* grad_bias);
template <typename T>
using ResidualRowsFn = void (*)(const ResidualRows<T>&, int64_t row_begin, int64_t row_end,
                                double* loss, T* grad_bias);

struct IsaKernels {
  const char* name;
  AdamRangeFn adam;
  SgdRangeFn sgd;
  LinearMseRowsFn<float> linear_mse_f32;
  LinearMseRowsFn<double> linear_mse_f64;
  ResidualRowsFn<float> residual_f32;
  ResidualRowsFn<double> residual_f64;
  StackKernels<float> stack_f32;
  StackKernels<double> stack_f64;
};

// Defined in isa_avx512.cpp, isa_avx2.cpp and isa_baseline.cpp from the same element loops.
extern const IsaKernels kAvx512Kernels;
extern const IsaKernels kAvx2Kernels;
extern const IsaKernels kBaselineKernels;

}  // namespace cpu
}  // namespace fusedtrain
