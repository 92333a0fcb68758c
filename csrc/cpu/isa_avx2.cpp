// The element loops as AVX2 code, 256-bit vectors.
#include "isa_target.h"

#if defined(__x86_64__)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FT_ISA_NAMESPACE avx2
#include "element_loops.h"
#include "linear_mse_loops.h"
#define FT_VECTOR_BYTES 32  // the registers the stack loops tile with
#include "stack_loops.h"
#undef FT_VECTOR_BYTES
#pragma GCC pop_options

namespace fusedtrain {
namespace cpu {
// The tables are filled by name: a kernel left out is a compile error (isa_target.h makes
// -Wmissing-field-initializers one), and none can land in another's place.
template <typename T>
constexpr StackKernels<T> avx2_stack_kernels() {
  return {
      .forward = avx2::stack_forward<T>,
      .activate = avx2::stack_activate<T>,
      .weight_grad = avx2::stack_weight_grad<T>,
      .input_grad = avx2::stack_input_grad<T>,
      .scale_by_derivative = avx2::stack_scale_by_derivative<T>,
      .loss = avx2::stack_loss<T>,
  };
}

const IsaKernels kAvx2Kernels = {
    .name = "avx2",
    .adam = avx2::adam_range,
    .sgd = avx2::sgd_range,
    .linear_mse_f32 = avx2::linear_mse_rows<float>,
    .linear_mse_f64 = avx2::linear_mse_rows<double>,
    .residual_f32 = avx2::residual_rows<float>,
    .residual_f64 = avx2::residual_rows<double>,
    .stack_f32 = avx2_stack_kernels<float>(),
    .stack_f64 = avx2_stack_kernels<double>(),
};
}  // namespace cpu
}  // namespace fusedtrain
#endif  // defined(__x86_64__)
