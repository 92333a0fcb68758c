// The device side of the one-launch narrow-stack train step (the design: stack_narrow_cuda.cu,
// which launches it): the kernel's arguments, its per-layer loops, a tile's forward and backward,
// the optimizer updates and the kernel body. The one-launch fit (stack_fit_kernel.cuh) runs the
// same tiles and updates. Written against CUDA's built-ins only, so that
// csrc/tests/test_narrow_kernel.cpp can run the same body on CPU threads (csrc/tests/emulation)
// and check it without a GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "../optimizer_hyper.h"
#include "fusedtrain/adam_math.h"
#include "fusedtrain/sgd_math.h"
#include "fusedtrain/stack_math.h"
#include "grid_sum.cuh"
#include "stack_narrow_layout.h"

namespace fusedtrain {
namespace cuda {
namespace narrow {

constexpr int kThreads = kNarrowThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerThread = kNarrowRowsPerThread;

using math::Activation;
using math::Loss;

// The rows of tile `tile` (of `rows_per_tile`) that a batch of n rows has.
__device__ __forceinline__ int tile_rows(int64_t tile, int rows_per_tile, int64_t n) {
  const int64_t left = n - tile * rows_per_tile;
  return static_cast<int>(left < rows_per_tile ? left : rows_per_tile);
}

using math::with_activation;

// f(std::true_type{}) or f(std::false_type{}), on the device.
template <typename F>
__device__ __forceinline__ void device_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The params, and where each one's gradient lies in the flattened gradient of all params (the
// layout of every block's partial): param i's at [offset[i], offset[i + 1]).
template <typename T>
struct ParamTable {
  T* data[kMaxNarrowParams];
  int64_t offset[kMaxNarrowParams + 1];
  int count;

  __device__ int index_of(int64_t e) const {
    int i = 0;
    while (e >= offset[i + 1]) ++i;
    return i;
  }
};

template <typename T>
struct NarrowLayer {
  int param;  // its weight's index in the param table; its bias, if any, is the next
  bool has_bias;
  Activation activation;
  T activation_param;
};

template <typename T>
struct NarrowArgs {
  const T* x;          // n x in_0
  const void* target;  // n x out_L in T, or n int64 classes for cross entropy
  int64_t n;
  int64_t tiles;       // ceil(n / layout.rows)
  NarrowLayout layout;
  NarrowLayer<T> layer[kMaxNarrowLayers];
  ParamTable<T> params;
  Loss loss;
  T loss_param;
  int64_t ignore_index;
  T label_smoothing;
  // Cross entropy under "mean": R is the number of rows not ignored, counted by the kernel.
  bool mean_over_kept;
  T grad_scale;         // otherwise 1 / R (1 under "sum"), R = n * out_L under "mean"
  double loss_divisor;  // and R itself
  int gradient_lanes;   // fused_reduce_lanes of the partials
  T* partials;          // gridDim x params.offset[count]: each block's partial gradient
  double* block_losses;  // gridDim
  int64_t* block_kept;   // gridDim, with mean_over_kept
  T* loss_out;
};

// The sum of v over the block, in thread 0 (warps in order). Ends with the block synchronised.
template <typename V>
__device__ V block_sum(V v, V* warp_parts) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_parts[threadIdx.x / 32] = v;
  __syncthreads();
  V total = V(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_parts[w];
  }
  __syncthreads();
  return total;
}

// Layer l's weight (out x pitch(in)) and bias into its shared-memory slot.
template <typename T>
__device__ void load_layer_weights(const NarrowArgs<T>& a, int l, T* shared) {
  const int in = static_cast<int>(a.layout.in[l]), out = static_cast<int>(a.layout.out[l]);
  const int64_t pitch = narrow_pitch(in);
  T* w = shared + a.layout.weight[l];
  const T* weight = a.params.data[a.layer[l].param];
  for (int e = threadIdx.x; e < out * in; e += kThreads) w[(e / in) * pitch + e % in] = weight[e];
  if (a.layer[l].has_bias) {
    const T* bias = a.params.data[a.layer[l].param + 1];
    for (int j = threadIdx.x; j < out; j += kThreads) w[out * pitch + j] = bias[j];
  }
}

// z = a_in W^T + b and y = act(z) for `rows` rows (y == z for the identity). Each output starts
// at the bias and adds a_k w_k for k = 0, 1, ..., the order of the CPU loops.
template <typename T, typename Act>
__device__ void forward_layer(Act act, T p, const T* a_in, const T* w, const T* bias, int in, int out,
                              int rows, T* z, T* y) {
  const int64_t in_pitch = narrow_pitch(in), out_pitch = narrow_pitch(out);
  const int row_groups = (rows + kRowsPerThread - 1) / kRowsPerThread;
  for (int item = threadIdx.x; item < out * row_groups; item += kThreads) {
    // Consecutive threads take consecutive columns: W's rows at an odd pitch (no bank conflict),
    // one a_in value for the whole warp (a broadcast).
    const int j = item % out, r0 = item / out * kRowsPerThread;
    T acc[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) acc[u] = bias != nullptr ? bias[j] : T(0);
    const T* wj = w + j * in_pitch;
    const T* a0 = a_in + r0 * in_pitch;
    for (int k = 0; k < in; ++k) {
      const T wk = wj[k];
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) acc[u] += a0[u * in_pitch + k] * wk;
    }
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      if (r0 + u >= rows) break;  // a tile's last group may hold fewer rows: theirs are not stored
      z[(r0 + u) * out_pitch + j] = acc[u];
      if (y != z) y[(r0 + u) * out_pitch + j] = act.forward(acc[u], p);
    }
  }
}

// grad_weight (out x in, global) += g^T a_in over the tile's rows, and grad_bias += the column
// sums of g. A thread sums one input column for kRowsPerThread outputs, over the rows in order.
template <typename T>
__device__ void weight_grad(const T* g, const T* a_in, int in, int out, int rows, T* grad_weight,
                            T* grad_bias) {
  const int64_t in_pitch = narrow_pitch(in), g_pitch = narrow_pitch(out);
  const int column_groups = (out + kRowsPerThread - 1) / kRowsPerThread;
  for (int item = threadIdx.x; item < in * column_groups; item += kThreads) {
    const int k = item % in, j0 = item / in * kRowsPerThread;
    const int columns = min(kRowsPerThread, out - j0);
    T acc[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) acc[u] = T(0);
    for (int r = 0; r < rows; ++r) {
      const T ak = a_in[r * in_pitch + k];
      const T* gr = g + r * g_pitch + j0;
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) {
        if (u < columns) acc[u] += gr[u] * ak;
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      if (u < columns) grad_weight[(j0 + u) * in + k] += acc[u];
    }
  }
  if (grad_bias == nullptr) return;
  for (int j = threadIdx.x; j < out; j += kThreads) {
    T acc = T(0);
    for (int r = 0; r < rows; ++r) acc += g[r * g_pitch + j];
    grad_bias[j] += acc;
  }
}

// g_below = (g W) * act'(z_below) for the layer below, whose activation is `act`, outputs
// z_below and y_below (in columns). Each element sums g_j w_jk over j in order, as the CPU.
template <typename T, typename Act>
__device__ void input_grad(Act act, T p, const T* g, const T* w, int in, int out, int rows,
                           const T* z_below, const T* y_below, T* g_below) {
  const int64_t in_pitch = narrow_pitch(in), g_pitch = narrow_pitch(out);
  const int row_groups = (rows + kRowsPerThread - 1) / kRowsPerThread;
  for (int item = threadIdx.x; item < in * row_groups; item += kThreads) {
    // Consecutive threads take consecutive columns k: W[j][k] contiguous, g broadcast.
    const int k = item % in, r0 = item / in * kRowsPerThread;
    T acc[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) acc[u] = T(0);
    const T* g0 = g + r0 * g_pitch;
    for (int j = 0; j < out; ++j) {
      const T wjk = w[j * in_pitch + k];
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) acc[u] += g0[u * g_pitch + j] * wjk;
    }
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      if (r0 + u >= rows) break;
      const int64_t e = (r0 + u) * in_pitch + k;
      g_below[e] = acc[u] * act.derivative(z_below[e], y_below[e], p);
    }
  }
}

// f(Regression<kLoss>{}) for a regression loss code.
template <typename F>
__device__ __forceinline__ void with_regression(Loss loss, F&& f) {
  using math::Regression;
  switch (loss) {
    case Loss::kMse: f(Regression<Loss::kMse>{}); break;
    case Loss::kL1: f(Regression<Loss::kL1>{}); break;
    case Loss::kSmoothL1: f(Regression<Loss::kSmoothL1>{}); break;
    default: f(Regression<Loss::kHuber>{}); break;
  }
}

// The top layer's dloss/dz for the tile's rows into g: the head's gradient in the top output y
// times `scale` (1/R), times act'(z) (the CPU's order); returns this thread's share of the rows'
// unreduced loss.
template <typename T, typename Act>
__device__ double loss_and_grad(const NarrowArgs<T>& a, Act act, T p, int64_t first, int rows, int out,
                                const T* z, const T* y, T scale, T* g) {
  const int64_t pitch = narrow_pitch(out);
  double total = 0.0;
  if (a.loss == Loss::kCrossEntropy) {
    const int64_t* classes = static_cast<const int64_t*>(a.target) + first;
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      T* gr = g + r * pitch;
      const int64_t target = classes[r];
      if (target == a.ignore_index) {  // an ignored row: no loss, no gradient
        for (int c = 0; c < out; ++c) gr[c] = T(0);
        continue;
      }
      // As torch's CUDA kernels: an out-of-range class stops the kernel (a host check would
      // synchronise).
      CUDA_KERNEL_ASSERT(target >= 0 && target < out);
      total += static_cast<double>(
          math::cross_entropy_row(y + r * pitch, static_cast<int64_t>(out), target, a.label_smoothing, scale, gr));
      for (int c = 0; c < out; ++c) gr[c] *= act.derivative(z[r * pitch + c], y[r * pitch + c], p);
    }
    return total;
  }
  const T* t = static_cast<const T*>(a.target) + first * out;
  const int count = rows * out;
  if (a.loss == Loss::kBceWithLogits) {
    for (int e = threadIdx.x; e < count; e += kThreads) {
      const int64_t i = (e / out) * pitch + e % out;
      total += static_cast<double>(math::bce_with_logits_value(y[i], t[e]));
      g[i] = math::bce_with_logits_grad(y[i], t[e]) * scale * act.derivative(z[i], y[i], p);
    }
    return total;
  }
  with_regression(a.loss, [&](auto head) {
    for (int e = threadIdx.x; e < count; e += kThreads) {
      const int64_t i = (e / out) * pitch + e % out;
      const T residual = y[i] - t[e];
      total += static_cast<double>(head.value(residual, a.loss_param));
      g[i] = head.grad(residual, a.loss_param) * scale * act.derivative(z[i], y[i], p);
    }
  });
  return total;
}

// The forward of a tile whose `rows` rows of x are in shared memory (layout.input): every layer's
// z and output. ensure_staged(l) makes layer l's weights available in their slot (nothing to do
// when they are resident). Ends with the block synchronised.
template <typename T, typename Staging>
__device__ void forward_tile(const NarrowArgs<T>& a, T* shared, int rows, Staging&& ensure_staged) {
  const NarrowLayout& s = a.layout;
  for (int l = 0; l < s.layers; ++l) {
    ensure_staged(l);
    __syncthreads();
    const int in = static_cast<int>(s.in[l]), out = static_cast<int>(s.out[l]);
    const T* w = shared + s.weight[l];
    const T* bias = a.layer[l].has_bias ? w + out * narrow_pitch(in) : nullptr;
    const T* a_in = l == 0 ? shared + s.input : shared + s.a[l - 1];
    with_activation(a.layer[l].activation, [&](auto act) {
      forward_layer(act, a.layer[l].activation_param, a_in, w, bias, in, out, rows, shared + s.z[l],
                    shared + s.a[l]);
    });
  }
  __syncthreads();
}

// After forward_tile: the top layer's dloss/dz for the tile's rows (their targets from row
// `first` of a.target on) into its gradient buffer; returns this thread's share of the rows' loss.
template <typename T>
__device__ double tile_loss_and_grad(const NarrowArgs<T>& a, T* shared, int64_t first, int rows, T scale) {
  const NarrowLayout& s = a.layout;
  const int top = s.layers - 1;
  double loss = 0.0;
  with_activation(a.layer[top].activation, [&](auto act) {
    loss = loss_and_grad(a, act, a.layer[top].activation_param, first, rows, static_cast<int>(s.out[top]),
                         shared + s.z[top], shared + s.a[top], scale, shared + s.grad[top % 2]);
  });
  return loss;
}

// After tile_loss_and_grad: every layer's dW and db for the tile's rows added into `partial` (all
// params' gradients, laid out as a.params.offset), top down, each layer's dloss/dz passed to the
// one below through W and its activation's derivative.
template <typename T, typename Staging>
__device__ void backward_tile(const NarrowArgs<T>& a, T* shared, int rows, T* partial, Staging&& ensure_staged) {
  const NarrowLayout& s = a.layout;
  for (int l = s.layers - 1; l >= 0; --l) {
    __syncthreads();  // layer l's g is complete
    if (l > 0) {
      ensure_staged(l);
      __syncthreads();
    }
    const int in = static_cast<int>(s.in[l]), out = static_cast<int>(s.out[l]);
    const T* g = shared + s.grad[l % 2];
    const NarrowLayer<T>& layer = a.layer[l];
    weight_grad(g, l == 0 ? shared + s.input : shared + s.a[l - 1], in, out, rows,
                partial + a.params.offset[layer.param],
                layer.has_bias ? partial + a.params.offset[layer.param + 1] : nullptr);
    if (l == 0) break;
    const NarrowLayer<T>& below = a.layer[l - 1];
    with_activation(below.activation, [&](auto act) {
      input_grad(act, below.activation_param, g, shared + s.weight[l], in, out, rows, shared + s.z[l - 1],
                 shared + s.a[l - 1], shared + s.grad[(l - 1) % 2]);
    });
  }
}

// Adam / AdamW on every param, each with its own state and step count.
template <typename T>
struct NarrowAdam {
  T* exp_avg[kMaxNarrowParams];
  T* exp_avg_sq[kMaxNarrowParams];
  T* max_exp_avg_sq[kMaxNarrowParams];  // null unless amsgrad
  float* step[kMaxNarrowParams];
  AdamHyper h;

  struct Shared {
    math::AdamCoeffs<T> of[kMaxNarrowParams];
  };

  // Each param's coefficients, folded once per block from its step count as optim_cuda.cu does;
  // read before the grid barrier, after which block 0 increments the counts.
  __device__ void prepare(const ParamTable<T>& params, Shared& s) const {
    for (int i = threadIdx.x; i < params.count; i += kThreads) {
      const double t = static_cast<double>(*step[i]) + 1.0;
      s.of[i] = math::make_adam_coeffs<T>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled,
                                          h.maximize, t);
    }
  }

  // for_each_gradient(f) calls f(e, the gradient of element e) for the elements this thread
  // updates (e indexes all params' elements, as params.offset).
  template <typename ForEachGradient>
  __device__ void apply(const ParamTable<T>& params, const Shared& s, ForEachGradient&& for_each_gradient) const {
    device_flag(h.amsgrad, [&](auto amsgrad) {
      device_flag(h.weight_decay != 0.0 && !h.decoupled, [&](auto coupled) {
        constexpr bool kAmsgrad = decltype(amsgrad)::value;
        for_each_gradient([&](int64_t e, T grad) {
          const int i = params.index_of(e);
          const int64_t j = e - params.offset[i];
          T param = params.data[i][j], m = exp_avg[i][j], v = exp_avg_sq[i][j];
          T v_max = kAmsgrad ? max_exp_avg_sq[i][j] : T(0);
          math::adam_element<kAmsgrad, decltype(coupled)::value>(param, grad, m, v, v_max, s.of[i]);
          params.data[i][j] = param;
          exp_avg[i][j] = m;
          exp_avg_sq[i][j] = v;
          if (kAmsgrad) max_exp_avg_sq[i][j] = v_max;
        });
      });
    });
  }

  __device__ void finish(const ParamTable<T>& params) const {
    for (int i = 0; i < params.count; ++i) *step[i] += 1.0f;
  }

  // The state lists, one pointer per param each (the fit kernel, stack_fit_kernel.cuh, points
  // them into shared memory), and the update of the step after this one (the step counts moved
  // in finish()).
  __device__ int state_lists() const { return h.amsgrad ? 3 : 2; }
  __device__ T** state_list(int k) { return k == 0 ? exp_avg : (k == 1 ? exp_avg_sq : max_exp_avg_sq); }
  __device__ T* const* state_list(int k) const { return k == 0 ? exp_avg : (k == 1 ? exp_avg_sq : max_exp_avg_sq); }
  __device__ void advance() {}
};

// SGD on every param. Its coefficients depend on nothing on the device: the host folds them.
template <typename T>
struct NarrowSgd {
  T* momentum_buffer[kMaxNarrowParams];  // null without momentum
  math::SgdCoeffs<T> c;
  bool decay, momentum, first_step, nesterov;

  struct Shared {};

  __device__ void prepare(const ParamTable<T>&, Shared&) const {}

  // for_each_gradient as NarrowAdam::apply's.
  template <typename ForEachGradient>
  __device__ void apply(const ParamTable<T>& params, const Shared&, ForEachGradient&& for_each_gradient) const {
    const auto run = [&](auto decay_flag, auto momentum_flag, auto first_flag, auto nesterov_flag) {
      constexpr bool kMomentum = decltype(momentum_flag)::value;
      constexpr bool kFirstStep = decltype(first_flag)::value;
      for_each_gradient([&](int64_t e, T grad) {
        const int i = params.index_of(e);
        const int64_t j = e - params.offset[i];
        T param = params.data[i][j];
        // a first step only writes the buffer, which may hold anything before it
        T buffer = kMomentum && !kFirstStep ? momentum_buffer[i][j] : T(0);
        math::sgd_element<decltype(decay_flag)::value, kMomentum, kFirstStep, decltype(nesterov_flag)::value>(
            param, grad, buffer, c);
        params.data[i][j] = param;
        if (kMomentum) momentum_buffer[i][j] = buffer;
      });
    };
    device_flag(decay, [&](auto decay_flag) {
      if (!momentum) {
        run(decay_flag, std::false_type{}, std::false_type{}, std::false_type{});
        return;
      }
      device_flag(first_step, [&](auto first_flag) {
        device_flag(nesterov, [&](auto nesterov_flag) { run(decay_flag, std::true_type{}, first_flag, nesterov_flag); });
      });
    });
  }

  __device__ void finish(const ParamTable<T>&) const {}

  // As NarrowAdam's: after a step, the momentum buffers hold a value.
  __device__ int state_lists() const { return momentum ? 1 : 0; }
  __device__ T** state_list(int) { return momentum_buffer; }
  __device__ T* const* state_list(int) const { return momentum_buffer; }
  __device__ void advance() { first_step = false; }
};

// A block's scalars in shared memory: warp partial sums, the kept rows of cross entropy, and
// what the update folds once per block.
template <typename Update>
struct BlockScalars {
  double warp_losses[kWarps];
  int64_t warp_counts[kWarps];
  int64_t kept_rows;
  typename Update::Shared update;
};

// The kernel's body, on one thread of the cooperative grid: `shared` is the block's dynamic
// shared memory (a.layout), `block` its scalars. (A function apart from the __global__ wrapper in
// stack_narrow_cuda.cu, so that csrc/tests/test_narrow_kernel.cpp runs it on the CPU.)
template <typename T, typename Update>
__device__ void run_narrow_step(const NarrowArgs<T>& a, const Update& update, T* shared, BlockScalars<Update>& block) {
  namespace cg = cooperative_groups;
  double* const warp_losses = block.warp_losses;
  int64_t* const warp_counts = block.warp_counts;
  int64_t& kept_rows = block.kept_rows;
  typename Update::Shared& update_shared = block.update;
  const cg::grid_group grid = cg::this_grid();
  const NarrowLayout& s = a.layout;
  const int layers = s.layers, rows_per_tile = s.rows;
  const int64_t width = a.params.offset[a.params.count];
  T* partial = a.partials + blockIdx.x * width;

  // This block's partial gradient starts at zero; the barriers of the first tile order these
  // writes before the adds.
  for (int64_t e = threadIdx.x; e < width; e += kThreads) partial[e] = T(0);
  if (s.resident) {
    for (int l = 0; l < layers; ++l) load_layer_weights(a, l, shared);
  }

  T scale = a.grad_scale;
  if (a.mean_over_kept) {
    const int64_t* classes = static_cast<const int64_t*>(a.target);
    int64_t kept = 0;
    for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {
      const int64_t first = tile * rows_per_tile;
      const int rows = tile_rows(tile, rows_per_tile, a.n);
      for (int r = threadIdx.x; r < rows; r += kThreads) kept += classes[first + r] != a.ignore_index;
    }
    kept = block_sum(kept, warp_counts);
    if (threadIdx.x == 0) a.block_kept[blockIdx.x] = kept;
    grid.sync();
    if (threadIdx.x == 0) {
      int64_t all = 0;
      for (unsigned int b = 0; b < gridDim.x; ++b) all += __ldcg(a.block_kept + b);
      kept_rows = all;
    }
    __syncthreads();
    // 1 / R in double, then rounded, as the CPU; R = 0 (every row ignored) gives inf, which
    // only the ignored rows' zero gradients see.
    scale = static_cast<T>(1.0 / static_cast<double>(kept_rows));
  }

  double loss = 0.0;
  int staged = -1;  // the layer whose weights the staged slot holds
  const auto ensure_staged = [&](int l) {
    if (s.resident || staged == l) return;
    __syncthreads();  // every thread is done with the slot's previous layer
    load_layer_weights(a, l, shared);
    staged = l;
  };
  for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {
    const int64_t first = tile * rows_per_tile;
    const int rows = tile_rows(tile, rows_per_tile, a.n);
    __syncthreads();  // the previous tile is done with every buffer
    const int in0 = static_cast<int>(s.in[0]);
    T* input = shared + s.input;
    for (int e = threadIdx.x; e < rows * in0; e += kThreads) {
      input[(e / in0) * narrow_pitch(in0) + e % in0] = a.x[first * in0 + e];
    }
    forward_tile(a, shared, rows, ensure_staged);
    loss += tile_loss_and_grad(a, shared, first, rows, scale);
    backward_tile(a, shared, rows, partial, ensure_staged);
  }

  const double block_loss = block_sum(loss, warp_losses);
  if (threadIdx.x == 0) a.block_losses[blockIdx.x] = block_loss;
  update.prepare(a.params, update_shared);
  // Every block's partial and loss are written, and every block is done reading the params and
  // whatever prepare() read.
  grid.sync();

  update.apply(a.params, update_shared, [&](auto&& f) {
    grid_sum_parts(a.partials, width, static_cast<int64_t>(gridDim.x), a.gradient_lanes, f);
  });
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    double total = 0.0;
    for (unsigned int b = 0; b < gridDim.x; ++b) total += __ldcg(a.block_losses + b);
    const double divisor = a.mean_over_kept ? static_cast<double>(kept_rows) : a.loss_divisor;
    *a.loss_out = static_cast<T>(total / divisor);
    update.finish(a.params);
  }
}

}  // namespace narrow
}  // namespace cuda
}  // namespace fusedtrain
