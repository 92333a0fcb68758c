// The one-launch CUDA fit of a small layer stack (stack_fit.h). The device code is
// stack_fit_kernel.cuh (run on CPU threads by csrc/tests/test_fit_kernel.cpp), its shared-memory
// layout stack_fit_layout.h; this file holds the __global__ wrapper and the host side: the
// checks, the batch orders, the layout, the launch.
//
// One persistent block rather than a cooperative grid: a small stack's step (the tutorial MLP at
// batch 32 is about 0.3 MFLOP) is too little work to spread over a grid. There every step would
// need a grid-wide barrier before its update and another before the next step's forward, each
// costing microseconds, more than the step's arithmetic on one multiprocessor, and the params,
// optimizer state and gradients would travel through L2 between them. One block keeps all of it
// in shared memory for the whole fit, meets at __syncthreads alone, and sums every gradient in
// one fixed order by construction. Its limit is size: params, state and one batch's activations
// must fit one multiprocessor's shared memory (stack_fit_supported_cuda); larger stacks or
// batches take the narrow step once per batch (stack_narrow.h), whose grid spreads the rows.
//
// Every argument is checked before the launch, with the CPU loop's named errors. No host
// synchronisation: the losses stay on the device; orders given on the CPU (a DataLoader's) or
// drawn there from the generator are copied to the device ahead of the kernel on its stream.
#include "stack_fit.h"

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DeviceGuard.h>

#include "kernel_attributes.cuh"
#include "launch.cuh"
#include "narrow_host_args.cuh"
#include "stack_fit_kernel.cuh"
#include "stack_fit_layout.h"
#include "stack_narrow.h"
#include "stack_state_checks.h"

namespace fusedtrain {
namespace cuda {
namespace {

using namespace narrow;

static_assert(fits_kernel_parameter_space<FitArgs>(), "stack_fit_kernel's arguments exceed the 4 KB kernel parameter space");

template <typename T, typename Update>
__global__ void __launch_bounds__(kThreads) stack_fit_kernel(const FitArgs<T> a, const Update update) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  // Bytes rather than a FitBlock: a __shared__ variable cannot have a constructor, and the
  // layout's members have default values. Thread 0 copies the whole of it in before any use.
  __shared__ __align__(16) unsigned char block_bytes[sizeof(FitBlock<T, Update>)];
  run_fit(a, update, shared_bytes, *reinterpret_cast<FitBlock<T, Update>*>(block_bytes));
}

template <typename T, typename Update>
const void* fit_kernel() {
  return reinterpret_cast<const void*>(&stack_fit_kernel<T, Update>);
}

// The rows of a batch, as the CPU loop takes them: batch_size (0: all) of rows_used, at least one.
int64_t batch_rows(int64_t batch_size, int64_t rows_used) {
  const int64_t all = std::max<int64_t>(rows_used, 1);
  return batch_size > 0 ? std::min(batch_size, all) : all;
}

// The layout of a fit in batches of `batch` rows, if the kernels of T take the stack on x's
// device: at most kMaxNarrowLayers layers and kMaxNarrowParams params, every width <=
// kMaxNarrowWidth, and the layout within the dynamic shared memory of both kernels (Adam's and
// SGD's), so that the answer does not depend on which one asks.
template <typename T>
std::optional<FitLayout> plan_fit(const StackSpec& spec, at::TensorList params, const at::Tensor& x,
                                  int64_t batch, int state_lists) {
  if (!within_narrow_limits(spec, params, x)) return std::nullopt;
  // Every row of a batch keeps at least its 4-byte target in shared memory, of which no
  // multiprocessor has 256 KiB: a larger batch never fits, and the int tile height below cannot
  // overflow for the batches that are left.
  if (batch > 64 * 1024) return std::nullopt;
  const auto [widths, keeps_output] = stack_shape(spec, params, x);
  int64_t param_elements = 0;
  for (const at::Tensor& p : params) param_elements += p.numel();
  const FitLayout layout = make_fit_layout(widths, keeps_output, fit_tile_rows(batch), param_elements, state_lists,
                                           spec.loss == Loss::kCrossEntropy, static_cast<int64_t>(sizeof(T)));
  const int device = x.device().index();
  const int64_t available = std::min(max_dynamic_shared_bytes(fit_kernel<T, NarrowAdam<T>>(), device),
                                     max_dynamic_shared_bytes(fit_kernel<T, NarrowSgd<T>>(), device));
  if (layout.elements * static_cast<int64_t>(sizeof(T)) > available) return std::nullopt;
  return layout;
}

void check_call(const char* op, const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                const StackSpec& spec) {
  check_stack_tensors(op, spec, x, target, params);
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": this is the CUDA kernel, x is on ", x.device());
}

// What the CPU loop checks (stack_cpu.cpp's check_fit and fit), on the CUDA device; the rows of
// orders on the CPU too (on the device the kernel checks them).
void check_fit(const char* op, const FitData& d, at::TensorList params, const StackSpec& spec) {
  check_fit_data(op, d, [&](const at::Tensor& x, const at::Tensor& target) {
    check_call(op, x, target, params, spec);
  });
  const int64_t n = d.x.size(0);
  if (!d.orders.has_value()) return;
  const at::Tensor& orders = *d.orders;
  TORCH_CHECK_VALUE(orders.dim() == 2 && orders.size(0) == d.epochs && orders.size(1) <= n &&
                        orders.scalar_type() == at::kLong,
                    op, ": orders must be int64 of shape (epochs, M <= N) with epochs = ", d.epochs, ", N = ", n,
                    ", got ", orders.sizes(), " ", orders.scalar_type());
  TORCH_CHECK_VALUE(orders.is_cpu() || orders.device() == d.x.device(), op, ": orders must be on the CPU or on ",
                    d.x.device(), " (x's device), got ", orders.device());
  if (orders.is_cpu() && orders.numel() > 0) {
    const auto [low, high] = at::aminmax(orders);
    const int64_t lowest = low.item<int64_t>(), highest = high.item<int64_t>();
    TORCH_CHECK_INDEX(lowest >= 0 && highest < n, op, ": orders holds row ", lowest < 0 ? lowest : highest,
                      ", outside [0, ", n, ")");
  }
}

// A CPU tensor's copy on `device`, queued on the current stream without a host wait; a tensor
// already there is returned as it is (contiguous).
at::Tensor to_device_async(const at::Tensor& t, const at::Device& device) {
  if (!t.is_cpu()) return t.to(device).contiguous();
  return t.contiguous().pin_memory().to(device, /*non_blocking=*/true);
}

// Each epoch's rows on x's device: the given orders, else torch.randperm(N) per epoch from the
// generator, drawn on the host as the CPU loop draws them; undefined when the rows go in order.
at::Tensor device_orders(const FitData& d) {
  // Pinned, so the copy queues on the stream instead of making the host wait for the work
  // before it (the caching host allocator keeps the pinned copy until the transfer is done).
  if (d.orders.has_value()) return to_device_async(*d.orders, d.x.device());
  if (!d.generator.has_value() || d.epochs == 0) return at::Tensor();
  std::vector<at::Tensor> drawn;
  for (int64_t epoch = 0; epoch < d.epochs; ++epoch) {
    drawn.push_back(at::randperm(d.x.size(0), *d.generator, at::kLong));
  }
  return to_device_async(at::stack(drawn), d.x.device());
}

// The checked fit, launched on the current stream.
template <typename T, typename Update>
std::tuple<at::Tensor, at::Tensor> launch_fit(const char* op, const FitData& d, at::TensorList params,
                                              const StackSpec& spec, const Update& update, int state_lists) {
  const at::Tensor& x = d.x;
  const c10::DeviceGuard guard(x.device());
  const int64_t rows_used = d.orders.has_value() ? d.orders->size(1) : x.size(0);
  const int64_t batch = batch_rows(d.batch_size, rows_used);
  const std::optional<FitLayout> layout = plan_fit<T>(spec, params, x, batch, state_lists);
  TORCH_CHECK_VALUE(layout.has_value(), op, ": the stack, its optimizer state and a batch of ", batch,
                    " rows do not fit one block's shared memory on ", x.device(),
                    " (ask stack_fit_supported_cuda first)");
  const at::Tensor orders = device_orders(d);  // after the last check: drawing moves the generator
  const at::Tensor train_losses = at::empty({d.epochs}, x.options());
  const at::Tensor val_losses = at::empty({d.val_x.has_value() ? d.epochs : 0}, x.options());
  if (d.epochs == 0) return {train_losses, val_losses};

  FitArgs<T> a{};
  NarrowArgs<T>& stack = a.stack;
  stack.layout = layout->narrow;
  set_stack_args(stack, spec, params);
  a.layout = *layout;
  a.x = x.data_ptr<T>();
  a.target = d.target.data_ptr();
  a.n = x.size(0);
  a.orders = orders.defined() ? orders.data_ptr<int64_t>() : nullptr;
  a.epochs = d.epochs;
  a.rows_used = rows_used;
  a.batch = batch;
  a.batches = std::max<int64_t>(1, (rows_used + batch - 1) / batch);
  a.mean = spec.reduction == at::Reduction::Mean;
  if (d.val_x.has_value()) {
    a.val_x = d.val_x->data_ptr<T>();
    a.val_target = d.val_target->data_ptr();
    a.val_n = d.val_x->size(0);
    a.val_losses = val_losses.data_ptr<T>();
  }
  a.train_losses = train_losses.data_ptr<T>();

  const size_t bytes = static_cast<size_t>(layout->elements) * sizeof(T);
  stack_fit_kernel<T, Update><<<1, kThreads, bytes, native(current_stream(x.device()))>>>(a, update);
  check_launch();
  return {train_losses, val_losses};
}

}  // namespace

bool stack_fit_supported_cuda(const StackSpec& spec, at::TensorList params, const at::Tensor& x,
                              int64_t batch_size, int64_t optimizer_state_lists) {
  constexpr const char* kOp = "stack_fit_supported_cuda";
  TORCH_CHECK_VALUE(optimizer_state_lists >= 0 && optimizer_state_lists <= 3, kOp,
                    ": optimizer_state_lists must be 0-3 (Adam 2, 3 with amsgrad; SGD 1 with momentum, else 0), got ",
                    optimizer_state_lists);
  TORCH_CHECK_VALUE(batch_size >= 0, kOp, ": batch_size must be >= 0 (0: the whole set), got ", batch_size);
  if (!x.is_cuda()) return false;
  // A target of the right kind (the fit checks the real one) lets check_stack_tensors name any
  // problem of x and params here, before they are read; it checks them before the target.
  const int64_t rows = x.dim() > 0 ? x.size(0) : 0;
  const size_t top = static_cast<size_t>(spec.layer_params.back());
  const int64_t out = top < params.size() && params[top].dim() == 2 ? params[top].size(0) : 0;
  const at::Tensor target = spec.loss == Loss::kCrossEntropy
                                ? at::empty({1}, x.options().dtype(at::kLong)).expand({rows})
                                : at::empty({1, out}, x.options()).expand({rows, out});
  check_call(kOp, x, target, params, spec);
  const c10::DeviceGuard guard(x.device());
  const int64_t batch = batch_rows(batch_size, x.size(0));
  const int lists = static_cast<int>(optimizer_state_lists);
  return x.scalar_type() == at::kDouble ? plan_fit<double>(spec, params, x, batch, lists).has_value()
                                        : plan_fit<float>(spec, params, x, batch, lists).has_value();
}

std::tuple<at::Tensor, at::Tensor> stack_fit_adam_cuda(const FitData& data, at::TensorList params,
                                                       const StackSpec& spec, at::TensorList exp_avgs,
                                                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                                       at::TensorList steps, const AdamHyper& hyper) {
  constexpr const char* kOp = "stack_fit";
  check_fit(kOp, data, params, spec);
  check_adam_state(kOp, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper.amsgrad);
  const at::NoGradGuard no_grad;
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    return launch_fit<T>(kOp, data, params, spec,
                         adam_update<T>(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper),
                         hyper.amsgrad ? 3 : 2);
  };
  return data.x.scalar_type() == at::kDouble ? run(double{}) : run(float{});
}

std::tuple<at::Tensor, at::Tensor> stack_fit_sgd_cuda(const FitData& data, at::TensorList params,
                                                      const StackSpec& spec, at::TensorList momentum_buffers,
                                                      const SgdHyper& hyper) {
  constexpr const char* kOp = "stack_fit";
  check_fit(kOp, data, params, spec);
  const bool momentum = hyper.momentum != 0.0;
  check_sgd_state(kOp, params, momentum_buffers, momentum);
  const at::NoGradGuard no_grad;
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    return launch_fit<T>(kOp, data, params, spec, sgd_update<T>(params, momentum_buffers, hyper), momentum ? 1 : 0);
  };
  return data.x.scalar_type() == at::kDouble ? run(double{}) : run(float{});
}

}  // namespace cuda
}  // namespace fusedtrain
