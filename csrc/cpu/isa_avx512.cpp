// The element loops as AVX-512 code (F, BW, VL, DQ), 512-bit vectors.
#include "isa_target.h"

#if defined(__x86_64__)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define FT_ISA_NAMESPACE avx512
#include "element_loops.h"
#include "linear_mse_loops.h"
#pragma GCC pop_options

namespace fusedtrain {
namespace cpu {
const IsaKernels kAvx512Kernels = {
    "avx512",
    avx512::adam_range,
    avx512::sgd_range,
    avx512::linear_mse_rows<float>,
    avx512::linear_mse_rows<double>,
    avx512::residual_rows<float>,
    avx512::residual_rows<double>,
};
}  // namespace cpu
}  // namespace fusedtrain
#endif  // defined(__x86_64__)
