// CUDA implementations of fusedtrain::linear_mse_fwd_bwd and of the train step of one nn.Linear
// under MSELoss, the depth-1 case of the stack ops (stack_cuda.cu calls it through
// linear_mse_cuda.h). The math: linear_mse_math.h; the optimizer updates: adam_math.h and
// sgd_math.h, as on the CPU.
//
// Small outputs (out <= kMaxFusedOut): ONE kernel, launched cooperatively (every block resident
// at once, so blocks can wait for each other at grid-wide barriers), on a grid sized by
// co-residency and split into row groups x column groups (fused_grid.h). In phases:
//   1. (only with several column groups) each block's partial dot products over its columns,
//      a warp per row; barrier; the partials summed per (row, output), spread over the grid,
//      into the residuals, the loss and dloss/dpred; barrier.
//   2. per row chunk of the block's row group: dloss/dpred of the chunk's rows in shared memory
//      (computed here, a warp per row, with one column group; else read), then a thread per
//      column of the block's column group adds g[r][o] * x[r][k] into the row group's partial
//      gradient (and writes grad_x). The block's loss goes to block_losses, and every thread
//      reads what the update needs from memory that moves later (Adam's step counts). Barrier.
//   3. every gradient element (grad_weight flattened, then grad_bias) summed over the row
//      groups, spread over the grid, and handed to the op's Update: fwd_bwd stores it;
//      the train step applies the Adam or SGD element update to that element of weight or bias.
//      Every block read weight and bias before the barrier, so they can be rewritten now. Then
//      block 0 sums the block losses in block order, stores the loss and moves the step counts.
// The whole training step (forward, backward, reduction, update) is a single launch with no host
// synchronisation and no state kept between launches: no counter to reset, nothing shared by
// launches that run at once (two captured CUDA graphs replayed on two streams included). Every
// sum runs in a fixed order for a given grid (grid_sum_parts), so results do not depend on
// timing. The grid barrier (cooperative_groups' grid.sync()) needs the cooperative launch, not
// separate compilation: the driver hands the kernel its barrier through special registers. A
// cooperative launch can be captured into a CUDA graph (a kernel node with the cooperative
// attribute).
// Large outputs, or a device without cooperative launches: the prediction of a block of rows
// comes from a GEMM (ATen, so cuBLAS), one kernel turns it into dloss/dpred in place while
// summing the loss, and GEMMs accumulate the gradients: memory grows by one block, as on the
// CPU. The stack ops' train step (stack_cuda.cu) then runs the optimizer kernels of optim_cuda.cu.
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../linear_mse_checks.h"
#include "../optimizer_hyper.h"
#include "fusedtrain/adam_math.h"
#include "fusedtrain/linear_mse_math.h"
#include "fusedtrain/sgd_math.h"
#include "fused_grid.h"
#include "grid_sum.cuh"
#include "kernel_attributes.cuh"
#include "launch.cuh"
#include "linear_mse_cuda.h"

namespace fusedtrain {
namespace cuda {
namespace {

constexpr int kMaxFusedOut = 16;
constexpr int kThreads = kFusedThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kFusedRows;
constexpr int64_t kLargeOutBlockElements = int64_t{1} << 22;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

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
  FusedGrid grid;
  int prediction_lanes;  // fused_reduce_lanes of the partial dot products
  int gradient_lanes;    // and of the partial gradients
  T* predictions;        // column_groups x n x out partial dot products (column_groups > 1);
                         // column group 0's then holds dloss/dpred
  T* partials;           // row_groups x (out * in + out): per row group grad_weight, grad_bias
  double* block_losses;  // gridDim
};

// What the kernel does with the reduced results. An Update has
//   coeffs(): what each thread reads before the last barrier, as later reads may see it move;
//   apply(coeffs, k, grad): element k of the gradient row (grad_weight flattened, then
//     grad_bias) is `grad`;
//   finish(loss_sum): once, after the last barrier, on one thread.

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
  // The step counts, read by every thread before the last barrier, after which finish()
  // increments them; folded as optim_cuda.cu's kernel does.
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

// Row `row`'s dot products with every output over columns [k_begin, k_end), on a warp
// (lane-strided loads, then a shuffle reduction: the same order on every run); the sums land in
// lane 0's dots.
template <typename T>
__device__ __forceinline__ void warp_dots(const FusedArgs<T>& a, int64_t row, int64_t k_begin,
                                          int64_t k_end, int lane, T (&dots)[kMaxFusedOut]) {
  const T* x = a.x + row * a.in;
#pragma unroll
  for (int o = 0; o < kMaxFusedOut; ++o) dots[o] = T(0);
  for (int64_t k = k_begin + lane; k < k_end; k += 32) {
    const T xk = x[k];
#pragma unroll
    for (int o = 0; o < kMaxFusedOut; ++o) {
      if (o < a.out) dots[o] += xk * a.weight[o * a.in + k];
    }
  }
#pragma unroll
  for (int o = 0; o < kMaxFusedOut; ++o) {
    if (o < a.out) dots[o] = warp_sum(dots[o]);
  }
}

template <typename T, typename Update>
__global__ void __launch_bounds__(kThreads) fused_linear_mse(FusedArgs<T> a, Update update) {
  namespace cg = cooperative_groups;
  __shared__ T g[kRows][kMaxFusedOut];
  __shared__ double warp_losses[kWarps];
  const cg::grid_group grid = cg::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_group = blockIdx.x / a.grid.column_groups;
  const int64_t column_group = blockIdx.x % a.grid.column_groups;
  const int64_t k_begin = min64(a.in, column_group * a.grid.group_columns);
  const int64_t k_end = min64(a.in, k_begin + a.grid.group_columns);
  const int64_t width = static_cast<int64_t>(a.out) * a.in + a.out;
  const int64_t residuals = a.n * a.out;
  T* partial = a.partials + row_group * width;  // used only with need_params
  double loss = 0.0;

  // This block's share of its row group's partial gradient, zeroed by the threads that add into
  // it below (the same column k, the same bias output): no barrier needed in between.
  if (a.need_params) {
    for (int o = 0; o < a.out; ++o) {
      for (int64_t k = k_begin + threadIdx.x; k < k_end; k += blockDim.x) partial[o * a.in + k] = T(0);
    }
    if (column_group == 0 && static_cast<int>(threadIdx.x) < a.out) partial[a.out * a.in + threadIdx.x] = T(0);
  }

  if (a.grid.column_groups > 1) {
    // Phase 1: the partial dot products over this block's columns.
    for (int64_t first = row_group * kRows; first < a.n; first += a.grid.row_groups * kRows) {
      const int rows = static_cast<int>(min64(kRows, a.n - first));
      for (int r = warp; r < rows; r += kWarps) {
        T dots[kMaxFusedOut];
        warp_dots(a, first + r, k_begin, k_end, lane, dots);
        if (lane == 0) {
          T* dst = a.predictions + (column_group * a.n + first + r) * a.out;
#pragma unroll
          for (int o = 0; o < kMaxFusedOut; ++o) {
            if (o < a.out) dst[o] = dots[o];
          }
        }
      }
    }
    grid.sync();
    // Their sums over the column groups into residuals, loss and dloss/dpred, stored in column
    // group 0's place (read by the element's lanes only, which are done with it by then).
    grid_sum_parts(a.predictions, residuals, a.grid.column_groups, a.prediction_lanes,
                   [&](int64_t e, T dot) {
                     const T pred = dot + (a.bias != nullptr ? a.bias[e % a.out] : T(0));
                     const T residual = pred - a.target[e];
                     loss += static_cast<double>(residual) * static_cast<double>(residual);
                     a.predictions[e] = math::mse_grad(residual, a.two_over_count);
                   });
    grid.sync();
  }

  // Phase 2, per row chunk of this block's row group.
  for (int64_t first = row_group * kRows; first < a.n; first += a.grid.row_groups * kRows) {
    const int rows = static_cast<int>(min64(kRows, a.n - first));
    if (a.grid.column_groups == 1) {
      for (int r = warp; r < rows; r += kWarps) {
        T dots[kMaxFusedOut];
        warp_dots(a, first + r, 0, a.in, lane, dots);
        if (lane == 0) {
#pragma unroll
          for (int o = 0; o < kMaxFusedOut; ++o) {
            if (o >= a.out) continue;
            const T pred = dots[o] + (a.bias != nullptr ? a.bias[o] : T(0));
            const T residual = pred - a.target[(first + r) * a.out + o];
            loss += static_cast<double>(residual) * static_cast<double>(residual);
            g[r][o] = math::mse_grad(residual, a.two_over_count);
          }
        }
      }
    } else {
      for (int i = threadIdx.x; i < rows * a.out; i += blockDim.x) {
        g[i / a.out][i % a.out] = __ldcg(a.predictions + first * a.out + i);
      }
    }
    __syncthreads();
    // A thread per column of this block's group: its partial gradient and its grad_x.
    for (int64_t k = k_begin + threadIdx.x; k < k_end; k += blockDim.x) {
      if (a.need_params) {
        T acc[kMaxFusedOut];
#pragma unroll
        for (int o = 0; o < kMaxFusedOut; ++o) acc[o] = T(0);
        for (int r = 0; r < rows; ++r) {
          const T xk = a.x[(first + r) * a.in + k];
#pragma unroll
          for (int o = 0; o < kMaxFusedOut; ++o) {
            if (o < a.out) acc[o] += g[r][o] * xk;
          }
        }
#pragma unroll
        for (int o = 0; o < kMaxFusedOut; ++o) {
          if (o < a.out) partial[o * a.in + k] += acc[o];
        }
      }
      if (a.grad_x != nullptr) {
        T w[kMaxFusedOut];
#pragma unroll
        for (int o = 0; o < kMaxFusedOut; ++o) w[o] = o < a.out ? a.weight[o * a.in + k] : T(0);
        for (int r = 0; r < rows; ++r) {
          T acc = T(0);
#pragma unroll
          for (int o = 0; o < kMaxFusedOut; ++o) {
            if (o < a.out) acc += g[r][o] * w[o];
          }
          a.grad_x[(first + r) * a.in + k] = acc;
        }
      }
    }
    if (a.need_params && column_group == 0 && static_cast<int>(threadIdx.x) < a.out) {
      T acc = T(0);
      for (int r = 0; r < rows; ++r) acc += g[r][threadIdx.x];
      partial[a.out * a.in + threadIdx.x] += acc;
    }
    __syncthreads();  // g is rewritten by the next chunk
  }

  // The block's loss, in warp order.
  loss = warp_sum(loss);
  if (lane == 0) warp_losses[warp] = loss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double block_loss = 0.0;
    for (int w = 0; w < kWarps; ++w) block_loss += warp_losses[w];
    a.block_losses[blockIdx.x] = block_loss;
  }
  const auto coeffs = update.coeffs();
  // Every block's partials and loss are written, and every block is done reading weight, bias
  // and whatever coeffs() read.
  grid.sync();

  // Phase 3: each gradient element summed over the row groups, and applied.
  if (a.need_params) {
    grid_sum_parts(a.partials, width, a.grid.row_groups, a.gradient_lanes,
                   [&](int64_t e, T grad) { update.apply(coeffs, e, grad); });
  }

  if (blockIdx.x == 0 && threadIdx.x == 0) {
    double total = 0.0;
    for (unsigned int b = 0; b < gridDim.x; ++b) total += __ldcg(a.block_losses + b);
    update.finish(total);
  }
}

int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Whether the current device runs cooperative launches, which the fused kernel needs.
bool fused_path_available() {
  int cooperative = 0;
  check_cuda(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, current_device()),
             "cudaDeviceGetAttribute");
  return cooperative != 0;
}

// How many blocks of `kernel` (kThreads threads, static shared memory only) `device` holds at
// once: the largest cooperative grid. Asked once per kernel and device.
int coresident_blocks(const void* kernel, int device) {
  return once_per_kernel_and_device(kernel, device, [&] {
    int sms = 0, per_sm = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return per_sm * sms;
  });
}

// One cooperative launch of the fused kernel over the call's rows, on the current device (which
// fused_path_available() accepted).
template <typename T, typename Update>
void launch_fused(const LinearMseCall& c, bool need_grad_params, T* grad_x, const Update& update,
                  cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(&fused_linear_mse<T, Update>);
  const int device = current_device();
  const auto opts = c.x.options();
  const int64_t width = c.out * c.in + c.out;
  launch_cooperative("fused_linear_mse", coresident_blocks(kernel, device), stream, [&](int64_t most) {
    const FusedGrid grid = choose_fused_grid(c.n, c.in, c.out, need_grad_params, static_cast<int>(most));
    // Freed while the kernel may still run: the caching allocator hands the memory only to
    // work ordered after it on this stream (and keeps it for a graph being captured).
    const at::Tensor predictions =
        at::empty({grid.column_groups > 1 ? grid.column_groups * c.n * c.out : 0}, opts);
    const at::Tensor partials = at::empty({need_grad_params ? grid.row_groups * width : 0}, opts);
    const at::Tensor block_losses = at::empty({grid.blocks()}, opts.dtype(at::kDouble));
    const int64_t threads = static_cast<int64_t>(grid.blocks()) * kThreads;
    FusedArgs<T> args{c.x.data_ptr<T>(), c.weight.data_ptr<T>(),
                      c.bias.defined() ? c.bias.data_ptr<T>() : nullptr,
                      c.target.data_ptr<T>(), c.n, c.in, static_cast<int>(c.out),
                      static_cast<T>(c.two_over_count), need_grad_params, grad_x, grid,
                      fused_reduce_lanes(c.n * c.out, grid.column_groups, threads),
                      fused_reduce_lanes(width, grid.row_groups, threads),
                      predictions.data_ptr<T>(), partials.data_ptr<T>(),
                      block_losses.data_ptr<double>()};
    Update launched_update = update;
    void* kernel_args[] = {&args, &launched_update};
    return cudaLaunchCooperativeKernel(kernel, grid.blocks(), kThreads, kernel_args, 0, stream);
  });
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

  if (out <= kMaxFusedOut && fused_path_available()) {
    const StoreGradients<T> store{need_grad_params ? grad_weight.data_ptr<T>() : nullptr,
                                  need_grad_params && b.defined() ? grad_bias.data_ptr<T>() : nullptr,
                                  out * in, loss_sum.data_ptr<double>()};
    launch_fused<T>(c, need_grad_params, need_grad_x ? grad_x.data_ptr<T>() : nullptr, store,
                    stream);
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

// The train step's params and loss for the fused kernel: weight, bias if the layer has one.
template <typename T>
TrainedParams<T> trained_params(const LinearMseCall& c, at::TensorList params, const at::Tensor& loss,
                                int64_t reduction) {
  return {{params[0].data_ptr<T>(), params.size() > 1 ? params[1].data_ptr<T>() : nullptr},
          c.out * c.in,
          loss.data_ptr<T>(),
          reduction == at::Reduction::Mean ? static_cast<double>(c.count) : 1.0};
}

// Param i's tensor in a state list; null past its end (a bias that is absent, amsgrad off).
template <typename T>
T* state_of(at::TensorList state, size_t i) {
  return i < state.size() ? state[i].data_ptr<T>() : nullptr;
}

template <typename T>
at::Tensor fused_adam_step(const LinearMseCall& c, int64_t reduction, at::TensorList params,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& h) {
  at::Tensor loss = at::empty({}, c.x.options());
  const TrainedParams<T> trained = trained_params<T>(c, params, loss, reduction);
  const auto step_of = [&](size_t i) -> float* { return i < steps.size() ? steps[i].data_ptr<float>() : nullptr; };
  const cudaStream_t stream = native(current_stream(c.x.device()));
  with_flag(h.amsgrad, [&](auto amsgrad) {
    constexpr bool kAmsgrad = decltype(amsgrad)::value;
    with_flag(h.weight_decay != 0.0 && !h.decoupled, [&](auto coupled) {
      launch_fused<T>(c, true, nullptr,
                      AdamUpdate<T, kAmsgrad, decltype(coupled)::value>{
                          trained,
                          {state_of<T>(exp_avgs, 0), state_of<T>(exp_avgs, 1)},
                          {state_of<T>(exp_avg_sqs, 0), state_of<T>(exp_avg_sqs, 1)},
                          {state_of<T>(max_exp_avg_sqs, 0), state_of<T>(max_exp_avg_sqs, 1)},
                          {step_of(0), step_of(1)},
                          h},
                      stream);
    });
  });
  return loss;
}

template <typename T>
at::Tensor fused_sgd_step(const LinearMseCall& c, int64_t reduction, at::TensorList params,
                          at::TensorList momentum_buffers, const SgdHyper& h) {
  at::Tensor loss = at::empty({}, c.x.options());
  const TrainedParams<T> trained = trained_params<T>(c, params, loss, reduction);
  const math::SgdCoeffs<T> coeffs =
      math::make_sgd_coeffs<T>(h.lr, h.momentum, h.dampening, h.weight_decay, h.maximize);
  const cudaStream_t stream = native(current_stream(c.x.device()));
  const auto launch = [&](const auto& update) { launch_fused<T>(c, true, nullptr, update, stream); };
  with_flag(h.weight_decay != 0.0, [&](auto decay) {
    constexpr bool kDecay = decltype(decay)::value;
    if (h.momentum == 0.0) {
      launch(SgdUpdate<T, kDecay, false, false, false>{trained, {nullptr, nullptr}, coeffs});
      return;
    }
    with_flag(h.first_step, [&](auto first) {
      with_flag(h.nesterov, [&](auto nesterov) {
        launch(SgdUpdate<T, kDecay, true, decltype(first)::value, decltype(nesterov)::value>{
            trained, {state_of<T>(momentum_buffers, 0), state_of<T>(momentum_buffers, 1)}, coeffs});
      });
    });
  });
  return loss;
}

LinearMseCall prepare_train_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                 int64_t reduction) {
  const std::optional<at::Tensor> bias = params.size() > 1 ? std::optional<at::Tensor>(params[1]) : std::nullopt;
  return prepare_linear_mse(x, params[0], bias, target, reduction, false, false);
}

}  // namespace

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

bool linear_mse_fused_step_available(int64_t out) { return out <= kMaxFusedOut && fused_path_available(); }

at::Tensor linear_mse_fused_adam_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                      int64_t reduction, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                      const AdamHyper& hyper) {
  const LinearMseCall c = prepare_train_step(x, target, params, reduction);
  if (x.scalar_type() == at::kDouble) {
    return fused_adam_step<double>(c, reduction, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper);
  }
  return fused_adam_step<float>(c, reduction, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper);
}

at::Tensor linear_mse_fused_sgd_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                     int64_t reduction, at::TensorList momentum_buffers, const SgdHyper& hyper) {
  const LinearMseCall c = prepare_train_step(x, target, params, reduction);
  if (x.scalar_type() == at::kDouble) return fused_sgd_step<double>(c, reduction, params, momentum_buffers, hyper);
  return fused_sgd_step<float>(c, reduction, params, momentum_buffers, hyper);
}

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("linear_mse_fwd_bwd", &linear_mse_fwd_bwd_cuda);
}

}  // namespace cuda
}  // namespace fusedtrain
