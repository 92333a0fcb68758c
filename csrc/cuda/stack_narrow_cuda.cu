// The one-launch CUDA train step of a narrow layer stack (stack_narrow.h): forward, loss,
// backward and the optimizer update of every param in ONE cooperative kernel launch, for stacks
// whose widths are all <= kMaxNarrowWidth. The math: stack_math.h (activations, loss heads),
// adam_math.h and sgd_math.h (updates), as on the CPU.
//
// Each block takes row tiles (tile t, t + gridDim, ...; stack_narrow_layout.h sizes them and
// lays out shared memory) and, per tile:
//   forward   the tile's rows of x into shared memory; per layer z = a W^T + b and a = act(z),
//             kept in shared memory (weights there too: resident for the whole kernel when they
//             fit, else reloaded layer by layer). A thread computes one output column for
//             kNarrowRowsPerThread rows, so each weight it reads serves that many multiply-adds;
//   loss      dloss/dz of the top layer (the head's gradient times 1/R, times act'), the rows'
//             loss summed in double;
//   backward  per layer, top down: the block's partial dW += G^T a_below and db += column sums
//             of G, in global scratch that only this block touches; G_below = (G W) * act'.
// Math is plain FMA-free multiply-add loops in the params' dtype (fp32 or fp64; tensor cores,
// hence TF32, are never used), each dot product summed in the CPU loops' order.
// Then the grid barrier (cooperative_groups' grid.sync(): every block resident, see
// linear_mse_cuda.cu): every gradient element summed over the blocks' partials in block order,
// spread over the grid (grid_sum_parts), and handed straight to the optimizer's element update.
// Every block read the weights and the step counts before the barrier, so they can be
// rewritten after it; block 0 then sums the block losses in order, stores the loss and moves
// the step counts. Cross entropy under "mean" divides by the rows not ignored: the blocks count
// their rows' kept targets first and meet at one more barrier.
//
// No host synchronisation, scratch from the caching allocator on the current stream, nothing
// kept between launches (no counter, no ticket): capturable in a CUDA graph, and two replays on
// two streams share nothing. For a given device and shape the tiles each block runs and every
// order of summation are fixed, so two runs give the same bits.
//
// The device code is stack_narrow_kernel.cuh (run on CPU threads by csrc/tests/test_narrow_kernel.cpp);
// this file holds the __global__ wrapper and the host side: the layout and grid from the device's
// shared memory and occupancy (stack_narrow_layout.h), the arguments, the cooperative launch.
#include "stack_narrow.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "fused_grid.h"
#include "kernel_attributes.cuh"
#include "launch.cuh"
#include "narrow_host_args.cuh"
#include "stack_narrow_kernel.cuh"
#include "stack_narrow_layout.h"

namespace fusedtrain {
namespace cuda {
namespace {

using namespace narrow;

static_assert(fits_kernel_parameter_space<NarrowArgs>(), "narrow_stack_step's arguments exceed the 4 KB kernel parameter space");

template <typename T, typename Update>
__global__ void __launch_bounds__(kThreads) narrow_stack_step(const NarrowArgs<T> a, const Update update) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ BlockScalars<Update> block;
  run_narrow_step(a, update, reinterpret_cast<T*>(shared_bytes), block);
}

// ---------------------------------------------------------------------------------------------
// Host side

// What a device offers one of the kernels: its multiprocessors and the dynamic shared memory a
// block may have (max_dynamic_shared_bytes).
struct KernelLimits {
  int sms;
  int64_t max_dynamic_bytes;
};

KernelLimits kernel_limits(const void* kernel, int device) {
  return once_per_kernel_and_device(kernel, device, [&] {
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    return KernelLimits{sms, max_dynamic_shared_bytes(kernel, device)};
  });
}

// Blocks of `kernel` with `bytes` of dynamic shared memory that one multiprocessor holds at once.
int blocks_per_sm(const void* kernel, int64_t bytes) {
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(bytes)),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return per_sm;
}

struct NarrowPlan {
  NarrowLayout layout;
  int64_t coresident;  // blocks the device holds at once with this layout
};

// The first candidate layout (stack_narrow_layout.h) that fits two blocks on a multiprocessor,
// else the first that fits one; none if no layout fits.
std::optional<NarrowPlan> choose_plan(const void* kernel, int device, const std::vector<int64_t>& widths,
                                      const std::vector<bool>& keeps_output, size_t element_bytes) {
  const KernelLimits limits = kernel_limits(kernel, device);
  const std::vector<NarrowLayout> candidates = narrow_layout_candidates(widths, keeps_output);
  for (int at_least : {2, 1}) {
    for (const NarrowLayout& layout : candidates) {
      const int64_t bytes = layout.elements * static_cast<int64_t>(element_bytes);
      if (bytes > limits.max_dynamic_bytes) continue;
      const int per_sm = blocks_per_sm(kernel, bytes);
      if (per_sm >= at_least) return NarrowPlan{layout, static_cast<int64_t>(per_sm) * limits.sms};
    }
  }
  return std::nullopt;
}

// choose_plan, worked out once per kernel (which fixes element_bytes), device and stack shape: a
// step asks for it three times (twice in narrow_stack_supported, once to launch).
std::optional<NarrowPlan> plan_narrow(const void* kernel, int device, const std::vector<int64_t>& widths,
                                      const std::vector<bool>& keeps_output, size_t element_bytes) {
  using Key = std::tuple<const void*, int, std::vector<int64_t>, std::vector<bool>>;
  static std::mutex mutex;
  static auto* cache = new std::map<Key, std::optional<NarrowPlan>>();
  Key key{kernel, device, widths, keeps_output};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache->find(key);
    if (found != cache->end()) return found->second;
  }
  const std::optional<NarrowPlan> plan = choose_plan(kernel, device, widths, keeps_output, element_bytes);
  const std::lock_guard<std::mutex> lock(mutex);
  cache->emplace(std::move(key), plan);
  return plan;
}

template <typename T, typename Update>
const void* kernel_of() {
  return reinterpret_cast<const void*>(&narrow_stack_step<T, Update>);
}

// One cooperative launch of the step on the current stream; returns the loss.
template <typename T, typename Update>
at::Tensor launch_narrow_step(const at::Tensor& x_in, const at::Tensor& target_in, at::TensorList params,
                              const StackSpec& spec, Update update) {
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), target = target_in.contiguous();
  const void* kernel = kernel_of<T, Update>();
  const int device = x.device().index();
  const auto [widths, keeps_output] = stack_shape(spec, params, x);
  const std::optional<NarrowPlan> plan = plan_narrow(kernel, device, widths, keeps_output, sizeof(T));
  TORCH_CHECK(plan.has_value() && params.size() <= static_cast<size_t>(kMaxNarrowParams),
              "fusedtrain: the stack does not fit the narrow one-launch kernel (ask narrow_stack_supported first)");

  NarrowArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.target = target.data_ptr();
  a.n = x.size(0);
  a.layout = plan->layout;
  a.tiles = (a.n + a.layout.rows - 1) / a.layout.rows;
  set_stack_args(a, spec, params);
  const bool mean = spec.reduction == at::Reduction::Mean;
  a.mean_over_kept = mean && spec.loss == Loss::kCrossEntropy;
  a.loss_divisor = mean ? static_cast<double>(a.n * widths.back()) : 1.0;
  a.grad_scale = static_cast<T>(1.0 / a.loss_divisor);
  const int64_t width = a.params.offset[a.params.count];
  const at::Tensor loss = at::empty({}, x.options());
  a.loss_out = loss.data_ptr<T>();

  const int64_t bytes = a.layout.elements * static_cast<int64_t>(sizeof(T));
  const cudaStream_t stream = native(current_stream(x.device()));
  launch_cooperative("narrow_stack_step", plan->coresident, stream, [&](int64_t most) {
    const int blocks = narrow_grid_blocks(a.tiles, most, width);
    // The scratch in one allocation: the partials, then (8-byte aligned) the block losses and
    // kept counts. Freed while the kernel may still run: the caching allocator hands the memory
    // only to work ordered after it on this stream (and keeps it for a graph being captured).
    const int64_t partial_bytes = (blocks * width * static_cast<int64_t>(sizeof(T)) + 7) / 8 * 8;
    const at::Tensor scratch =
        at::empty({partial_bytes + blocks * 8 * (a.mean_over_kept ? 2 : 1)}, x.options().dtype(at::kByte));
    uint8_t* const base = scratch.data_ptr<uint8_t>();
    a.partials = reinterpret_cast<T*>(base);
    a.block_losses = reinterpret_cast<double*>(base + partial_bytes);
    a.block_kept = reinterpret_cast<int64_t*>(base + partial_bytes + blocks * 8);
    a.gradient_lanes = fused_reduce_lanes(width, blocks, static_cast<int64_t>(blocks) * kThreads);
    void* kernel_args[] = {&a, &update};
    return cudaLaunchCooperativeKernel(kernel, blocks, kThreads, kernel_args, static_cast<size_t>(bytes), stream);
  });
  return loss;
}

template <typename T>
bool fits(const StackSpec& spec, at::TensorList params, const at::Tensor& x) {
  const auto [widths, keeps_output] = stack_shape(spec, params, x);
  const int device = x.device().index();
  return plan_narrow(kernel_of<T, NarrowAdam<T>>(), device, widths, keeps_output, sizeof(T)).has_value() &&
         plan_narrow(kernel_of<T, NarrowSgd<T>>(), device, widths, keeps_output, sizeof(T)).has_value();
}

}  // namespace

bool narrow_stack_supported(const StackSpec& spec, at::TensorList params, const at::Tensor& x) {
  if (!within_narrow_limits(spec, params, x)) return false;
  const c10::DeviceGuard guard(x.device());
  int cooperative = 0;
  check_cuda(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, x.device().index()),
             "cudaDeviceGetAttribute");
  if (cooperative == 0) return false;
  return x.scalar_type() == at::kDouble ? fits<double>(spec, params, x) : fits<float>(spec, params, x);
}

at::Tensor narrow_stack_adam_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                  const StackSpec& spec, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& hyper) {
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    return launch_narrow_step<T>(x, target, params, spec,
                                 adam_update<T>(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper));
  };
  return x.scalar_type() == at::kDouble ? run(double{}) : run(float{});
}

at::Tensor narrow_stack_sgd_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                 const StackSpec& spec, at::TensorList momentum_buffers, const SgdHyper& hyper) {
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    return launch_narrow_step<T>(x, target, params, spec, sgd_update<T>(params, momentum_buffers, hyper));
  };
  return x.scalar_type() == at::kDouble ? run(double{}) : run(float{});
}

}  // namespace cuda
}  // namespace fusedtrain
