// CUDA implementations of fusedtrain::linear_mse_fwd_bwd and fusedtrain::linear_mse_train_step_
// (the math: linear_mse_math.h; the optimizer updates: adam_math.h and sgd_math.h, as on the CPU).
//
// Small outputs (out <= kMaxFusedOut): ONE kernel. Each block walks blocks of kRows rows: a
// warp per row computes all `out` dot products in one pass over the row (lane-strided loads,
// warp-shuffle reduction), the residuals and dloss/dpred; then the block's threads, one column k
// each, add g[r][o] * x[r][k] into the block's partial weight gradient (and write grad_x). The
// last block to finish (an atomic ticket) sums the blocks' partials element by element and hands
// each sum to the op's last-block step: fwd_bwd stores it in grad_weight / grad_bias; the train
// step applies the Adam or SGD element update to that element of weight or bias at once. Every
// block reads weight and bias in its forward, but the ticket says they have all finished, so
// the whole training step (forward, backward, reduction, update) is a single launch with no host
// synchronisation: Adam's step counts are read and incremented on the device, the loss is
// stored finished, and the train step's ticket counter (one per stream) is back at zero after
// every launch, so no memset precedes it.
// Large outputs: the prediction of a block of rows comes from a GEMM (ATen, so cuBLAS), one
// kernel turns it into dloss/dpred in place while summing the loss, and GEMMs accumulate the
// gradients: memory grows by one block, as on the CPU. The train step then runs the optimizer
// kernels of optim_cuda.cu on weight and bias.
#include <algorithm>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../cpu/linear_mse_fit.h"
#include "../linear_mse_checks.h"
#include "../multi_tensor_checks.h"
#include "fusedtrain/adam_math.h"
#include "fusedtrain/linear_mse_math.h"
#include "fusedtrain/sgd_math.h"
#include "launch.cuh"
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
  unsigned int* ticket;  // zero at the launch, and zero again after it
};

// What the last block does with the reduced results. A LastBlock has
//   coeffs(): what each thread computes once before its elements;
//   apply(coeffs, k, grad): element k of the gradient row (grad_weight flattened, then
//     grad_bias) is `grad`;
//   finish(loss_sum): after every apply() of the block, on one thread.

// fwd_bwd: the gradients and the sum of squared residuals are the outputs.
template <typename T>
struct StoreGradients {
  T* grad_weight;   // out x in
  T* grad_bias;     // out or null
  int64_t weight_numel;
  double* loss_sum;

  struct Coeffs {};
  __device__ Coeffs coeffs() const { return {}; }
  __device__ void apply(Coeffs, int64_t k, T grad) const {
    if (k < weight_numel) {
      grad_weight[k] = grad;
    } else if (grad_bias != nullptr) {
      grad_bias[k - weight_numel] = grad;
    }
  }
  __device__ void finish(double total) const { *loss_sum = total; }
};

// The train step's params: weight and bias, updated in place, and the loss it returns.
template <typename T>
struct TrainedParams {
  T* param[2];           // weight, bias (null without bias)
  int64_t weight_numel;
  T* loss;               // the loss before the update
  double loss_divisor;   // the number of residuals under "mean", 1 under "sum"

  // f(i, j) for element k of the gradient row: element j of param i (0 weight, 1 bias); a bias
  // gradient without a bias is dropped.
  template <typename F>
  __device__ void locate(int64_t k, F&& f) const {
    if (k < weight_numel) {
      f(0, k);
    } else if (param[1] != nullptr) {
      f(1, k - weight_numel);
    }
  }
  __device__ void store_loss(double total) const { *loss = static_cast<T>(total / loss_divisor); }
};

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, maximize;
};

// Adam / AdamW on weight and bias, each with its own state and step count (state[i] is param i's).
template <typename T, bool kAmsgrad, bool kCoupledDecay>
struct AdamUpdate {
  TrainedParams<T> params;
  T* exp_avg[2];
  T* exp_avg_sq[2];
  T* max_exp_avg_sq[2];  // null unless amsgrad
  float* step[2];
  AdamHyper h;

  struct Coeffs {
    math::AdamCoeffs<T> of[2];
  };
  // Every thread reads the step counts before finish() increments them (the kernel puts a
  // barrier between the two), and folds the coefficients as optim_cuda.cu's kernel does.
  __device__ Coeffs coeffs() const {
    Coeffs c{};
    for (int i = 0; i < 2; ++i) {
      if (params.param[i] == nullptr) continue;
      const double t = static_cast<double>(*step[i]) + 1.0;
      c.of[i] = math::make_adam_coeffs<T>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay,
                                          h.decoupled, h.maximize, t);
    }
    return c;
  }
  __device__ void apply(const Coeffs& c, int64_t k, T grad) const {
    params.locate(k, [&](int i, int64_t j) {
      T param = params.param[i][j], m = exp_avg[i][j], v = exp_avg_sq[i][j];
      T v_max = kAmsgrad ? max_exp_avg_sq[i][j] : T(0);
      math::adam_element<kAmsgrad, kCoupledDecay>(param, grad, m, v, v_max, c.of[i]);
      params.param[i][j] = param;
      exp_avg[i][j] = m;
      exp_avg_sq[i][j] = v;
      if (kAmsgrad) max_exp_avg_sq[i][j] = v_max;
    });
  }
  __device__ void finish(double total) const {
    params.store_loss(total);
    for (int i = 0; i < 2; ++i) {
      if (params.param[i] != nullptr) *step[i] += 1.0f;
    }
  }
};

// SGD on weight and bias. Nothing in its coefficients depends on the device, so the host folds them.
template <typename T, bool kDecay, bool kMomentum, bool kFirstStep, bool kNesterov>
struct SgdUpdate {
  TrainedParams<T> params;
  T* momentum_buffer[2];  // null without momentum
  math::SgdCoeffs<T> c;

  __device__ math::SgdCoeffs<T> coeffs() const { return c; }
  __device__ void apply(const math::SgdCoeffs<T>& coeffs, int64_t k, T grad) const {
    params.locate(k, [&](int i, int64_t j) {
      T param = params.param[i][j];
      // a first step only writes the buffer, which may hold anything before it
      T buffer = kMomentum && !kFirstStep ? momentum_buffer[i][j] : T(0);
      math::sgd_element<kDecay, kMomentum, kFirstStep, kNesterov>(param, grad, buffer, coeffs);
      params.param[i][j] = param;
      if (kMomentum) momentum_buffer[i][j] = buffer;
    });
  }
  __device__ void finish(double total) const { params.store_loss(total); }
};

template <typename T, typename LastBlock>
__global__ void __launch_bounds__(kThreads) fused_linear_mse(FusedArgs<T> a, LastBlock last) {
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

  // The block's loss, then its ticket. Each thread fences its own partial-gradient writes
  // before the barrier, and thread 0 its loss before the atomic: when the last block sees the
  // final ticket, every other block's results are visible device-wide, and every other block
  // is done reading weight and bias, which the train step's last block then rewrites.
  loss = warp_sum(loss);
  if (lane == 0) warp_losses[warp] = loss;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    double block_loss = 0.0;
    for (int w = 0; w < kWarps; ++w) block_loss += warp_losses[w];
    a.block_losses[blockIdx.x] = block_loss;
    __threadfence();
    // atomicInc wraps to 0 on the last ticket: the counter is ready for the next launch
    is_last = atomicInc(a.ticket, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The other blocks' results are read through L2 (__ldcg): this SM's L1 may hold lines of
  // them from before they were written.
  if (a.need_params) {
    const auto coeffs = last.coeffs();
    for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
      T sum = T(0);
      for (unsigned int b = 0; b < gridDim.x; ++b) sum += __ldcg(a.partials + b * width + k);
      last.apply(coeffs, k, sum);
    }
  }
  __syncthreads();  // every thread is done with what finish() changes (Adam's step counts)
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (unsigned int b = 0; b < gridDim.x; ++b) total += __ldcg(a.block_losses + b);
    last.finish(total);
  }
}

int fused_blocks(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kRows - 1) / kRows, kMaxBlocks)));
}

// One launch of the fused kernel over the call's rows; `ticket` must be zero.
template <typename T, typename LastBlock>
void launch_fused(const LinearMseCall& c, bool need_grad_params, T* grad_x, unsigned int* ticket,
                  const LastBlock& last, cudaStream_t stream) {
  const int blocks = fused_blocks(c.n);
  const auto opts = c.x.options();
  // freed while the kernel may still run: the caching allocator hands the memory only to work
  // ordered after it on this stream
  at::Tensor partials = at::empty({blocks, c.out * c.in + c.out}, opts);
  at::Tensor block_losses = at::empty({blocks}, opts.dtype(at::kDouble));
  const FusedArgs<T> args{c.x.data_ptr<T>(), c.weight.data_ptr<T>(),
                          c.bias.defined() ? c.bias.data_ptr<T>() : nullptr,
                          c.target.data_ptr<T>(), c.n, c.in, static_cast<int>(c.out),
                          static_cast<T>(c.two_over_count), need_grad_params, grad_x,
                          partials.data_ptr<T>(), block_losses.data_ptr<double>(), ticket};
  fused_linear_mse<T, LastBlock><<<blocks, kThreads, 0, stream>>>(args, last);
  check_launch();
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
  const cudaStream_t stream = native(current_stream(x.device()));

  if (out <= kMaxFusedOut) {
    at::Tensor ticket = at::zeros({1}, opts.dtype(at::kInt));
    const StoreGradients<T> last{need_grad_params ? grad_weight.data_ptr<T>() : nullptr,
                                 need_grad_params && b.defined() ? grad_bias.data_ptr<T>() : nullptr,
                                 out * in, loss_sum.data_ptr<double>()};
    launch_fused<T>(c, need_grad_params, need_grad_x ? grad_x.data_ptr<T>() : nullptr,
                    reinterpret_cast<unsigned int*>(ticket.data_ptr<int>()), last, stream);
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

// The ticket counter of the train step's fused kernel on `stream`: zeroed once (on that stream,
// the current one), then back at zero after every launch (the last block's atomicInc wraps it),
// so a step needs no memset before its launch. Launches on one stream run one after another and
// can share a counter; each stream has its own.
unsigned int* stream_ticket(const c10::Stream& stream) {
  static std::mutex mutex;
  // Never destroyed: static destructors run at exit, possibly after the CUDA runtime is gone.
  static auto* tickets = new std::map<std::pair<c10::DeviceIndex, c10::StreamId>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& ticket = (*tickets)[{stream.device_index(), stream.id()}];
  if (!ticket.defined()) {
    ticket = at::zeros({1}, at::TensorOptions().device(stream.device()).dtype(at::kInt));
  }
  return reinterpret_cast<unsigned int*>(ticket.data_ptr<int>());
}

// The optimizer state of a train step (its order: csrc/cpu/linear_mse_fit.h) and the params it
// updates in place, checked before anything runs. Adam's step counts are float32 on the device,
// where the kernels read and increment them.
void check_train_step_params(const char* op, const std::vector<at::Tensor>& params,
                             at::TensorList state, const cpu::FitOptimizer& o) {
  const size_t n = params.size();
  const size_t expected = o.adam ? (o.amsgrad ? 4 : 3) * n : (o.momentum != 0.0 ? n : 0);
  TORCH_CHECK_VALUE(state.size() == expected, op, ": state has ", state.size(),
                    " tensors, expected ", expected);
  constexpr const char* kNames[] = {"weight", "bias"};
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(params[i].is_contiguous(), op, ": ", kNames[i],
                      " must be contiguous: it is updated in place");
    if (o.adam) {
      check_like_param(op, "exp_avgs", state.slice(0, n), i, params[i]);
      check_like_param(op, "exp_avg_sqs", state.slice(n, n), i, params[i]);
      if (o.amsgrad) check_like_param(op, "max_exp_avg_sqs", state.slice(2 * n, n), i, params[i]);
      const at::Tensor& step = state[(o.amsgrad ? 3 : 2) * n + i];
      check_scalar_tensor(op, "steps", step, params[i].device(), static_cast<int64_t>(i));
      TORCH_CHECK_TYPE(step.scalar_type() == at::kFloat, op, ": steps[", i,
                       "] must be float32 on CUDA, got ", step.scalar_type());
    } else if (o.momentum != 0.0) {
      check_like_param(op, "momentum_buffers", state, i, params[i]);
    }
  }
  for (const at::Tensor& s : state) {
    TORCH_CHECK_VALUE(s.is_contiguous(), op, ": optimizer state must be contiguous");
  }
}

// Small out: forward, backward, gradient reduction and update in one launch of the fused kernel.
template <typename T>
at::Tensor fused_train_step(const LinearMseCall& c, int64_t reduction,
                            const std::vector<at::Tensor>& params, at::TensorList state,
                            const cpu::FitOptimizer& o) {
  const c10::Stream stream = current_stream(c.x.device());
  unsigned int* ticket = stream_ticket(stream);
  at::Tensor loss = at::empty({}, c.x.options());
  const size_t n = params.size();
  const TrainedParams<T> trained{
      {params[0].data_ptr<T>(), n > 1 ? params[1].data_ptr<T>() : nullptr},
      c.out * c.in,
      loss.data_ptr<T>(),
      reduction == at::Reduction::Mean ? static_cast<double>(c.count) : 1.0};
  // Param i's tensor in the state's group `group` of n; null for a bias that is absent.
  const auto state_of = [&](size_t group, size_t i) -> T* {
    return i < n ? state[group * n + i].data_ptr<T>() : nullptr;
  };
  const auto launch = [&](const auto& last) {
    launch_fused<T>(c, true, nullptr, ticket, last, native(stream));
  };
  if (o.adam) {
    const AdamHyper h{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.decoupled, o.maximize};
    const size_t steps = o.amsgrad ? 3 : 2;
    const auto step_of = [&](size_t i) -> float* {
      return i < n ? state[steps * n + i].data_ptr<float>() : nullptr;
    };
    with_flag(o.amsgrad, [&](auto amsgrad) {
      constexpr bool kAmsgrad = decltype(amsgrad)::value;
      with_flag(o.weight_decay != 0.0 && !o.decoupled, [&](auto coupled) {
        launch(AdamUpdate<T, kAmsgrad, decltype(coupled)::value>{
            trained,
            {state_of(0, 0), state_of(0, 1)},
            {state_of(1, 0), state_of(1, 1)},
            {kAmsgrad ? state_of(2, 0) : nullptr, kAmsgrad ? state_of(2, 1) : nullptr},
            {step_of(0), step_of(1)},
            h});
      });
    });
  } else {
    const math::SgdCoeffs<T> coeffs =
        math::make_sgd_coeffs<T>(o.lr, o.momentum, o.dampening, o.weight_decay, o.maximize);
    with_flag(o.weight_decay != 0.0, [&](auto decay) {
      constexpr bool kDecay = decltype(decay)::value;
      if (o.momentum == 0.0) {
        launch(SgdUpdate<T, kDecay, false, false, false>{trained, {nullptr, nullptr}, coeffs});
        return;
      }
      with_flag(o.first_step, [&](auto first) {
        with_flag(o.nesterov, [&](auto nesterov) {
          launch(SgdUpdate<T, kDecay, true, decltype(first)::value, decltype(nesterov)::value>{
              trained, {state_of(0, 0), state_of(0, 1)}, coeffs});
        });
      });
    });
  }
  return loss;
}

// The train step, no host synchronisation: for small out one launch (fused_train_step); for
// large out the GEMM forward/backward, then the optimizer kernels on weight and bias. `state` is
// ordered as in csrc/cpu/linear_mse_fit.h.
at::Tensor linear_mse_train_step_cuda(const at::Tensor& x, const at::Tensor& target,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t reduction,
                                      at::TensorList state, bool adam, double lr,
                                      double weight_decay, bool maximize, double beta1,
                                      double beta2, double eps, bool decoupled, bool amsgrad,
                                      double momentum, double dampening, bool nesterov,
                                      bool first_step) {
  constexpr const char* kOp = "linear_mse_train_step_";
  check_linear_mse_inputs(kOp, x, weight, bias, target, reduction);
  const std::vector<at::Tensor> params = bias.has_value() ? std::vector<at::Tensor>{weight, *bias}
                                                          : std::vector<at::Tensor>{weight};
  const cpu::FitOptimizer o{adam,      lr,      weight_decay, maximize, beta1,
                            beta2,     eps,     decoupled,    amsgrad,  momentum,
                            dampening, nesterov, first_step};
  check_train_step_params(kOp, params, state, o);
  const c10::DeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;
  if (weight.size(0) <= kMaxFusedOut) {
    const LinearMseCall c = prepare_linear_mse(x, weight, bias, target, reduction, false, false);
    if (x.scalar_type() == at::kDouble) return fused_train_step<double>(c, reduction, params, state, o);
    return fused_train_step<float>(c, reduction, params, state, o);
  }
  auto [loss, grad_weight, grad_bias, grad_x] =
      linear_mse_fwd_bwd_cuda(x, weight, bias, target, reduction, false, true);
  const std::vector<at::Tensor> grads = bias.has_value() ? std::vector<at::Tensor>{grad_weight, grad_bias}
                                                         : std::vector<at::Tensor>{grad_weight};
  const size_t n = params.size();
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
