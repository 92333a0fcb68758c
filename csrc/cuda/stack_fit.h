// The one-launch CUDA fit of a small layer stack (csrc/cuda/stack_fit_cuda.cu): every epoch and
// batch of fusedtrain.fit (rows gathered through the epoch's order, forward, loss, backward, the
// optimizer's update, per-epoch losses and validation) in a single kernel launch, for stacks whose
// params, optimizer state and one batch's activations fit one multiprocessor's shared memory (the
// tutorial MLP 10-64-32-1, 2,817 params, at batch 32 among them). The CPU's loop is
// csrc/cpu/stack_cpu.h; both take the same FitData and return the same results.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "../fit_data.h"
#include "../optimizer_hyper.h"
#include "../stack_spec.h"

namespace fusedtrain {
namespace cuda {

// Whether the one-launch fit takes a stack of these params on x's device in batches of
// batch_size rows of x (0: the whole set), with `optimizer_state_lists` state tensors per param
// (Adam 2, 3 with amsgrad; SGD 1 with momentum, else 0): every width <= kMaxNarrowWidth and the
// block's shared memory fits. The stack is checked as the fit checks it (named errors).
bool stack_fit_supported_cuda(const StackSpec& spec, at::TensorList params, const at::Tensor& x,
                              int64_t batch_size, int64_t optimizer_state_lists);

// As stack_fit_adam_cpu / stack_fit_sgd_cpu: trains params (and their state) in place, returns
// (per-epoch mean batch loss, per-epoch validation loss or an empty tensor) in x's dtype, on x's
// device, without waiting for the device. Orders on the CPU are checked and copied to the device;
// a generator draws each epoch's torch.randperm(N) on the host, as the CPU loop does. Adam's step
// counts are float32 tensors on the device, read and moved by the kernel.
std::tuple<at::Tensor, at::Tensor> stack_fit_adam_cuda(const FitData& data, at::TensorList params,
                                                       const StackSpec& spec, at::TensorList exp_avgs,
                                                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                                       at::TensorList steps, const AdamHyper& hyper);
std::tuple<at::Tensor, at::Tensor> stack_fit_sgd_cuda(const FitData& data, at::TensorList params,
                                                      const StackSpec& spec, at::TensorList momentum_buffers,
                                                      const SgdHyper& hyper);

}  // namespace cuda
}  // namespace fusedtrain
