// CUDA implementations of fusedtrain::adam_step_ and fusedtrain::sgd_step_: the per-element
// math of csrc/include/fusedtrain/{adam,sgd}_math.h, applied by one launch per storage dtype
// over all tensors of the call (multi_tensor_apply.cuh). fp32 math for 16-bit tensors, 16-byte
// vector loads when every stream of a chunk is aligned, 64-bit indexing. grad_scale and
// found_inf are read on the device, so a GradScaler step needs no host synchronisation; the
// step counters are device tensors, read by each block and incremented by a second launch.
#include <algorithm>
#include <type_traits>

#include <cuda_runtime.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "../multi_tensor_checks.h"
#include "fusedtrain/adam_math.h"
#include "fusedtrain/dtype_convert.h"
#include "fusedtrain/sgd_math.h"
#include "multi_tensor_apply.cuh"
#include "optim_cuda.h"

namespace fusedtrain {
namespace cuda {
namespace {

// Loading and storing one element in each storage format (as csrc/cpu/element_loops.h).
struct Float32Format {
  using storage_t = float;
  using compute_t = float;
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
struct Float64Format {
  using storage_t = double;
  using compute_t = double;
  __device__ static double load(double x) { return x; }
  __device__ static double store(double x) { return x; }
};
struct BFloat16Format {
  using storage_t = uint16_t;
  using compute_t = float;
  __device__ static float load(uint16_t x) { return convert::bf16_to_float(x); }
  __device__ static uint16_t store(float x) { return convert::float_to_bf16(x); }
};
struct Float16Format {
  using storage_t = uint16_t;
  using compute_t = float;
  __device__ static float load(uint16_t x) { return convert::fp16_to_float(x); }
  __device__ static uint16_t store(float x) { return convert::float_to_fp16(x); }
};

// 16 bytes of one stream: what one thread loads per stream and iteration on the aligned path.
template <typename S>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(S);
  S v[kSize];
};

// Runs element(i, values...) over the chunk, where values[s][k] are the loaded elements of
// stream s; the functor writes back into the same arrays, which are then stored.
template <typename Fmt, int kStreams, typename Element>
__device__ void for_chunk(const TensorEntry& t, int64_t begin, const Element& element) {
  using S = typename Fmt::storage_t;
  using T = typename Fmt::compute_t;
  constexpr int kVec = Pack<S>::kSize;
  const int64_t end = begin + kChunkElements < t.numel ? begin + kChunkElements : t.numel;
  bool aligned = begin % kVec == 0;
  for (int s = 0; s < kStreams; ++s) aligned = aligned && t.data[s] % 16 == 0;
  if (aligned) {
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < end;
         i += static_cast<int64_t>(blockDim.x) * kVec) {
      if (i + kVec <= end) {
        Pack<S> packs[kStreams];
        for (int s = 0; s < kStreams; ++s) packs[s] = *reinterpret_cast<const Pack<S>*>(reinterpret_cast<S*>(t.data[s]) + i);
        for (int k = 0; k < kVec; ++k) {
          T v[kStreams];
          for (int s = 0; s < kStreams; ++s) v[s] = Fmt::load(packs[s].v[k]);
          element(v);
          for (int s = 0; s < kStreams; ++s) packs[s].v[k] = Fmt::store(v[s]);
        }
        for (int s = 0; s < kStreams; ++s) *reinterpret_cast<Pack<S>*>(reinterpret_cast<S*>(t.data[s]) + i) = packs[s];
      } else {
        for (int64_t j = i; j < end; ++j) {
          T v[kStreams];
          for (int s = 0; s < kStreams; ++s) v[s] = Fmt::load(reinterpret_cast<S*>(t.data[s])[j]);
          element(v);
          for (int s = 0; s < kStreams; ++s) reinterpret_cast<S*>(t.data[s])[j] = Fmt::store(v[s]);
        }
      }
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      T v[kStreams];
      for (int s = 0; s < kStreams; ++s) v[s] = Fmt::load(reinterpret_cast<S*>(t.data[s])[j]);
      element(v);
      for (int s = 0; s < kStreams; ++s) reinterpret_cast<S*>(t.data[s])[j] = Fmt::store(v[s]);
    }
  }
}

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, maximize;
};

// Streams: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]. The grad is stored back
// unscaled when a grad_scale is given, as torch's fused Adam does.
template <typename Fmt, bool kAmsgrad, bool kCoupledDecay>
__global__ void __launch_bounds__(kThreads)
adam_kernel(const TensorEntry* tensors, const ChunkEntry* chunks, AdamHyper h,
            const float* grad_scale, const float* found_inf) {
  using T = typename Fmt::compute_t;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry& t = tensors[c.tensor];
  const double step = static_cast<double>(*reinterpret_cast<const float*>(t.step)) + 1.0;
  const math::AdamCoeffs<T> coeffs = math::make_adam_coeffs<T>(
      h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled, h.maximize, step);
  const T scale = grad_scale != nullptr ? static_cast<T>(*grad_scale) : T(1);
  const bool unscale = grad_scale != nullptr;
  for_chunk<Fmt, kAmsgrad ? 5 : 4>(t, c.begin, [&](T* v) {
    const T g = unscale ? v[1] / scale : v[1];
    v[1] = g;
    if constexpr (kAmsgrad) {
      math::adam_element<true, kCoupledDecay>(v[0], g, v[2], v[3], v[4], coeffs);
    } else {
      T unused = T(0);
      math::adam_element<false, kCoupledDecay>(v[0], g, v[2], v[3], unused, coeffs);
    }
  });
}

// After the update kernel (same stream): each tensor's step counter += 1, unless skipped.
__global__ void increment_steps(const TensorEntry* tensors, int64_t n, const float* found_inf) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || (found_inf != nullptr && *found_inf != 0.0f)) return;
  *reinterpret_cast<float*>(tensors[i].step) += 1.0f;
}

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool maximize;
};

// Streams: param, grad[, momentum_buffer].
template <typename Fmt, bool kDecay, bool kMomentum, bool kFirstStep, bool kNesterov>
__global__ void __launch_bounds__(kThreads)
sgd_kernel(const TensorEntry* tensors, const ChunkEntry* chunks, SgdHyper h,
           const float* grad_scale, const float* found_inf) {
  using T = typename Fmt::compute_t;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry& t = tensors[c.tensor];
  const math::SgdCoeffs<T> coeffs =
      math::make_sgd_coeffs<T>(h.lr, h.momentum, h.dampening, h.weight_decay, h.maximize);
  const T scale = grad_scale != nullptr ? static_cast<T>(*grad_scale) : T(1);
  const bool unscale = grad_scale != nullptr;
  for_chunk<Fmt, kMomentum ? 3 : 2>(t, c.begin, [&](T* v) {
    const T g = unscale ? v[1] / scale : v[1];
    v[1] = g;
    if constexpr (kMomentum) {
      math::sgd_element<kDecay, true, kFirstStep, kNesterov>(v[0], g, v[2], coeffs);
    } else {
      T unused = T(0);
      math::sgd_element<kDecay, false, kFirstStep, kNesterov>(v[0], g, unused, coeffs);
    }
  });
}

template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
void with_format(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kDouble: f(Float64Format{}); break;
    case at::kBFloat16: f(BFloat16Format{}); break;
    case at::kHalf: f(Float16Format{}); break;
    default: f(Float32Format{}); break;
  }
}

const float* optional_float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// The kernels read them as float.
void check_float32_amp_tensors(const char* op, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
  for (const auto* t : {&grad_scale, &found_inf}) {
    TORCH_CHECK_TYPE(!t->has_value() || (*t)->scalar_type() == at::kFloat, op,
                     ": grad_scale and found_inf must be float32 on CUDA");
  }
}

// Indices of the call's tensors per dtype: one launch each.
std::vector<std::pair<at::ScalarType, std::vector<size_t>>> by_dtype(at::TensorList params) {
  std::vector<std::pair<at::ScalarType, std::vector<size_t>>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return g.first == params[i].scalar_type(); });
    if (it == groups.end()) {
      groups.push_back({params[i].scalar_type(), {i}});
    } else {
      it->second.push_back(i);
    }
  }
  return groups;
}

// The current stream and launch errors through c10's device-generic interfaces: the CUDA
// kernels then build against the headers of any torch wheel, CPU-only ones included, which is
// how CI compiles them without a GPU toolkit beyond nvcc.
cudaStream_t current_stream(at::Device device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "fusedtrain CUDA kernel launch failed: ", cudaGetErrorString(error));
}

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "adam_step_";
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  check_adam_step_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad,
                       grad_scale, found_inf, device);
  check_float32_amp_tensors(kOp, grad_scale, found_inf);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_TYPE(steps[i].scalar_type() == at::kFloat, kOp, ": steps[", i,
                     "] must be float32 on CUDA");
    for (const at::Tensor* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK_VALUE(t->is_contiguous(), kOp, ": tensors must be contiguous on CUDA (index ", i, ")");
    }
  }
  const c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, decoupled, maximize};
  for (const auto& [dtype, indices] : by_dtype(params)) {
    std::vector<TensorEntry> entries;
    for (size_t i : indices) {
      entries.push_back({{address(params[i]), address(grads[i]), address(exp_avgs[i]),
                          address(exp_avg_sqs[i]), amsgrad ? address(max_exp_avg_sqs[i]) : 0},
                         address(steps[i]),
                         params[i].numel()});
    }
    const LaunchTables tables = make_tables(entries, device);
    if (tables.num_chunks > 0) {
      with_format(dtype, [&](auto fmt) {
        with_flag(amsgrad, [&](auto ams) {
          with_flag(weight_decay != 0.0 && !decoupled, [&](auto coupled) {
            adam_kernel<decltype(fmt), decltype(ams)::value, decltype(coupled)::value>
                <<<tables.num_chunks, kThreads, 0, stream>>>(tables.tensors, tables.chunks, h,
                                                             optional_float_ptr(grad_scale),
                                                             optional_float_ptr(found_inf));
          });
        });
      });
      check_launch();
    }
    const int64_t count = static_cast<int64_t>(entries.size());
    increment_steps<<<(count + 255) / 256, 256, 0, stream>>>(tables.tensors, count,
                                                             optional_float_ptr(found_inf));
    check_launch();
  }
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool first_step,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "sgd_step_";
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  const bool has_momentum = momentum != 0.0;
  check_sgd_step_args(params, grads, momentum_buffers, has_momentum, grad_scale, found_inf, device);
  check_float32_amp_tensors(kOp, grad_scale, found_inf);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(params[i].is_contiguous() && grads[i].is_contiguous() &&
                          (!has_momentum || momentum_buffers[i].is_contiguous()),
                      kOp, ": tensors must be contiguous on CUDA (index ", i, ")");
  }
  const c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const SgdHyper h{lr, momentum, dampening, weight_decay, maximize};
  for (const auto& [dtype, indices] : by_dtype(params)) {
    std::vector<TensorEntry> entries;
    for (size_t i : indices) {
      entries.push_back({{address(params[i]), address(grads[i]),
                          has_momentum ? address(momentum_buffers[i]) : 0, 0, 0},
                         0,
                         params[i].numel()});
    }
    const LaunchTables tables = make_tables(entries, device);
    if (tables.num_chunks == 0) continue;
    with_format(dtype, [&](auto fmt) {
      using Fmt = decltype(fmt);
      with_flag(weight_decay != 0.0, [&](auto decay) {
        constexpr bool kDecay = decltype(decay)::value;
        if (!has_momentum) {
          sgd_kernel<Fmt, kDecay, false, false, false><<<tables.num_chunks, kThreads, 0, stream>>>(
              tables.tensors, tables.chunks, h, optional_float_ptr(grad_scale),
              optional_float_ptr(found_inf));
          return;
        }
        with_flag(first_step, [&](auto first) {
          with_flag(nesterov, [&](auto nest) {
            sgd_kernel<Fmt, kDecay, true, decltype(first)::value, decltype(nest)::value>
                <<<tables.num_chunks, kThreads, 0, stream>>>(tables.tensors, tables.chunks, h,
                                                             optional_float_ptr(grad_scale),
                                                             optional_float_ptr(found_inf));
          });
        });
      });
    });
    check_launch();
  }
}

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
}

}  // namespace cuda
}  // namespace fusedtrain
