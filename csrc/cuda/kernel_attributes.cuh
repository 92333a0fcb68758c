// What the CUDA runtime says of a kernel on a device, asked once per kernel and device: the
// launchers size their grids and shared memory from it on every call.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include <cuda_runtime.h>

#include "launch.cuh"

namespace fusedtrain {
namespace cuda {

// ask() the first time (kernel, device) comes, its answer after that: one cache per call site
// (each lambda is a type of its own). ask() runs under the cache's lock, so that no two threads
// ask, or grant, at once.
template <typename Ask>
auto once_per_kernel_and_device(const void* kernel, int device, Ask&& ask) -> decltype(ask()) {
  using Answer = decltype(ask());
  static std::mutex mutex;
  // Never destroyed: static destructors run at exit, possibly after the CUDA runtime is gone.
  static auto* cache = new std::map<std::pair<const void*, int>, Answer>();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache->find({kernel, device});
  if (found != cache->end()) return found->second;
  const Answer answer = ask();
  cache->emplace(std::make_pair(kernel, device), answer);
  return answer;
}

// The dynamic shared memory one block of `kernel` may have on `device`: the opt-in maximum less
// the kernel's static shared memory, granted to the kernel once per device.
inline int64_t max_dynamic_shared_bytes(const void* kernel, int device) {
  return once_per_kernel_and_device(kernel, device, [&] {
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    cudaFuncAttributes attributes{};
    check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
    const int bytes = optin - static_cast<int>(attributes.sharedSizeBytes);
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
    return static_cast<int64_t>(bytes);
  });
}

}  // namespace cuda
}  // namespace fusedtrain
