// The element loops for the build's baseline target (SSE2 on x86-64, or any other CPU).
#include "isa_target.h"

#define FT_ISA_NAMESPACE baseline
#include "element_loops.h"
#include "linear_mse_loops.h"

namespace fusedtrain {
namespace cpu {
const IsaKernels kBaselineKernels = {
    "baseline",
    baseline::adam_range,
    baseline::sgd_range,
    baseline::linear_mse_rows<float>,
    baseline::linear_mse_rows<double>,
    baseline::residual_rows<float>,
    baseline::residual_rows<double>,
};
}  // namespace cpu
}  // namespace fusedtrain
