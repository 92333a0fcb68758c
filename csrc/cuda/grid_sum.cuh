// Sums shared by the cooperative CUDA kernels (linear_mse_cuda.cu, stack_narrow_cuda.cu): a
// warp's sum and the grid-wide sum of per-block parts, both in a fixed order, so that results
// do not depend on timing.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fusedtrain {
namespace cuda {

// The sum of v over a warp's lanes, in lane 0 (a fixed shuffle tree).
template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// For every element e of [0, count): f(e, the sum of parts[p * count + e] over p in [0, parts))
// on one lane, the work spread over the whole grid. `lanes` lanes of a warp share an element:
// lane j adds parts j, j + lanes, ... in order, then a fixed shuffle tree adds the lanes, so the
// sum is the same on every run. Other blocks wrote `parts`: read through L2, as this SM's L1
// may hold older lines of them. Every lane of a warp runs the loop alike, as the shuffles need.
template <typename T, typename F>
__device__ __forceinline__ void grid_sum_parts(const T* parts, int64_t count, int64_t num_parts,
                                               int lanes, F&& f) {
  const int lane = threadIdx.x % 32;
  const int64_t per_warp = 32 / lanes;
  const int64_t grid_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t grid_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t base = grid_warp * per_warp; base < count; base += grid_warps * per_warp) {
    const int64_t e = base + lane / lanes;
    T sum = T(0);
    if (e < count) {
      for (int64_t p = lane % lanes; p < num_parts; p += lanes) sum += __ldcg(parts + p * count + e);
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (e < count && lane % lanes == 0) f(e, sum);
  }
}

}  // namespace cuda
}  // namespace fusedtrain
