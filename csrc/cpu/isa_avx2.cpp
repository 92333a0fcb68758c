// The element loops as AVX2 code, 256-bit vectors.
#include "isa_target.h"

#if defined(__x86_64__)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FT_ISA_NAMESPACE avx2
#include "element_loops.h"
#include "linear_mse_loops.h"
#pragma GCC pop_options

namespace fusedtrain {
namespace cpu {
const IsaKernels kAvx2Kernels = {
    "avx2",
    avx2::adam_range,
    avx2::sgd_range,
    avx2::linear_mse_rows<float>,
    avx2::linear_mse_rows<double>,
    avx2::residual_rows<float>,
    avx2::residual_rows<double>,
};
}  // namespace cpu
}  // namespace fusedtrain
#endif  // defined(__x86_64__)
