// CUDA implementation of fusedtrain::linear_mse_fwd_bwd (the math: linear_mse_math.h).
//
// Small outputs (out <= kMaxFusedOut): ONE kernel. Each block walks blocks of kRows rows: a
// warp per row computes all `out` dot products in one pass over the row (lane-strided loads,
// warp-shuffle reduction), the residuals and dloss/dpred; then the block's threads, one column k
// each, add g[r][o] * x[r][k] into the block's partial weight gradient (and write grad_x). The
// last block to finish (an atomic ticket) sums the blocks' partials into grad_weight, grad_bias
// and the loss, so the whole forward and backward is a single launch.
// The train step op runs these kernels and then the optimizer kernels of optim_cuda.cu.
// Large outputs: the prediction of a block of rows comes from a GEMM (ATen, so cuBLAS), one
// kernel turns it into dloss/dpred in place while summing the loss, and GEMMs accumulate the
// gradients: memory grows by one block, as on the CPU.
#include <algorithm>

#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "../linear_mse_checks.h"
#include "fusedtrain/linear_mse_math.h"
#include "optim_cuda.h"

namespace fusedtrain {
namespace cuda {
namespace {

constexpr int kMaxFusedOut = 16;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 32;           // rows per block iteration
constexpr int kMaxBlocks = 256;     // partial gradients to reduce at the end
constexpr int64_t kLargeOutBlockElements = int64_t{1} << 22;

cudaStream_t current_stream(at::Device device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "fusedtrain CUDA kernel launch failed: ", cudaGetErrorString(error));
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
struct FusedArgs {
  const T* x;       // n x in
  const T* weight;  // out x in
  const T* bias;    // out or null
  const T* target;  // n x out
  int64_t n, in;
  int out;
  T two_over_count;
  bool need_params;
  T* grad_x;        // n x in or null
  T* partials;      // gridDim x (out * in + out): per-block grad_weight, grad_bias
  double* block_losses;  // gridDim
  unsigned int* ticket;  // zeroed before the launch
  T* grad_weight;   // out x in (written by the last block)
  T* grad_bias;     // out or null
  double* loss;     // one value: the sum of squared residuals
};

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_linear_mse(FusedArgs<T> a) {
  __shared__ T g[kRows][kMaxFusedOut];
  __shared__ double warp_losses[kWarps];
  __shared__ bool is_last;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t width = static_cast<int64_t>(a.out) * a.in + a.out;
  T* partial = a.partials + blockIdx.x * width;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) partial[k] = T(0);
  __syncthreads();  // zeroed by other threads than the ones that accumulate into them
  double loss = 0.0;

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kRows; first < a.n;
       first += static_cast<int64_t>(gridDim.x) * kRows) {
    const int rows = static_cast<int>(a.n - first < kRows ? a.n - first : kRows);
    // dloss/dpred of the block's rows, a warp per row
    for (int r = warp; r < rows; r += kWarps) {
      const T* x = a.x + (first + r) * a.in;
      T dots[kMaxFusedOut];
      for (int o = 0; o < a.out; ++o) dots[o] = T(0);
      for (int64_t k = lane; k < a.in; k += 32) {
        const T xk = x[k];
        for (int o = 0; o < a.out; ++o) dots[o] += xk * a.weight[o * a.in + k];
      }
      for (int o = 0; o < a.out; ++o) {
        const T pred = warp_sum(dots[o]) + (a.bias != nullptr ? a.bias[o] : T(0));
        if (lane == 0) {
          const T residual = pred - a.target[(first + r) * a.out + o];
          loss += static_cast<double>(residual) * static_cast<double>(residual);
          g[r][o] = math::mse_grad(residual, a.two_over_count);
        }
      }
    }
    __syncthreads();
    // the block's partial gradients: thread k owns column k of every output
    for (int64_t k = threadIdx.x; k < a.in; k += blockDim.x) {
      if (a.need_params) {
        for (int o = 0; o < a.out; ++o) {
          T acc = T(0);
          for (int r = 0; r < rows; ++r) acc += g[r][o] * a.x[(first + r) * a.in + k];
          partial[o * a.in + k] += acc;
        }
      }
      if (a.grad_x != nullptr) {
        for (int r = 0; r < rows; ++r) {
          T acc = T(0);
          for (int o = 0; o < a.out; ++o) acc += g[r][o] * a.weight[o * a.in + k];
          a.grad_x[(first + r) * a.in + k] = acc;
        }
      }
    }
    if (a.need_params && threadIdx.x < a.out) {
      T acc = T(0);
      for (int r = 0; r < rows; ++r) acc += g[r][threadIdx.x];
      partial[a.out * a.in + threadIdx.x] += acc;
    }
    __syncthreads();  // g is rewritten by the next iteration
  }

  // the block's loss, then the last block reduces every block's partials
  loss = warp_sum(loss);
  if (lane == 0) warp_losses[warp] = loss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double block_loss = 0.0;
    for (int w = 0; w < kWarps; ++w) block_loss += warp_losses[w];
    a.block_losses[blockIdx.x] = block_loss;
    __threadfence();
    is_last = atomicAdd(a.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (a.need_params) {
    for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
      T sum = T(0);
      for (unsigned int b = 0; b < gridDim.x; ++b) sum += a.partials[b * width + k];
      if (k < static_cast<int64_t>(a.out) * a.in) {
        a.grad_weight[k] = sum;
      } else if (a.grad_bias != nullptr) {
        a.grad_bias[k - static_cast<int64_t>(a.out) * a.in] = sum;
      }
    }
  }
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (unsigned int b = 0; b < gridDim.x; ++b) total += a.block_losses[b];
    *a.loss = total;
  }
}

// Large outputs: rows of the predicted block into dloss/dpred, in place; squared residuals
// summed into *loss.
template <typename T>
__global__ void __launch_bounds__(kThreads)
residual_in_place(T* pred, const T* target, int64_t count, T two_over_count, double* loss) {
  __shared__ double warp_losses[kWarps];
  double local = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T residual = pred[i] - target[i];
    local += static_cast<double>(residual) * static_cast<double>(residual);
    pred[i] = math::mse_grad(residual, two_over_count);
  }
  local = warp_sum(local);
  if (threadIdx.x % 32 == 0) warp_losses[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    double block_loss = 0.0;
    for (int w = 0; w < kWarps; ++w) block_loss += warp_losses[w];
    atomicAdd(loss, block_loss);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_in, int64_t reduction, bool need_grad_x, bool need_grad_params) {
  const LinearMseCall c = prepare_linear_mse(x_in, weight_in, bias, target_in, reduction,
                                             need_grad_x, need_grad_params);
  const at::Tensor &x = c.x, &weight = c.weight, &b = c.bias, &target = c.target;
  const at::Tensor &grad_weight = c.grad_weight, &grad_bias = c.grad_bias, &grad_x = c.grad_x;
  const int64_t n = c.n, in = c.in, out = c.out, count = c.count;
  const double two_over_count = c.two_over_count;
  const auto opts = x.options();
  at::Tensor loss_sum = at::zeros({}, opts.dtype(at::kDouble));
  const cudaStream_t stream = current_stream(x.device());

  if (out <= kMaxFusedOut) {
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kRows - 1) / kRows, kMaxBlocks)));
    at::Tensor partials = at::empty({blocks, out * in + out}, opts);
    at::Tensor block_losses = at::empty({blocks}, opts.dtype(at::kDouble));
    at::Tensor ticket = at::zeros({1}, opts.dtype(at::kInt));
    const FusedArgs<T> args{x.data_ptr<T>(), weight.data_ptr<T>(), b.defined() ? b.data_ptr<T>() : nullptr,
                            target.data_ptr<T>(), n, in, static_cast<int>(out),
                            static_cast<T>(two_over_count), need_grad_params,
                            need_grad_x ? grad_x.data_ptr<T>() : nullptr, partials.data_ptr<T>(),
                            block_losses.data_ptr<double>(),
                            reinterpret_cast<unsigned int*>(ticket.data_ptr<int>()),
                            need_grad_params ? grad_weight.data_ptr<T>() : nullptr,
                            need_grad_params && b.defined() ? grad_bias.data_ptr<T>() : nullptr,
                            loss_sum.data_ptr<double>()};
    fused_linear_mse<T><<<blocks, kThreads, 0, stream>>>(args);
    check_launch();
  } else {
    const int64_t block = std::min(n, std::max<int64_t>(1, kLargeOutBlockElements / out));
    at::Tensor grad_pred_block = at::empty({block, out}, opts);
    if (need_grad_params) grad_weight.zero_();
    if (need_grad_params && b.defined()) grad_bias.zero_();
    for (int64_t first = 0; first < n; first += block) {
      const int64_t rows = std::min(block, n - first);
      at::Tensor grad_pred = grad_pred_block.narrow(0, 0, rows);
      const at::Tensor x_rows = x.narrow(0, first, rows);
      if (b.defined()) {
        at::addmm_out(grad_pred, b, x_rows, weight.t());
      } else {
        at::mm_out(grad_pred, x_rows, weight.t());
      }
      const int64_t elements = rows * out;
      const int blocks = static_cast<int>(std::min<int64_t>((elements + kThreads - 1) / kThreads, 1024));
      residual_in_place<T><<<blocks, kThreads, 0, stream>>>(
          grad_pred.data_ptr<T>(), target.data_ptr<T>() + first * out, elements,
          static_cast<T>(two_over_count), loss_sum.data_ptr<double>());
      check_launch();
      if (need_grad_params) {
        grad_weight.addmm_(grad_pred.t(), x_rows);
        if (b.defined()) grad_bias.add_(grad_pred.sum(0));
      }
      if (need_grad_x) {
        at::Tensor grad_x_rows = grad_x.narrow(0, first, rows);
        at::mm_out(grad_x_rows, grad_pred, weight);
      }
    }
  }
  const at::Tensor loss = (reduction == at::Reduction::Mean ? loss_sum / static_cast<double>(count) : loss_sum).to(x.scalar_type());
  return {loss, grad_weight, grad_bias, grad_x};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_mse_fwd_bwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t reduction, bool need_grad_x, bool need_grad_params) {
  check_linear_mse_inputs("linear_mse_fwd_bwd", x, weight, bias, target, reduction);
  const c10::DeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;
  if (x.scalar_type() == at::kDouble) {
    return fwd_bwd<double>(x, weight, bias, target, reduction, need_grad_x, need_grad_params);
  }
  return fwd_bwd<float>(x, weight, bias, target, reduction, need_grad_x, need_grad_params);
}

// The train step: the fused forward/backward, then the optimizer kernels on weight and bias:
// three launches, no host synchronisation. `state` is ordered as in csrc/cpu/linear_mse_fit.h.
at::Tensor linear_mse_train_step_cuda(const at::Tensor& x, const at::Tensor& target,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t reduction,
                                      at::TensorList state, bool adam, double lr,
                                      double weight_decay, bool maximize, double beta1,
                                      double beta2, double eps, bool decoupled, bool amsgrad,
                                      double momentum, double dampening, bool nesterov,
                                      bool first_step) {
  constexpr const char* kOp = "linear_mse_train_step_";
  const std::vector<at::Tensor> params = bias.has_value() ? std::vector<at::Tensor>{weight, *bias}
                                                          : std::vector<at::Tensor>{weight};
  const size_t n = params.size();
  const size_t expected = adam ? (amsgrad ? 4 : 3) * n : (momentum != 0.0 ? n : 0);
  TORCH_CHECK_VALUE(state.size() == expected, kOp, ": state has ", state.size(),
                    " tensors, expected ", expected);
  auto [loss, grad_weight, grad_bias, grad_x] =
      linear_mse_fwd_bwd_cuda(x, weight, bias, target, reduction, false, true);
  const std::vector<at::Tensor> grads = bias.has_value() ? std::vector<at::Tensor>{grad_weight, grad_bias}
                                                         : std::vector<at::Tensor>{grad_weight};
  const at::NoGradGuard no_grad;
  if (adam) {
    adam_step_cuda(params, grads, state.slice(0, n), state.slice(n, n),
                   amsgrad ? state.slice(2 * n, n) : at::TensorList{},
                   state.slice((amsgrad ? 3 : 2) * n, n), lr, beta1, beta2, eps, weight_decay,
                   decoupled, amsgrad, maximize, std::nullopt, std::nullopt);
  } else {
    sgd_step_cuda(params, grads, state, lr, momentum, dampening, weight_decay, nesterov,
                  maximize, first_step, std::nullopt, std::nullopt);
  }
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("linear_mse_fwd_bwd", &linear_mse_fwd_bwd_cuda);
  m.impl("linear_mse_train_step_", &linear_mse_train_step_cuda);
}

}  // namespace cuda
}  // namespace fusedtrain
