// What every CUDA kernel file needs to launch: the current stream and launch errors through c10's
// device-generic interfaces (the kernels then build against the headers of any torch wheel,
// CPU-only ones included, which is how CI compiles them with nothing but nvcc), and runtime flags
// turned into template arguments.
#pragma once

#include <cstdint>
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

inline bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// A cooperative grid launched by launch(most), which sizes the grid to at most `most` blocks and
// returns cudaLaunchCooperativeKernel's answer. `most` starts at `coresident` and halves while the
// device refuses the grid as too large: a device shared with other work (MPS, green contexts) may
// hold fewer blocks than its multiprocessors suggest. Not while `stream` is being captured: the
// refused launch has already invalidated the capture, and a retry's error would name the capture
// instead of the cause.
template <typename Launch>
void launch_cooperative(const char* kernel, int64_t coresident, cudaStream_t stream, Launch&& launch) {
  for (int64_t most = coresident;; most /= 2) {
    TORCH_CHECK(most >= 1, "fusedtrain: the device runs no cooperative launch of ", kernel);
    const cudaError_t error = launch(most);
    if (error == cudaErrorCooperativeLaunchTooLarge && most > 1 && !capturing(stream)) {
      (void)cudaGetLastError();  // clears it, so that check_launch() sees only later errors
      continue;
    }
    TORCH_CHECK(error == cudaSuccess, "fusedtrain: ", kernel, " launch failed: ", cudaGetErrorString(error));
    return;
  }
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
