// CUDA implementations of fusedtrain::adam_step_ and fusedtrain::sgd_step_: the per-element
// math of csrc/include/fusedtrain/{adam,sgd}_math.h, applied by one sequence of launches per
// storage dtype over all tensors of the call, their addresses in the kernel arguments
// (multi_tensor_apply.cuh). fp32 math for 16-bit tensors, 16-byte vector loads when every stream
// of a chunk is aligned, 64-bit indexing. Everything that may change between steps is read on
// the device: grad_scale, found_inf, lr_tensor and the step counters, which a last launch
// increments after every update launch has read them. A step therefore neither allocates,
// copies nor synchronises, and can be captured in a CUDA graph.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../multi_tensor_checks.h"
#include "fusedtrain/adam_math.h"
#include "fusedtrain/dtype_convert.h"
#include "fusedtrain/sgd_math.h"
#include "launch.cuh"
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

// The chunk that block blockIdx.x runs: each stream's pointer to its first element, its length
// and the slot of its tensor in the table.
template <typename S, int kStreams>
struct Chunk {
  S* data[kStreams];
  int64_t size;
  int slot;
};

template <typename S, int kStreams, bool kWithStep>
__device__ __forceinline__ Chunk<S, kStreams> block_chunk(const ChunkTable<kStreams, kWithStep>& table) {
  const int b = static_cast<int>(blockIdx.x);
  Chunk<S, kStreams> c;
  c.slot = table.chunk_tensor[b];
  c.size = chunk_size(table, b);
  const int64_t begin = chunk_begin(table, b);
  for (int s = 0; s < kStreams; ++s) c.data[s] = static_cast<S*>(table.data[s][c.slot]) + begin;
  return c;
}

// Which streams of a chunk a kernel loads and which it stores: bit s stands for stream s.
constexpr uint32_t stream_bit(int s) { return 1u << s; }
template <int kStreams>
constexpr uint32_t kAllStreams = (1u << kStreams) - 1u;

// Runs element(values) over the chunk, where values[s] is the loaded element of stream s (0 for
// a stream not in kLoaded); the functor writes back into the array, and the streams in kStored
// are stored. A stream is stored only where the kernel writes it: every store costs bandwidth,
// and storing back what was loaded is not a no-op for 16-bit NaNs, whose payload the conversion
// through fp32 does not keep. 16-byte loads when every stream of the chunk is 16-byte aligned (a
// view with a storage offset may not be).
template <typename Fmt, int kStreams, uint32_t kLoaded, uint32_t kStored, typename Element>
__device__ __forceinline__ void for_chunk(const Chunk<typename Fmt::storage_t, kStreams>& c,
                                          const Element& element) {
  using S = typename Fmt::storage_t;
  using T = typename Fmt::compute_t;
  constexpr int kVec = Pack<S>::kSize;
  auto one_element = [&](int64_t j) {
    T v[kStreams];
    for (int s = 0; s < kStreams; ++s) v[s] = (kLoaded & stream_bit(s)) ? Fmt::load(c.data[s][j]) : T(0);
    element(v);
    for (int s = 0; s < kStreams; ++s) {
      if (kStored & stream_bit(s)) c.data[s][j] = Fmt::store(v[s]);
    }
  };
  bool aligned = true;
  for (int s = 0; s < kStreams; ++s) aligned = aligned && reinterpret_cast<uintptr_t>(c.data[s]) % 16 == 0;
  if (aligned) {
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < c.size;
         i += static_cast<int64_t>(blockDim.x) * kVec) {
      if (i + kVec <= c.size) {
        Pack<S> packs[kStreams];
        for (int s = 0; s < kStreams; ++s) {
          if (kLoaded & stream_bit(s)) packs[s] = *reinterpret_cast<const Pack<S>*>(c.data[s] + i);
        }
        for (int k = 0; k < kVec; ++k) {
          T v[kStreams];
          for (int s = 0; s < kStreams; ++s) v[s] = (kLoaded & stream_bit(s)) ? Fmt::load(packs[s].v[k]) : T(0);
          element(v);
          for (int s = 0; s < kStreams; ++s) packs[s].v[k] = Fmt::store(v[s]);
        }
        for (int s = 0; s < kStreams; ++s) {
          if (kStored & stream_bit(s)) *reinterpret_cast<Pack<S>*>(c.data[s] + i) = packs[s];
        }
      } else {
        for (int64_t j = i; j < c.size; ++j) one_element(j);
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < c.size; j += blockDim.x) one_element(j);
  }
}

// The learning rate: the float argument, or the element of lr_tensor, read by every block so
// that a captured graph follows in-place changes to it.
struct LearningRate {
  double value;
  const void* tensor;
  bool tensor_is_double;

  __device__ double read() const {
    if (tensor == nullptr) return value;
    return tensor_is_double ? *static_cast<const double*>(tensor)
                            : static_cast<double>(*static_cast<const float*>(tensor));
  }
};

struct AdamArgs {
  LearningRate lr;
  double beta1, beta2, eps, weight_decay;
  bool decoupled, maximize;
  const float* grad_scale;
  const float* found_inf;
};

// Streams: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq].
template <bool kAmsgrad>
using AdamTable = ChunkTable<kAmsgrad ? 5 : 4, /*kWithStep=*/true>;
static_assert(sizeof(AdamTable<true>) + sizeof(AdamArgs) <= kKernelParamBytes &&
                  sizeof(AdamTable<false>) + sizeof(AdamArgs) <= kKernelParamBytes,
              "adam_kernel's arguments exceed the kernel parameter limit");

// With kUnscale (a grad_scale is given) the grad is divided by it and stored back unscaled, as
// torch's fused Adam does; otherwise the grad is only read. The step counters are read here and
// incremented by increment_steps after every update launch.
template <typename Fmt, bool kAmsgrad, bool kCoupledDecay, bool kUnscale>
__global__ void __launch_bounds__(kThreads)
adam_kernel(AdamTable<kAmsgrad> table, AdamArgs a) {
  using T = typename Fmt::compute_t;
  constexpr int kStreams = kAmsgrad ? 5 : 4;
  constexpr uint32_t kStored = kUnscale ? kAllStreams<kStreams> : kAllStreams<kStreams> & ~stream_bit(1);
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const Chunk<typename Fmt::storage_t, kStreams> c =
      block_chunk<typename Fmt::storage_t>(table);
  const double step = static_cast<double>(*table.step[c.slot]) + 1.0;
  const math::AdamCoeffs<T> coeffs = math::make_adam_coeffs<T>(
      a.lr.read(), a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled, a.maximize, step);
  const T scale = kUnscale ? static_cast<T>(*a.grad_scale) : T(1);
  for_chunk<Fmt, kStreams, kAllStreams<kStreams>, kStored>(c, [&](T* v) {
    if constexpr (kUnscale) v[1] = v[1] / scale;
    if constexpr (kAmsgrad) {
      math::adam_element<true, kCoupledDecay>(v[0], v[1], v[2], v[3], v[4], coeffs);
    } else {
      T unused = T(0);
      math::adam_element<false, kCoupledDecay>(v[0], v[1], v[2], v[3], unused, coeffs);
    }
  });
}

static_assert(sizeof(StepTable) + sizeof(const float*) <= kKernelParamBytes,
              "increment_steps's arguments exceed the kernel parameter limit");

// Launched with one thread per counter, after all update launches of the call (same stream):
// each step counter += 1, unless found_inf skips the step.
__global__ void increment_steps(StepTable table, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  if (static_cast<int>(threadIdx.x) < table.count) *table.step[threadIdx.x] += 1.0f;
}

struct SgdArgs {
  LearningRate lr;
  double momentum, dampening, weight_decay;
  bool maximize;
  const float* grad_scale;
  const float* found_inf;
};

// Streams: param, grad[, momentum_buffer].
template <bool kMomentum>
using SgdTable = ChunkTable<kMomentum ? 3 : 2, /*kWithStep=*/false>;
static_assert(sizeof(SgdTable<true>) + sizeof(SgdArgs) <= kKernelParamBytes &&
                  sizeof(SgdTable<false>) + sizeof(SgdArgs) <= kKernelParamBytes,
              "sgd_kernel's arguments exceed the kernel parameter limit");

// The grad as in adam_kernel; a first step writes the momentum buffer without reading it.
template <typename Fmt, bool kDecay, bool kMomentum, bool kFirstStep, bool kNesterov, bool kUnscale>
__global__ void __launch_bounds__(kThreads)
sgd_kernel(SgdTable<kMomentum> table, SgdArgs a) {
  using T = typename Fmt::compute_t;
  constexpr int kStreams = kMomentum ? 3 : 2;
  constexpr uint32_t kLoaded = kFirstStep ? kAllStreams<kStreams> & ~stream_bit(2) : kAllStreams<kStreams>;
  constexpr uint32_t kStored = kUnscale ? kAllStreams<kStreams> : kAllStreams<kStreams> & ~stream_bit(1);
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const Chunk<typename Fmt::storage_t, kStreams> c =
      block_chunk<typename Fmt::storage_t>(table);
  const math::SgdCoeffs<T> coeffs =
      math::make_sgd_coeffs<T>(a.lr.read(), a.momentum, a.dampening, a.weight_decay, a.maximize);
  const T scale = kUnscale ? static_cast<T>(*a.grad_scale) : T(1);
  for_chunk<Fmt, kStreams, kLoaded, kStored>(c, [&](T* v) {
    if constexpr (kUnscale) v[1] = v[1] / scale;
    if constexpr (kMomentum) {
      math::sgd_element<kDecay, true, kFirstStep, kNesterov>(v[0], v[1], v[2], coeffs);
    } else {
      T unused = T(0);
      math::sgd_element<kDecay, false, kFirstStep, kNesterov>(v[0], v[1], unused, coeffs);
    }
  });
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


// lr_tensor (checked with the other arguments) replaces lr when given.
LearningRate learning_rate(double lr, const std::optional<at::Tensor>& lr_tensor) {
  if (!lr_tensor.has_value()) return {lr, nullptr, false};
  return {lr, lr_tensor->data_ptr(), lr_tensor->scalar_type() == at::kDouble};
}

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "adam_step_";
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  check_adam_step_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad,
                       grad_scale, found_inf, device, lr_tensor);
  check_float32_amp_tensors(kOp, grad_scale, found_inf);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_TYPE(steps[i].scalar_type() == at::kFloat, kOp, ": steps[", i,
                     "] must be float32 on CUDA");
    for (const at::Tensor* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK_VALUE(t->is_contiguous(), kOp, ": tensors must be contiguous on CUDA (index ", i, ")");
    }
    TORCH_CHECK_VALUE(!amsgrad || max_exp_avg_sqs[i].is_contiguous(), kOp,
                      ": tensors must be contiguous on CUDA (index ", i, ")");
  }
  const AdamArgs args{learning_rate(lr, lr_tensor), beta1, beta2, eps, weight_decay,
                      decoupled, maximize, optional_float_ptr(grad_scale),
                      optional_float_ptr(found_inf)};
  const c10::DeviceGuard guard(device);
  const cudaStream_t stream = native(current_stream(device));
  with_flag(amsgrad, [&](auto ams) {
    constexpr bool kAmsgrad = decltype(ams)::value;
    constexpr int kStreams = kAmsgrad ? 5 : 4;
    for (const auto& group : by_dtype(params)) {
      std::vector<TensorRef<kStreams>> refs;
      for (size_t i : group.second) {
        TensorRef<kStreams> ref{{params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                                 exp_avg_sqs[i].data_ptr()},
                                steps[i].data_ptr<float>(),
                                params[i].numel()};
        if constexpr (kAmsgrad) ref.data[4] = max_exp_avg_sqs[i].data_ptr();
        refs.push_back(ref);
      }
      with_format(group.first, [&](auto fmt) {
        with_flag(weight_decay != 0.0 && !decoupled, [&](auto coupled) {
          with_flag(grad_scale.has_value(), [&](auto unscale) {
            for_each_chunk_table<kStreams, true>(refs, [&](const AdamTable<kAmsgrad>& table, int chunks) {
              adam_kernel<decltype(fmt), kAmsgrad, decltype(coupled)::value, decltype(unscale)::value>
                  <<<chunks, kThreads, 0, stream>>>(table, args);
              check_launch();
            });
          });
        });
      });
    }
  });
  // Launched after every update launch of the call, so stream order has them all read the step
  // counters before they move.
  std::vector<float*> step_counters;
  for (size_t i = 0; i < n; ++i) step_counters.push_back(steps[i].data_ptr<float>());
  for_each_step_table(step_counters, [&](const StepTable& table) {
    increment_steps<<<1, table.count, 0, stream>>>(table, args.found_inf);
    check_launch();
  });
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool first_step,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "sgd_step_";
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  const bool has_momentum = momentum != 0.0;
  check_sgd_step_args(params, grads, momentum_buffers, has_momentum, grad_scale, found_inf, device,
                      lr_tensor);
  check_float32_amp_tensors(kOp, grad_scale, found_inf);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(params[i].is_contiguous() && grads[i].is_contiguous() &&
                          (!has_momentum || momentum_buffers[i].is_contiguous()),
                      kOp, ": tensors must be contiguous on CUDA (index ", i, ")");
  }
  const SgdArgs args{learning_rate(lr, lr_tensor), momentum, dampening, weight_decay,
                     maximize, optional_float_ptr(grad_scale), optional_float_ptr(found_inf)};
  const c10::DeviceGuard guard(device);
  const cudaStream_t stream = native(current_stream(device));
  with_flag(has_momentum, [&](auto with_momentum) {
    constexpr bool kMomentum = decltype(with_momentum)::value;
    constexpr int kStreams = kMomentum ? 3 : 2;
    for (const auto& group : by_dtype(params)) {
      std::vector<TensorRef<kStreams>> refs;
      for (size_t i : group.second) {
        TensorRef<kStreams> ref{{params[i].data_ptr(), grads[i].data_ptr()}, nullptr, params[i].numel()};
        if constexpr (kMomentum) ref.data[2] = momentum_buffers[i].data_ptr();
        refs.push_back(ref);
      }
      with_format(group.first, [&](auto fmt) {
        with_flag(weight_decay != 0.0, [&](auto decay) {
          auto launch = [&](auto first, auto nest) {
            with_flag(grad_scale.has_value(), [&](auto unscale) {
              for_each_chunk_table<kStreams, false>(refs, [&](const SgdTable<kMomentum>& table, int chunks) {
                sgd_kernel<decltype(fmt), decltype(decay)::value, kMomentum, decltype(first)::value,
                           decltype(nest)::value, decltype(unscale)::value>
                    <<<chunks, kThreads, 0, stream>>>(table, args);
                check_launch();
              });
            });
          };
          if constexpr (kMomentum) {
            with_flag(first_step, [&](auto first) {
              with_flag(nesterov, [&](auto nest) { launch(first, nest); });
            });
          } else {
            // Without momentum there is no buffer to start or to look ahead with.
            launch(std::false_type{}, std::false_type{});
          }
        });
      });
    }
  });
}

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
}

}  // namespace cuda
}  // namespace fusedtrain
