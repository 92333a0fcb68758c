// Runs the one-launch fit kernel's body (csrc/cuda/stack_fit_kernel.cuh) on CPU threads
// (emulation/cuda_runtime.h: one OS thread per CUDA thread, barriers for __syncthreads and warp
// shuffles), so that tests/test_fit_kernel_emulated.py checks its gathering of batches through
// the orders, its shared-memory layout, per-batch updates, per-epoch losses and validation against
// the CPU loop without a GPU. Built with -Icsrc/tests/emulation ahead of the real headers.
//
// Reads one problem from stdin as whitespace-separated numbers and writes the per-epoch train
// losses, the validation losses (with a validation set), the params, then the optimizer state
// list by list, one value per line (%.17g):
//   element_bytes(4|8) optimizer(0 Adam, 1 SGD)
//   n layers  widths[layers + 1]
//   per layer: has_bias param activation activation_param
//   loss reduction loss_param ignore_index label_smoothing
//   params; per param: numel, values
//   x (n * widths[0]); target (n classes, or n * widths[layers] values)
//   epochs batch rows_used has_orders; orders (epochs * rows_used) with has_orders
//   val_n (-1: no validation set); val_x; val_target
//   Adam: lr beta1 beta2 eps weight_decay decoupled amsgrad maximize, then per param exp_avg,
//         exp_avg_sq, max_exp_avg_sq (amsgrad only) and its step count
//   SGD: lr momentum dampening weight_decay nesterov maximize first_step, then per param its
//        momentum buffer (momentum only)
#include <cstdio>
#include <iostream>
#include <memory>
#include <vector>

#include "../cuda/stack_fit_kernel.cuh"

namespace {

using namespace fusedtrain;
using namespace fusedtrain::cuda;
using namespace fusedtrain::cuda::narrow;

template <typename V>
V read() {
  double v;
  if (!(std::cin >> v)) {
    std::fprintf(stderr, "input ends early\n");
    std::exit(2);
  }
  return static_cast<V>(v);
}

template <typename T>
std::vector<T> read_values(int64_t count) {
  std::vector<T> v(static_cast<size_t>(std::max<int64_t>(count, 0)));
  for (T& e : v) e = read<T>();
  return v;
}

template <typename T>
void print(const std::vector<T>& values) {
  for (T v : values) std::printf("%.17g\n", static_cast<double>(v));
}

// The rows of a problem's x and target (classes or values).
template <typename T>
struct Rows {
  std::vector<T> x, values;
  std::vector<int64_t> classes;

  void read_rows(int64_t n, int64_t in, int64_t out, bool by_class) {
    x = read_values<T>(n * in);
    classes = read_values<int64_t>(by_class ? n : 0);
    values = read_values<T>(by_class ? 0 : n * out);
  }
  const void* target(bool by_class) const {
    return by_class ? static_cast<const void*>(classes.data()) : static_cast<const void*>(values.data());
  }
};

template <typename T, typename Update>
void run(FitArgs<T>& a, const Update& update, const std::vector<int64_t>& widths,
         const std::vector<bool>& keeps_output, int state_lists) {
  const int64_t width = a.stack.params.offset[a.stack.params.count];
  a.layout = make_fit_layout(widths, keeps_output, fit_tile_rows(a.batch), width, state_lists,
                             a.stack.loss == math::Loss::kCrossEntropy, static_cast<int64_t>(sizeof(T)));
  a.stack.layout = a.layout.narrow;
  // In doubles: 8-byte aligned, as the device's dynamic shared memory is (16).
  std::vector<double> shared(static_cast<size_t>((a.layout.elements * static_cast<int64_t>(sizeof(T)) + 7) / 8));
  auto block = std::make_unique<FitBlock<T, Update>>();
  cuda_emulation::launch(1, kNarrowThreads, [&] {
    run_fit(a, update, reinterpret_cast<unsigned char*>(shared.data()), *block);
  });
}

template <typename T>
int main_for(int optimizer) {
  FitArgs<T> a{};
  NarrowArgs<T>& stack = a.stack;
  a.n = read<int64_t>();
  const int layers = read<int>();
  const std::vector<int64_t> widths = read_values<int64_t>(layers + 1);
  std::vector<bool> keeps_output;
  for (int l = 0; l < layers; ++l) {
    stack.layer[l].has_bias = read<int>() != 0;
    stack.layer[l].param = read<int>();
    stack.layer[l].activation = static_cast<math::Activation>(read<int>());
    stack.layer[l].activation_param = read<T>();
    keeps_output.push_back(stack.layer[l].activation != math::Activation::kIdentity);
  }
  stack.loss = static_cast<math::Loss>(read<int>());
  a.mean = read<int>() == 1;  // at::Reduction::Mean
  stack.loss_param = read<T>();
  stack.ignore_index = read<int64_t>();
  stack.label_smoothing = read<T>();
  stack.params.count = read<int>();
  std::vector<std::vector<T>> params;
  stack.params.offset[0] = 0;
  for (int i = 0; i < stack.params.count; ++i) {
    params.push_back(read_values<T>(read<int64_t>()));
    stack.params.offset[i + 1] = stack.params.offset[i] + static_cast<int64_t>(params.back().size());
  }
  for (int i = 0; i < stack.params.count; ++i) stack.params.data[i] = params[static_cast<size_t>(i)].data();
  const bool classes = stack.loss == math::Loss::kCrossEntropy;
  Rows<T> train, val;
  train.read_rows(a.n, widths.front(), widths.back(), classes);
  a.x = train.x.data();
  a.target = train.target(classes);
  a.epochs = read<int64_t>();
  a.batch = read<int64_t>();
  a.rows_used = read<int64_t>();
  a.batches = std::max<int64_t>(1, (a.rows_used + a.batch - 1) / a.batch);
  const bool has_orders = read<int>() != 0;
  const std::vector<int64_t> orders = read_values<int64_t>(has_orders ? a.epochs * a.rows_used : 0);
  a.orders = has_orders ? orders.data() : nullptr;
  a.val_n = read<int64_t>();
  std::vector<T> train_losses(static_cast<size_t>(a.epochs)), val_losses;
  a.train_losses = train_losses.data();
  if (a.val_n >= 0) {
    val.read_rows(a.val_n, widths.front(), widths.back(), classes);
    a.val_x = val.x.data();
    a.val_target = val.target(classes);
    val_losses.resize(static_cast<size_t>(a.epochs));
    a.val_losses = val_losses.data();
  }

  std::vector<std::vector<T>> state;
  std::vector<float> steps;
  if (optimizer == 0) {
    NarrowAdam<T> update{};
    update.h = AdamHyper{read<double>(), read<double>(), read<double>(), read<double>(), read<double>(),
                         read<int>() != 0, read<int>() != 0, read<int>() != 0};
    // Read per param, written per list (exp_avgs, exp_avg_sqs, max_exp_avg_sqs).
    const size_t lists = update.h.amsgrad ? 3 : 2;
    state.resize(lists * params.size());
    steps.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      for (size_t k = 0; k < lists; ++k) {
        state[k * params.size() + i] = read_values<T>(static_cast<int64_t>(params[i].size()));
      }
      steps[i] = read<float>();
    }
    for (size_t i = 0; i < params.size(); ++i) {
      update.exp_avg[i] = state[i].data();
      update.exp_avg_sq[i] = state[params.size() + i].data();
      if (update.h.amsgrad) update.max_exp_avg_sq[i] = state[2 * params.size() + i].data();
      update.step[i] = &steps[i];
    }
    run(a, update, widths, keeps_output, static_cast<int>(lists));
  } else {
    NarrowSgd<T> update{};
    const double lr = read<double>(), momentum = read<double>(), dampening = read<double>(),
                 weight_decay = read<double>();
    update.nesterov = read<int>() != 0;
    const bool maximize = read<int>() != 0;
    update.first_step = read<int>() != 0;
    update.c = math::make_sgd_coeffs<T>(lr, momentum, dampening, weight_decay, maximize);
    update.decay = weight_decay != 0.0;
    update.momentum = momentum != 0.0;
    state.reserve(params.size());
    for (size_t i = 0; update.momentum && i < params.size(); ++i) {
      state.push_back(read_values<T>(static_cast<int64_t>(params[i].size())));
      update.momentum_buffer[i] = state.back().data();
    }
    run(a, update, widths, keeps_output, update.momentum ? 1 : 0);
  }
  print(train_losses);
  print(val_losses);
  for (const std::vector<T>& p : params) print(p);
  for (const std::vector<T>& s : state) print(s);
  print(steps);
  return 0;
}

}  // namespace

int main() {
  const int element_bytes = read<int>();
  const int optimizer = read<int>();
  return element_bytes == 8 ? main_for<double>(optimizer) : main_for<float>(optimizer);
}
