// CPU implementation of the layer-stack ops (see stack_cpu.h; the math: stack_math.h).
//
// A step runs the rows of a batch in blocks. Each block does its whole forward (every layer's
// pre-activation z and activation y kept in a workspace), the loss and its gradient, and the
// backward with the activation derivatives fused into the loops, adding its weight and bias
// gradients into the block's own accumulators. The blocks' accumulators are summed in block
// order, so the result does not depend on how many threads ran the blocks; the number of blocks
// depends on the batch size alone. Small layers (the tutorials' widths) run the per-instruction-
// set loops of stack_loops.h; a large layer makes the batch one block and goes through ATen's GEMM.
// One nn.Linear under MSE (depth 1) runs the linear + MSE kernels instead: one pass over x for
// narrow outputs (linear_mse_rows.h), GEMMs in row blocks for wide ones (linear_mse_cpu.cpp).
// No autograd, no tensor per layer: the gradients live in buffers that the optimizer update reads
// (param_update.h) and that fwd_bwd copies out.
#include "stack_cpu.h"

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "linear_mse_cpu.h"
#include "linear_mse_rows.h"

namespace fusedtrain {
namespace cpu {
namespace {

// A layer whose weight has more elements than this goes through ATen's GEMM: its loops would no
// longer run from the cache, where a blocked GEMM does.
constexpr int64_t kMaxLoopLayerElements = 1 << 14;
// Blocks of at least kMinBlockRows rows, at most kMaxBlocks of them.
constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMaxBlocks = 64;
// Multiply-adds of a batch (forward and backward) below which its blocks run on one thread.
constexpr int64_t kMinParallelMacs = int64_t{1} << 20;

template <typename T>
const StackKernels<T>& stack_kernels();
template <>
const StackKernels<float>& stack_kernels<float>() { return active_kernels().stack_f32; }
template <>
const StackKernels<double>& stack_kernels<double>() { return active_kernels().stack_f64; }

// A buffer of `count` values of T as a tensor, for ATen's GEMM (no copy, no ownership).
template <typename T>
at::Tensor view(T* data, at::IntArrayRef sizes) {
  return at::from_blob(data, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Cross entropy's targets must be classes of the output or the ignore index (torch's check).
void check_classes(const char* op, const StackSpec& spec, const at::Tensor& target, int64_t classes) {
  if (spec.loss != math::Loss::kCrossEntropy) return;
  const at::Tensor t = target.contiguous();
  const int64_t* data = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_INDEX(data[i] == spec.ignore_index || (data[i] >= 0 && data[i] < classes), op,
                      ": Target ", data[i], " is out of bounds (", classes, " classes; target[", i, "])");
  }
}

// f(begin, count) over [0, total) split among the threads: for a GEMM layer's elementwise passes,
// each element on its own, so the split does not change the result.
template <typename F>
void on_all_threads(int64_t total, const F& f) {
  at::parallel_for(0, total, kMinParallelElements, [&](int64_t begin, int64_t end) { f(begin, end - begin); });
}

// An allocator that leaves new elements uninitialized: a wide layer's gradient buffer is written
// whole by its first GEMM, so zeroing it first would be one more pass over as many bytes as the
// weights.
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// The forward and backward of a stack over batches, with gradients kept in buffers between calls.
template <typename T>
class StackStep {
 public:
  using Buffer = std::vector<T, UninitializedAllocator<T>>;

 public:
  StackStep(const StackSpec& spec, at::TensorList params, int64_t in) : spec_(spec) {
    int64_t width = in;
    for (size_t l = 0; l < spec.layers(); ++l) {
      const size_t p = static_cast<size_t>(spec.layer_params[l]);
      const at::Tensor& w = params[p];
      StackLayer<T> layer{w.data_ptr<T>(), nullptr, spec.has_bias[l] ? params[p + 1].data_ptr<T>() : nullptr,
                          width, w.size(0), spec.activations[l], static_cast<T>(spec.activation_params[l])};
      layers_.push_back(layer);
      gemm_ = gemm_ || layer.in * layer.out > kMaxLoopLayerElements;
      macs_per_row_ += 3 * layer.in * layer.out;  // forward, weight gradient, input gradient
      weight_index_.push_back(p);
      width = layer.out;
    }
    linear_mse_ = spec.layers() == 1 && spec.activations[0] == math::Activation::kIdentity &&
                  spec.loss == math::Loss::kMse;
    for (const at::Tensor& param : params) grads_.emplace_back(param.numel());
    for (Buffer& g : grads_) grad_pointers_.push_back(g.data());
    // A param of a GEMM layer has its gradient written by the layer's first use in a batch (then
    // added to by a second use); the loops add into theirs, which start at zero.
    written_by_gemm_.assign(params.size(), -1);
    for (size_t l = 0; l < layers_.size(); ++l) {
      if (!is_gemm(layers_[l])) continue;
      written_by_gemm_[weight_index_[l]] = 0;
      if (layers_[l].bias != nullptr) written_by_gemm_[weight_index_[l] + 1] = 0;
    }
    weight_t_.resize(layers_.size());
  }

  int64_t out() const { return layers_.back().out; }
  const std::vector<void*>& grad_pointers() const { return grad_pointers_; }
  const std::vector<Buffer>& grads() const { return grads_; }

  // The loss of `rows` rows (reduced as the spec says); with want_grads, the gradient of every
  // param in grads().
  double run(const T* x, const void* target, int64_t rows, bool want_grads) {
    if (linear_mse_) return run_linear_mse(x, static_cast<const T*>(target), rows, want_grads);
    for (size_t l = 0; l < layers_.size(); ++l) {  // W^T of each loop layer, for the forward
      StackLayer<T>& layer = layers_[l];
      if (is_gemm(layer)) continue;
      weight_t_[l].resize(layer.in * layer.out);
      for (int64_t j = 0; j < layer.out; ++j) {
        for (int64_t k = 0; k < layer.in; ++k) weight_t_[l][k * layer.out + j] = layer.weight[j * layer.in + k];
      }
      layer.weight_t = weight_t_[l].data();
    }
    const double count = reduction_count(target, rows);
    const T scale = static_cast<T>(spec_.reduction == at::Reduction::Mean ? 1.0 / count : 1.0);
    const StackLoss<T> loss{spec_.loss, static_cast<T>(spec_.loss_param), scale, spec_.ignore_index,
                            static_cast<T>(spec_.label_smoothing)};
    for (size_t p = 0; want_grads && p < grads_.size(); ++p) {
      if (written_by_gemm_[p] < 0) {
        std::fill(grads_[p].begin(), grads_[p].end(), T(0));
      } else {
        written_by_gemm_[p] = 0;
      }
    }
    const int64_t block_rows = gemm_ ? std::max<int64_t>(rows, 1)
                                     : std::max(kMinBlockRows, (rows + kMaxBlocks - 1) / kMaxBlocks);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    double total = 0.0;
    if (blocks <= 1) {
      if (workspaces_.empty()) workspaces_.resize(1);
      total = run_block(x, target, 0, rows, loss, want_grads, workspace(0, block_rows), grad_pointers_);
    } else {
      // Each block into its own accumulators, summed in block order below.
      std::vector<double> block_losses(blocks, 0.0);
      size_t width = 0;
      for (const Buffer& g : grads_) width += g.size();
      partials_.assign(want_grads ? blocks * width : 0, T(0));
      // One workspace per thread, made before the threads start (they only size their own).
      if (workspaces_.size() < static_cast<size_t>(at::get_num_threads())) workspaces_.resize(at::get_num_threads());
      // Waking the thread pool costs more than a small batch's work: such blocks run one after
      // another, into the same accumulators, so the result is the same either way.
      const int64_t grain = rows * macs_per_row_ >= kMinParallelMacs ? 1 : blocks;
      at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
        Workspace& ws = workspace(at::get_thread_num(), block_rows);
        for (int64_t b = first; b < last; ++b) {
          std::vector<void*> accumulators;
          T* partial = want_grads ? partials_.data() + b * width : nullptr;
          for (const Buffer& g : grads_) {
            accumulators.push_back(partial);
            if (partial != nullptr) partial += g.size();
          }
          const int64_t begin = b * block_rows;
          block_losses[b] = run_block(x, target, begin, std::min(rows, begin + block_rows), loss,
                                      want_grads, ws, accumulators);
        }
      });
      for (int64_t b = 0; b < blocks; ++b) {
        total += block_losses[b];
        if (!want_grads) continue;
        const T* partial = partials_.data() + b * width;
        for (Buffer& g : grads_) {
          for (size_t k = 0; k < g.size(); ++k) g[k] += partial[k];
          partial += g.size();
        }
      }
    }
    return spec_.reduction == at::Reduction::Mean ? total / count : total;
  }

 private:
  struct Workspace {
    std::vector<std::vector<T>> z, y;  // per layer, rows x out (y unused for the identity)
    std::vector<T> g, g_below;         // rows x widest layer
  };

  // Depth 1 under MSE: the linear + MSE kernels, which write the gradients.
  double run_linear_mse(const T* x, const T* target, int64_t rows, bool want_grads) {
    const StackLayer<T>& layer = layers_.front();
    const bool mean = spec_.reduction == at::Reduction::Mean;
    const double count = mean ? static_cast<double>(rows * layer.out) : 1.0;
    T* grad_weight = want_grads ? grads_[0].data() : nullptr;
    T* grad_bias = want_grads && layer.bias != nullptr ? grads_[1].data() : nullptr;
    if (layer.out <= kMaxFusedOut) {
      const double loss_sum = fused_linear_mse_rows<T>(x, layer.weight, layer.bias, target, rows, layer.in,
                                                       layer.out, static_cast<T>(2.0 / count), grad_weight,
                                                       grad_bias, nullptr, linear_workspace_);
      return loss_sum / count;
    }
    const auto as_tensor = [](const T* data, at::IntArrayRef sizes) { return view(const_cast<T*>(data), sizes); };
    auto [loss, gw, gb, gx] = linear_mse_fwd_bwd_cpu(
        as_tensor(x, {rows, layer.in}), as_tensor(layer.weight, {layer.out, layer.in}),
        layer.bias != nullptr ? std::optional<at::Tensor>(as_tensor(layer.bias, {layer.out})) : std::nullopt,
        as_tensor(target, {rows, layer.out}), spec_.reduction, false, want_grads);
    if (want_grads) {
      std::copy(gw.template data_ptr<T>(), gw.template data_ptr<T>() + gw.numel(), grad_weight);
      if (grad_bias != nullptr) {
        std::copy(gb.template data_ptr<T>(), gb.template data_ptr<T>() + gb.numel(), grad_bias);
      }
    }
    return loss.template item<double>();
  }

  bool is_gemm(const StackLayer<T>& layer) const { return gemm_ && layer.in * layer.out > kMaxLoopLayerElements; }

  // R of the mean: the residuals (rows x out), or for cross entropy the rows not ignored.
  double reduction_count(const void* target, int64_t rows) const {
    if (spec_.loss != math::Loss::kCrossEntropy) return static_cast<double>(rows * out());
    const int64_t* classes = static_cast<const int64_t*>(target);
    int64_t kept = 0;
    for (int64_t r = 0; r < rows; ++r) kept += classes[r] != spec_.ignore_index;
    return static_cast<double>(kept);
  }

  // Thread `thread`'s workspace, sized for blocks of `rows` rows (workspaces_ has its entry).
  Workspace& workspace(int thread, int64_t rows) {
    Workspace& ws = workspaces_[thread];
    int64_t widest = layers_.front().in;
    ws.z.resize(layers_.size());
    ws.y.resize(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      const size_t size = static_cast<size_t>(rows * layers_[l].out);
      if (ws.z[l].size() < size) ws.z[l].resize(size);
      if (layers_[l].activation != math::Activation::kIdentity && ws.y[l].size() < size) ws.y[l].resize(size);
      widest = std::max(widest, layers_[l].out);
    }
    if (ws.g.size() < static_cast<size_t>(rows * widest)) {
      ws.g.resize(rows * widest);
      ws.g_below.resize(rows * widest);
    }
    return ws;
  }

  T* output(Workspace& ws, size_t l) {
    return layers_[l].activation == math::Activation::kIdentity ? ws.z[l].data() : ws.y[l].data();
  }

  // Rows [begin, end): forward, loss, backward into accumulators[p] (param p's gradient, added to;
  // null entries: no gradients wanted). Returns the rows' unreduced loss sum.
  double run_block(const T* x, const void* target, int64_t begin, int64_t end, const StackLoss<T>& loss,
                   bool want_grads, Workspace& ws, const std::vector<void*>& accumulators) {
    const StackKernels<T>& k = stack_kernels<T>();
    const int64_t rows = end - begin;
    const T* input = x + begin * layers_.front().in;
    const T* a = input;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const StackLayer<T>& layer = layers_[l];
      if (is_gemm(layer)) {
        at::Tensor z = view(ws.z[l].data(), {rows, layer.out});
        const at::Tensor a_in = view(const_cast<T*>(a), {rows, layer.in});
        const at::Tensor w = view(const_cast<T*>(layer.weight), {layer.out, layer.in});
        if (layer.bias != nullptr) {
          at::addmm_out(z, view(const_cast<T*>(layer.bias), {layer.out}), a_in, w.t());
        } else {
          at::mm_out(z, a_in, w.t());
        }
        const T* z_data = ws.z[l].data();
        T* y_data = output(ws, l);
        on_all_threads(rows * layer.out, [&](int64_t begin, int64_t count) {
          k.activate(layer, z_data + begin, count, y_data + begin);
        });
      } else {
        k.forward(layer, a, rows, ws.z[l].data(), output(ws, l));
      }
      a = output(ws, l);
    }
    const size_t top = layers_.size() - 1;
    const void* block_target = spec_.loss == math::Loss::kCrossEntropy
                                   ? static_cast<const void*>(static_cast<const int64_t*>(target) + begin)
                                   : static_cast<const void*>(static_cast<const T*>(target) + begin * out());
    const double total = k.loss(loss, layers_[top], ws.z[top].data(), output(ws, top), block_target, rows, ws.g.data());
    if (!want_grads) return total;
    for (size_t l = top + 1; l-- > 0;) {
      const StackLayer<T>& layer = layers_[l];
      const T* a_below = l == 0 ? input : output(ws, l - 1);
      T* grad_weight = static_cast<T*>(accumulators[weight_index_[l]]);
      T* grad_bias = layer.bias != nullptr ? static_cast<T*>(accumulators[weight_index_[l] + 1]) : nullptr;
      const at::Tensor g = view(ws.g.data(), {rows, layer.out});
      if (is_gemm(layer)) {
        // In GEMM mode the batch is one block: the accumulators are grads_ themselves.
        const at::Tensor a_t = view(const_cast<T*>(a_below), {rows, layer.in});
        at::Tensor grad_w = view(grad_weight, {layer.out, layer.in});
        int8_t& weight_written = written_by_gemm_[weight_index_[l]];
        weight_written ? grad_w.addmm_(g.t(), a_t) : at::mm_out(grad_w, g.t(), a_t);
        weight_written = 1;
        if (grad_bias != nullptr) {
          at::Tensor grad_b = view(grad_bias, {layer.out});
          int8_t& bias_written = written_by_gemm_[weight_index_[l] + 1];
          bias_written ? grad_b.add_(g.sum(0)) : at::sum_out(grad_b, g, 0);
          bias_written = 1;
        }
      } else {
        k.weight_grad(layer, ws.g.data(), a_below, rows, grad_weight, grad_bias);
      }
      if (l == 0) break;
      const StackLayer<T>& below = layers_[l - 1];
      if (is_gemm(layer)) {
        at::Tensor g_below = view(ws.g_below.data(), {rows, layer.in});
        at::mm_out(g_below, g, view(const_cast<T*>(layer.weight), {layer.out, layer.in}));
        const T* z = ws.z[l - 1].data();
        const T* y = output(ws, l - 1);
        T* g_out = ws.g_below.data();
        on_all_threads(rows * layer.in, [&](int64_t begin, int64_t count) {
          k.scale_by_derivative(below, z + begin, y + begin, count, g_out + begin);
        });
      } else {
        k.input_grad(layer, ws.g.data(), rows, below, ws.z[l - 1].data(), output(ws, l - 1), ws.g_below.data());
      }
      std::swap(ws.g, ws.g_below);
    }
    return total;
  }

  StackSpec spec_;
  std::vector<StackLayer<T>> layers_;
  std::vector<size_t> weight_index_;  // layer -> index of its weight in params (layer_params)
  bool gemm_ = false;                 // some layer goes through the GEMM: one block per batch
  bool linear_mse_ = false;           // depth 1 under MSE: run_linear_mse
  int64_t macs_per_row_ = 0;
  std::vector<T> linear_workspace_;
  std::vector<std::vector<T>> weight_t_;
  std::vector<Buffer> grads_;
  std::vector<void*> grad_pointers_;
  std::vector<int8_t> written_by_gemm_;  // per param: -1 loops add into it, else whether written yet
  std::vector<T> partials_;
  std::vector<Workspace> workspaces_;
};

// What every stack op checks before it computes anything.
void check_call(const char* op, const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                const StackSpec& spec) {
  check_stack_tensors(op, spec, x, target, params);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": this is the CPU kernel, x is on ", x.device());
  check_classes(op, spec, target, params[spec.layer_params.back()].size(0));
}

// f(T{}) for x's dtype.
template <typename F>
auto with_dtype(const at::Tensor& x, F&& f) {
  return x.scalar_type() == at::kDouble ? f(double{}) : f(float{});
}

const void* target_data(const at::Tensor& target) { return target.data_ptr(); }

// One batch: loss, then the update; in x's dtype.
template <typename T, typename Updater>
at::Tensor run_train_step(StackStep<T>& step, const at::Tensor& x, const at::Tensor& target, Updater& updater) {
  const double loss = step.run(x.data_ptr<T>(), target_data(target), x.size(0), true);
  updater.step(step.grad_pointers());
  return at::scalar_tensor(loss, x.options());
}

template <typename Updater>
at::Tensor train_step(const at::Tensor& x_in, const at::Tensor& target_in, at::TensorList params,
                      const StackSpec& spec, Updater& updater) {
  const at::Tensor x = x_in.contiguous(), target = target_in.contiguous();
  return with_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    StackStep<T> step(spec, params, x.size(1));
    return run_train_step(step, x, target, updater);
  });
}

// Batches of rows, epoch after epoch, one update per batch (see FitData).
template <typename Updater>
std::tuple<at::Tensor, at::Tensor> fit(const char* op, const FitData& d, at::TensorList params,
                                       const StackSpec& spec, Updater& updater) {
  const int64_t n = d.x.size(0);
  if (d.orders.has_value()) {
    TORCH_CHECK_VALUE(d.orders->dim() == 2 && d.orders->size(0) == d.epochs && d.orders->size(1) <= n &&
                          d.orders->scalar_type() == at::kLong,
                      op, ": orders must be int64 of shape (epochs, M <= N) with epochs = ", d.epochs, ", N = ", n,
                      ", got ", d.orders->sizes(), " ", d.orders->scalar_type());
  }
  const int64_t rows_used = d.orders.has_value() ? d.orders->size(1) : n;  // per epoch
  const int64_t batch = d.batch_size > 0 ? std::min(d.batch_size, std::max<int64_t>(rows_used, 1))
                                         : std::max<int64_t>(rows_used, 1);
  const bool classes = spec.loss == math::Loss::kCrossEntropy;
  return with_dtype(d.x, [&](auto zero) {
    using T = decltype(zero);
    StackStep<T> step(spec, params, d.x.size(1));
    at::Tensor train_losses = at::empty({d.epochs}, d.x.options());
    at::Tensor val_losses = at::empty({d.val_x.has_value() ? d.epochs : 0}, d.x.options());
    // The gathered rows of a shuffled batch, reused from batch to batch (none in order: the batches
    // are x's own rows, and a full batch of a large x would double its memory).
    const int64_t in = d.x.size(1), target_width = classes ? 1 : d.target.size(1);
    const int64_t gathered = d.orders.has_value() || d.generator.has_value() ? batch : 0;
    std::vector<T> batch_x(static_cast<size_t>(gathered * in));
    std::vector<T> batch_values(classes ? 0 : static_cast<size_t>(gathered * target_width));
    std::vector<int64_t> batch_classes(classes ? static_cast<size_t>(gathered) : 0);
    const at::Tensor orders = d.orders.has_value() ? d.orders->contiguous() : at::Tensor();
    for (int64_t epoch = 0; epoch < d.epochs; ++epoch) {
      const at::Tensor order = orders.defined() ? orders[epoch]
                               : d.generator.has_value() ? at::randperm(n, *d.generator, at::kLong)
                                                         : at::Tensor();
      double loss_total = 0.0;
      int64_t batches = 0;
      // do-while: an empty set is one empty batch, as the stock loop's order.split(...) gives.
      int64_t first = 0;
      do {
        const int64_t rows = std::min(batch, rows_used - first);
        const T* xs;
        const void* ts;
        if (!order.defined()) {
          xs = d.x.data_ptr<T>() + first * d.x.size(1);
          ts = classes ? static_cast<const void*>(d.target.data_ptr<int64_t>() + first)
                       : static_cast<const void*>(d.target.data_ptr<T>() + first * d.target.size(1));
        } else {
          const int64_t* index = order.data_ptr<int64_t>() + first;
          for (int64_t r = 0; r < rows; ++r) {
            TORCH_CHECK_INDEX(index[r] >= 0 && index[r] < n, op, ": orders holds row ", index[r], ", outside [0, ", n, ")");
            std::copy_n(d.x.data_ptr<T>() + index[r] * in, in, batch_x.data() + r * in);
            if (classes) {
              batch_classes[r] = d.target.data_ptr<int64_t>()[index[r]];
            } else {
              std::copy_n(d.target.data_ptr<T>() + index[r] * target_width, target_width,
                          batch_values.data() + r * target_width);
            }
          }
          xs = batch_x.data();
          ts = classes ? static_cast<const void*>(batch_classes.data()) : static_cast<const void*>(batch_values.data());
        }
        loss_total += step.run(xs, ts, rows, true);
        updater.step(step.grad_pointers());
        first += batch;
        ++batches;
      } while (first < rows_used);
      train_losses.data_ptr<T>()[epoch] = static_cast<T>(loss_total / static_cast<double>(batches));
      if (d.val_x.has_value()) {
        val_losses.data_ptr<T>()[epoch] = static_cast<T>(
            step.run(d.val_x->data_ptr<T>(), target_data(*d.val_target), d.val_x->size(0), false));
      }
    }
    return std::make_tuple(train_losses, val_losses);
  });
}

void check_fit(const char* op, const FitData& d, at::TensorList params, const StackSpec& spec) {
  check_fit_data(op, d, [&](const at::Tensor& x, const at::Tensor& target) {
    check_call(op, x, target, params, spec);
  });
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> stack_fwd_bwd_cpu(
    const at::Tensor& x_in, const at::Tensor& target_in, at::TensorList params, const StackSpec& spec,
    bool need_grads) {
  constexpr const char* kOp = "stack_fwd_bwd";
  check_call(kOp, x_in, target_in, params, spec);
  const at::NoGradGuard no_grad;
  const at::Tensor x = x_in.contiguous(), target = target_in.contiguous();
  return with_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    StackStep<T> step(spec, params, x.size(1));
    const double loss = step.run(x.data_ptr<T>(), target_data(target), x.size(0), need_grads);
    std::vector<at::Tensor> grads;
    for (size_t p = 0; need_grads && p < params.size(); ++p) {
      grads.push_back(at::empty_like(params[p]));
      std::copy(step.grads()[p].begin(), step.grads()[p].end(), grads.back().template data_ptr<T>());
    }
    return std::make_tuple(at::scalar_tensor(loss, x.options()), grads);
  });
}

at::Tensor stack_adam_step_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                               const StackSpec& spec, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList steps, const AdamHyper& hyper) {
  constexpr const char* kOp = "stack_adam_step_";
  check_call(kOp, x, target, params, spec);
  AdamUpdater updater(kOp, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper);
  const at::NoGradGuard no_grad;
  return train_step(x, target, params, spec, updater);
}

at::Tensor stack_sgd_step_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                              const StackSpec& spec, at::TensorList momentum_buffers,
                              const SgdHyper& hyper) {
  constexpr const char* kOp = "stack_sgd_step_";
  check_call(kOp, x, target, params, spec);
  SgdUpdater updater(kOp, params, momentum_buffers, hyper);
  const at::NoGradGuard no_grad;
  return train_step(x, target, params, spec, updater);
}

std::tuple<at::Tensor, at::Tensor> stack_fit_adam_cpu(const FitData& data, at::TensorList params,
                                                      const StackSpec& spec, at::TensorList exp_avgs,
                                                      at::TensorList exp_avg_sqs,
                                                      at::TensorList max_exp_avg_sqs,
                                                      at::TensorList steps, const AdamHyper& hyper) {
  constexpr const char* kOp = "stack_fit";
  check_fit(kOp, data, params, spec);
  AdamUpdater updater(kOp, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper);
  const at::NoGradGuard no_grad;
  return fit(kOp, data, params, spec, updater);
}

std::tuple<at::Tensor, at::Tensor> stack_fit_sgd_cpu(const FitData& data, at::TensorList params,
                                                     const StackSpec& spec,
                                                     at::TensorList momentum_buffers,
                                                     const SgdHyper& hyper) {
  constexpr const char* kOp = "stack_fit";
  check_fit(kOp, data, params, spec);
  SgdUpdater updater(kOp, params, momentum_buffers, hyper);
  const at::NoGradGuard no_grad;
  return fit(kOp, data, params, spec, updater);
}

// The step a StackTrainer keeps, and the param memory it was built on.
struct StackTrainer::Kept {
  std::vector<const void*> params;
  std::optional<StackStep<float>> f32;
  std::optional<StackStep<double>> f64;

  template <typename T>
  std::optional<StackStep<T>>& of() {
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else {
      return f64;
    }
  }
};

StackTrainer::StackTrainer(StackSpec spec) : spec_(std::move(spec)) {}
StackTrainer::~StackTrainer() = default;

template <typename Updater>
at::Tensor StackTrainer::step(const at::Tensor& x_in, const at::Tensor& target_in, at::TensorList params,
                              Updater& updater) {
  const at::Tensor x = x_in.contiguous(), target = target_in.contiguous();
  return with_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    std::vector<const void*> memory;
    for (const at::Tensor& p : params) memory.push_back(p.data_ptr());
    if (!kept_ || kept_->params != memory || !kept_->template of<T>().has_value()) {
      kept_.reset();  // the old buffers go before the new ones come
      kept_ = std::make_unique<Kept>();
      kept_->params = std::move(memory);
      kept_->template of<T>().emplace(spec_, params, x.size(1));
    }
    return run_train_step(*kept_->template of<T>(), x, target, updater);
  });
}

at::Tensor StackTrainer::adam_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                   at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& hyper) {
  constexpr const char* kOp = "stack_adam_step_";
  const std::lock_guard<std::mutex> lock(mutex_);
  check_call(kOp, x, target, params, spec_);
  AdamUpdater updater(kOp, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper);
  const at::NoGradGuard no_grad;
  return step(x, target, params, updater);
}

at::Tensor StackTrainer::sgd_step(const at::Tensor& x, const at::Tensor& target, at::TensorList params,
                                  at::TensorList momentum_buffers, const SgdHyper& hyper) {
  constexpr const char* kOp = "stack_sgd_step_";
  const std::lock_guard<std::mutex> lock(mutex_);
  check_call(kOp, x, target, params, spec_);
  SgdUpdater updater(kOp, params, momentum_buffers, hyper);
  const at::NoGradGuard no_grad;
  return step(x, target, params, updater);
}

namespace {

// The ops' CPU kernels: the schema's arguments into StackSpec and the optimizer's hyperparameters.
std::vector<bool> bools(const c10::List<bool>& list) { return std::vector<bool>(list.begin(), list.end()); }

std::tuple<at::Tensor, std::vector<at::Tensor>> stack_fwd_bwd_op(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, const c10::List<bool>& has_bias,
    at::IntArrayRef layer_params, at::IntArrayRef activations, c10::ArrayRef<double> activation_params, int64_t loss, int64_t reduction,
    double loss_param, int64_t ignore_index, double label_smoothing, bool need_grads) {
  return stack_fwd_bwd_cpu(x, target, params,
                           make_stack_spec("stack_fwd_bwd", bools(has_bias), layer_params, activations, activation_params, loss,
                                           reduction, loss_param, ignore_index, label_smoothing),
                           need_grads);
}

double lr_value(double lr, const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() ? read_scalar(*lr_tensor) : lr;
}

at::Tensor stack_adam_step_op(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, const c10::List<bool>& has_bias,
    at::IntArrayRef layer_params, at::IntArrayRef activations, c10::ArrayRef<double> activation_params, int64_t loss, int64_t reduction,
    double loss_param, int64_t ignore_index, double label_smoothing, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps, double lr, double beta1,
    double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
    const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "stack_adam_step_";
  if (lr_tensor.has_value()) check_scalar_tensor(kOp, "lr_tensor", *lr_tensor, at::kCPU);
  return stack_adam_step_cpu(
      x, target, params,
      make_stack_spec(kOp, bools(has_bias), layer_params, activations, activation_params, loss, reduction, loss_param, ignore_index,
                      label_smoothing),
      exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
      AdamHyper{lr_value(lr, lr_tensor), beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize});
}

at::Tensor stack_sgd_step_op(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, const c10::List<bool>& has_bias,
    at::IntArrayRef layer_params, at::IntArrayRef activations, c10::ArrayRef<double> activation_params, int64_t loss, int64_t reduction,
    double loss_param, int64_t ignore_index, double label_smoothing, at::TensorList momentum_buffers, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
    const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* kOp = "stack_sgd_step_";
  if (lr_tensor.has_value()) check_scalar_tensor(kOp, "lr_tensor", *lr_tensor, at::kCPU);
  return stack_sgd_step_cpu(
      x, target, params,
      make_stack_spec(kOp, bools(has_bias), layer_params, activations, activation_params, loss, reduction, loss_param, ignore_index,
                      label_smoothing),
      momentum_buffers,
      SgdHyper{lr_value(lr, lr_tensor), momentum, dampening, weight_decay, nesterov, maximize, first_step});
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("stack_fwd_bwd", &stack_fwd_bwd_op);
  m.impl("stack_adam_step_", &stack_adam_step_op);
  m.impl("stack_sgd_step_", &stack_sgd_step_op);
}

}  // namespace cpu
}  // namespace fusedtrain
