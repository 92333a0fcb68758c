// The element loops for the build's baseline target (SSE2 on x86-64, or any other CPU).
#include "isa_target.h"

#define FT_ISA_NAMESPACE baseline
#include "element_loops.h"
#include "linear_mse_loops.h"
#define FT_VECTOR_BYTES 16  // the registers the stack loops tile with
#include "stack_loops.h"
#undef FT_VECTOR_BYTES

namespace fusedtrain {
namespace cpu {
// The tables are filled by name: a kernel left out is a compile error (isa_target.h makes
// -Wmissing-field-initializers one), and none can land in another's place.
template <typename T>
constexpr StackKernels<T> baseline_stack_kernels() {
  return {
      .forward = baseline::stack_forward<T>,
      .activate = baseline::stack_activate<T>,
      .weight_grad = baseline::stack_weight_grad<T>,
      .input_grad = baseline::stack_input_grad<T>,
      .scale_by_derivative = baseline::stack_scale_by_derivative<T>,
      .loss = baseline::stack_loss<T>,
  };
}

const IsaKernels kBaselineKernels = {
    .name = "baseline",
    .adam = baseline::adam_range,
    .sgd = baseline::sgd_range,
    .linear_mse_f32 = baseline::linear_mse_rows<float>,
    .linear_mse_f64 = baseline::linear_mse_rows<double>,
    .residual_f32 = baseline::residual_rows<float>,
    .residual_f64 = baseline::residual_rows<double>,
    .stack_f32 = baseline_stack_kernels<float>(),
    .stack_f64 = baseline_stack_kernels<double>(),
};
}  // namespace cpu
}  // namespace fusedtrain
