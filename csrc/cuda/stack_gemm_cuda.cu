// The forward and backward of a layer stack on CUDA as GEMMs (see stack_gemm_cuda.h; the math and
// its notation: stack_math.h). The GEMMs go through ATen, so cuBLAS, which follows torch's
// allow_tf32 flags; everything elementwise around them is fused into one kernel per layer:
//   forward, per layer l:  Z_l = A_{l-1} W_l^T (GEMM), then ONE kernel adds b_l and applies the
//                          activation, A_l = act_l(Z_l), written over Z_l where the derivative
//                          reads A_l alone (ReLU, tanh, sigmoid), else beside it;
//   loss:                  ONE kernel writes dloss/dA_L and per-block loss sums, ONE one-warp kernel
//                          adds those in block order and divides by the reduction's count (cross
//                          entropy under "mean" first counts its rows not ignored, ONE kernel);
//   backward, from the top: G_l = dloss/dZ_l; dW_l = G_l^T A_{l-1} (GEMM; the second use of an
//                          nn.Linear adds to the first's), db_l = the column sums of G_l (ATen's
//                          reduction), dA_{l-1} = G_l W_l (GEMM), then ONE kernel multiplies it by
//                          act_{l-1}'(Z_{l-1}) in place, giving G_{l-1}.
// So at most 2 launches per layer forward, 4 backward, 2-3 for the loss. Nothing is read on the
// host and every buffer comes from the caching allocator: a step can be captured in a CUDA graph.
// Every sum of ours runs in a fixed order for a given shape (no atomics), so results repeat.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "fusedtrain/stack_math.h"
#include "grid_sum.cuh"
#include "launch.cuh"
#include "stack_gemm_cuda.h"

namespace fusedtrain {
namespace cuda {
namespace {

using math::Act;
using math::Activation;
using math::Loss;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Grid-stride kernels launch at most this many blocks: enough to fill any current GPU.
constexpr int64_t kMaxBlocks = 4096;
// The one-block kernel that counts cross entropy's rows not ignored.
constexpr int kCountThreads = 1024;

int blocks_for(int64_t work) {
  return static_cast<int>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

// The sum of every thread's `v` on thread 0, in a fixed order (warps, then warp by warp).
template <typename T, int kBlockWarps>
__device__ T block_sum(T v) {
  __shared__ T warp_sums[kBlockWarps];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBlockWarps; ++w) total += warp_sums[w];
  }
  return total;
}

// Forward, after the GEMM: Z += b (kBias), A = act(Z). Z and A are rows x out, row-major; A may be
// Z's memory (always for the identity, which runs only to add the bias).
template <typename T, typename Activ, bool kBias>
__global__ void __launch_bounds__(kThreads)
bias_activation(T* z, const T* bias, T* a, int64_t count, int64_t out, T param) {
  constexpr bool kIdentity = std::is_same_v<Activ, Act<Activation::kIdentity>>;
  const bool store_z = kBias && (kIdentity || a != z);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // The bias column of element i moves on by stride mod out per step: one division per thread
  // instead of a 64-bit remainder per element.
  int64_t column = kBias ? i % out : 0;
  const int64_t column_step = kBias ? stride % out : 0;
  for (; i < count; i += stride) {
    T v = z[i];
    if constexpr (kBias) {
      v += bias[column];
      column += column_step;
      if (column >= out) column -= out;
    }
    if (store_z) z[i] = v;
    if constexpr (!kIdentity) a[i] = Activ::forward(v, param);
  }
}

// Backward: dA of the layer's output into G = dA * act'(Z), in place (a = act(z); z is a's
// memory where the derivative reads a alone).
template <typename T, typename Activ>
__global__ void __launch_bounds__(kThreads)
scale_by_derivative(T* g, const T* z, const T* a, int64_t count, T param) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    g[i] *= Activ::derivative(z[i], a[i], param);
  }
}

// The loss heads on one element of the prediction y against its target t: its loss and dloss/dy.
template <Loss kLoss>
struct ElementLoss {  // the regression heads, on the residual y - t
  template <typename T> __device__ static T value(T y, T t, T p) { return math::Regression<kLoss>::value(y - t, p); }
  template <typename T> __device__ static T grad(T y, T t, T p) { return math::Regression<kLoss>::grad(y - t, p); }
};
template <>
struct ElementLoss<Loss::kBceWithLogits> {
  template <typename T> __device__ static T value(T y, T t, T) { return math::bce_with_logits_value(y, t); }
  template <typename T> __device__ static T grad(T y, T t, T) { return math::bce_with_logits_grad(y, t); }
};

template <typename T>
struct LossArgs {
  const T* y;            // the prediction A_L, rows x out
  const void* target;    // rows x out of T; rows int64 classes for cross entropy
  T* grad;               // dloss/dA_L, rows x out
  int64_t rows, out;
  T loss_param;          // SmoothL1's beta, Huber's delta
  T scale;               // 1/R (R = rows * out) under "mean", 1 under "sum"
  const double* kept;    // cross entropy under "mean": its R, the rows not ignored (replaces scale)
  int64_t ignore_index;
  T label_smoothing;
  double* block_losses;  // gridDim.x: each block's summed loss
};

template <typename T, Loss kLoss>
__global__ void __launch_bounds__(kThreads) element_loss(LossArgs<T> a) {
  const T* t = static_cast<const T*>(a.target);
  const int64_t count = a.rows * a.out;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double local = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    local += static_cast<double>(ElementLoss<kLoss>::value(a.y[i], t[i], a.loss_param));
    a.grad[i] = ElementLoss<kLoss>::grad(a.y[i], t[i], a.loss_param) * a.scale;
  }
  const double total = block_sum<double, kWarps>(local);
  if (threadIdx.x == 0) a.block_losses[blockIdx.x] = total;
}

// A thread per row (the softmax of a row is a short sequential loop over its classes).
template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_loss(LossArgs<T> a) {
  const int64_t* classes = static_cast<const int64_t*>(a.target);
  const T scale = a.kept != nullptr ? static_cast<T>(1.0 / *a.kept) : a.scale;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double local = 0.0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < a.rows; r += stride) {
    T* grad = a.grad + r * a.out;
    const int64_t target = classes[r];
    if (target == a.ignore_index) {  // an ignored row: no loss, no gradient
      for (int64_t c = 0; c < a.out; ++c) grad[c] = T(0);
      continue;
    }
    // A class outside the logits stops the kernel, as torch's nll_loss does on the GPU: checking
    // on the host would wait for the device.
    CUDA_KERNEL_ASSERT(target >= 0 && target < a.out);
    local += static_cast<double>(
        math::cross_entropy_row(a.y + r * a.out, a.out, target, a.label_smoothing, scale, grad));
  }
  const double total = block_sum<double, kWarps>(local);
  if (threadIdx.x == 0) a.block_losses[blockIdx.x] = total;
}

// Cross entropy's R under "mean": the rows whose class is not ignore_index.
__global__ void __launch_bounds__(kCountThreads)
count_kept_rows(const int64_t* classes, int64_t rows, int64_t ignore_index, double* kept) {
  int64_t local = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) local += classes[r] != ignore_index;
  const int64_t total = block_sum<int64_t, kCountThreads / 32>(local);
  if (threadIdx.x == 0) *kept = static_cast<double>(total);
}

// One warp: the block sums in a fixed order, over the reduction's count (an empty "mean" is 0/0,
// a NaN, as torch).
template <typename T>
__global__ void finish_loss(const double* block_losses, int blocks, double count, const double* kept, T* loss) {
  double total = 0.0;
  for (int b = threadIdx.x; b < blocks; b += 32) total += block_losses[b];
  total = warp_sum(total);
  if (threadIdx.x == 0) *loss = static_cast<T>(total / (kept != nullptr ? *kept : count));
}

using math::with_activation;

template <typename T>
class GemmStack {
 public:
  GemmStack(const at::Tensor& x, at::TensorList params, const StackSpec& spec)
      : x_(x), params_(params), spec_(spec), stream_(native(current_stream(x.device()))) {}

  std::tuple<at::Tensor, std::vector<at::Tensor>> run(const at::Tensor& target, bool need_grads) {
    forward();
    const at::Tensor& top = a_.back();
    const int64_t rows = x_.size(0), out = top.size(1);
    // dloss/dZ of the layer being differentiated, and the GEMM's dA of the layer below: two
    // buffers of the widest layer, taken in turn.
    int64_t widest = out;
    for (size_t l = 1; l < spec_.layers(); ++l) widest = std::max(widest, a_[l - 1].size(1));
    buffers_[0] = at::empty({rows * widest}, x_.options());
    buffers_[1] = need_grads && spec_.layers() > 1 ? at::empty({rows * widest}, x_.options()) : at::Tensor();
    int current = 0;  // the buffer that holds g
    at::Tensor g = buffer(current, rows, out);
    const at::Tensor loss = loss_and_grad(target, g);
    if (!need_grads) return {loss, {}};
    std::vector<at::Tensor> grads;
    for (const at::Tensor& p : params_) grads.push_back(at::empty_like(p));
    std::vector<bool> written(params_.size(), false);
    scale_by(spec_.layers() - 1, g);
    for (size_t l = spec_.layers(); l-- > 0;) {
      const size_t p = static_cast<size_t>(spec_.layer_params[l]);
      const at::Tensor& a_below = l == 0 ? x_ : a_[l - 1];
      // An nn.Linear used twice: its gradients add up both uses.
      if (written[p]) {
        grads[p].addmm_(g.t(), a_below);
      } else {
        at::mm_out(grads[p], g.t(), a_below);
        written[p] = true;
      }
      if (spec_.has_bias[l] && written[p + 1]) {
        grads[p + 1].add_(g.sum(0));
      } else if (spec_.has_bias[l]) {
        at::sum_out(grads[p + 1], g, at::IntArrayRef{0});
        written[p + 1] = true;
      }
      if (l == 0) break;
      current = 1 - current;
      at::Tensor g_below = buffer(current, rows, a_below.size(1));
      at::mm_out(g_below, g, params_[p]);
      scale_by(l - 1, g_below);
      g = g_below;
    }
    return {loss, grads};
  }

 private:
  // Z_l and A_l of every layer, kept for the backward (one buffer where the derivative reads A_l
  // alone).
  void forward() {
    at::Tensor input = x_;
    for (size_t l = 0; l < spec_.layers(); ++l) {
      const size_t p = static_cast<size_t>(spec_.layer_params[l]);
      const at::Tensor& weight = params_[p];
      at::Tensor z = at::empty({x_.size(0), weight.size(0)}, x_.options());
      at::mm_out(z, input, weight.t());
      const bool identity = spec_.activations[l] == Activation::kIdentity;
      bool from_output = false;
      with_activation(spec_.activations[l], [&](auto activation) {
        from_output = decltype(activation)::kDerivativeFromOutput;
      });
      at::Tensor a = from_output ? z : at::empty_like(z);
      const int64_t count = z.numel();
      if (count > 0 && (spec_.has_bias[l] || !identity)) {
        const T* bias = spec_.has_bias[l] ? params_[p + 1].data_ptr<T>() : nullptr;
        const T param = static_cast<T>(spec_.activation_params[l]);
        with_activation(spec_.activations[l], [&](auto activation) {
          with_flag(bias != nullptr, [&](auto with_bias) {
            bias_activation<T, decltype(activation), decltype(with_bias)::value>
                <<<blocks_for(count), kThreads, 0, stream_>>>(z.data_ptr<T>(), bias, a.data_ptr<T>(), count,
                                                              z.size(1), param);
            check_launch();
          });
        });
      }
      z_.push_back(z);
      a_.push_back(a);
      input = a;
    }
  }

  // The loss (0-dim, T) and dloss/dA_L into g.
  at::Tensor loss_and_grad(const at::Tensor& target_in, at::Tensor& g) {
    const at::Tensor target = target_in.contiguous();
    const at::Tensor& top = a_.back();
    const int64_t rows = top.size(0), out = top.size(1);
    const bool mean = spec_.reduction == at::Reduction::Mean;
    const bool classes = spec_.loss == Loss::kCrossEntropy;
    const auto options = x_.options();
    const at::Tensor kept = at::empty({classes && mean ? 1 : 0}, options.dtype(at::kDouble));
    if (kept.numel() > 0) {
      count_kept_rows<<<1, kCountThreads, 0, stream_>>>(target.data_ptr<int64_t>(), rows, spec_.ignore_index,
                                                        kept.data_ptr<double>());
      check_launch();
    }
    const double count = mean && !classes ? static_cast<double>(rows * out) : 1.0;
    const int blocks = blocks_for(classes ? rows : rows * out);
    const at::Tensor block_losses = at::empty({blocks}, options.dtype(at::kDouble));
    const LossArgs<T> args{top.data_ptr<T>(), target.data_ptr(), g.data_ptr<T>(), rows, out,
                           static_cast<T>(spec_.loss_param), static_cast<T>(1.0 / count),
                           kept.numel() > 0 ? kept.data_ptr<double>() : nullptr, spec_.ignore_index,
                           static_cast<T>(spec_.label_smoothing), block_losses.data_ptr<double>()};
    switch (spec_.loss) {
      case Loss::kMse: element_loss<T, Loss::kMse><<<blocks, kThreads, 0, stream_>>>(args); break;
      case Loss::kL1: element_loss<T, Loss::kL1><<<blocks, kThreads, 0, stream_>>>(args); break;
      case Loss::kSmoothL1: element_loss<T, Loss::kSmoothL1><<<blocks, kThreads, 0, stream_>>>(args); break;
      case Loss::kHuber: element_loss<T, Loss::kHuber><<<blocks, kThreads, 0, stream_>>>(args); break;
      case Loss::kCrossEntropy: cross_entropy_loss<T><<<blocks, kThreads, 0, stream_>>>(args); break;
      case Loss::kBceWithLogits:
        element_loss<T, Loss::kBceWithLogits><<<blocks, kThreads, 0, stream_>>>(args);
        break;
    }
    check_launch();
    at::Tensor loss = at::empty({}, options);
    finish_loss<T><<<1, 32, 0, stream_>>>(block_losses.data_ptr<double>(), blocks, count,
                                          kept.numel() > 0 ? kept.data_ptr<double>() : nullptr,
                                          loss.data_ptr<T>());
    check_launch();
    return loss;
  }

  // g (dloss/dA_l) into dloss/dZ_l, in place; nothing to do after the identity.
  void scale_by(size_t l, at::Tensor& g) {
    const int64_t count = g.numel();
    if (spec_.activations[l] == Activation::kIdentity || count == 0) return;
    const T param = static_cast<T>(spec_.activation_params[l]);
    with_activation(spec_.activations[l], [&](auto activation) {
      if constexpr (!std::is_same_v<decltype(activation), Act<Activation::kIdentity>>) {
        scale_by_derivative<T, decltype(activation)><<<blocks_for(count), kThreads, 0, stream_>>>(
            g.data_ptr<T>(), z_[l].data_ptr<T>(), a_[l].data_ptr<T>(), count, param);
        check_launch();
      }
    });
  }

  // rows x width of buffers_[k].
  at::Tensor buffer(int k, int64_t rows, int64_t width) {
    return buffers_[k].narrow(0, 0, rows * width).view({rows, width});
  }

  const at::Tensor x_;
  at::TensorList params_;
  const StackSpec& spec_;
  cudaStream_t stream_;
  std::vector<at::Tensor> z_, a_;
  at::Tensor buffers_[2];
};

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> gemm_stack_fwd_bwd(const at::Tensor& x, const at::Tensor& target,
                                                                   at::TensorList params, const StackSpec& spec,
                                                                   bool need_grads) {
  if (x.scalar_type() == at::kDouble) return GemmStack<double>(x, params, spec).run(target, need_grads);
  return GemmStack<float>(x, params, spec).run(target, need_grads);
}

}  // namespace cuda
}  // namespace fusedtrain
