// What every CUDA kernel file needs to launch: the current stream and launch errors through c10's
// device-generic interfaces (the kernels then build against the headers of any torch wheel,
// CPU-only ones included, which is how CI compiles them with nothing but nvcc), and runtime flags
// turned into template arguments.
#pragma once

#include <type_traits>

#include <cuda_runtime.h>

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

namespace fusedtrain {
namespace cuda {

inline c10::Stream current_stream(c10::Device device) {
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
}

inline cudaStream_t native(const c10::Stream& stream) {
  return static_cast<cudaStream_t>(stream.native_handle());
}

inline void check_cuda(cudaError_t error, const char* call) {
  TORCH_CHECK(error == cudaSuccess, "fusedtrain: ", call, " failed: ", cudaGetErrorString(error));
}

inline void check_launch() {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "fusedtrain CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// f(std::true_type{}) or f(std::false_type{}).
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace cuda
}  // namespace fusedtrain
