// Runs the narrow-stack train step's kernel body (csrc/cuda/stack_narrow_kernel.cuh) on CPU
// threads (emulation/cuda_runtime.h: one OS thread per CUDA thread, barriers for __syncthreads,
// warp shuffles and the grid barrier), so that tests/test_narrow_kernel_emulated.py checks the
// kernel's tiling, shared-memory indexing, reductions and updates against fusedtrain.reference
// without a GPU. Built with -Icsrc/tests/emulation ahead of the real headers.
//
// Reads one problem from stdin as whitespace-separated numbers and writes the loss, then the
// params, then the optimizer state list by list, one value per line (%.17g):
//   element_bytes(4|8) optimizer(0 Adam, 1 SGD) blocks tile_rows resident
//   n layers  widths[layers + 1]
//   per layer: has_bias param activation activation_param
//   loss reduction loss_param ignore_index label_smoothing
//   params; per param: numel, values
//   x (n * widths[0]); target (n classes, or n * widths[layers] values)
//   Adam: lr beta1 beta2 eps weight_decay decoupled amsgrad maximize, then per param exp_avg,
//         exp_avg_sq, max_exp_avg_sq (amsgrad only) and its step count
//   SGD: lr momentum dampening weight_decay nesterov maximize first_step, then per param its
//        momentum buffer (momentum only)
#include <cstdio>
#include <iostream>
#include <vector>

#include "../cuda/stack_narrow_kernel.cuh"

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
  std::vector<T> v(static_cast<size_t>(count));
  for (T& e : v) e = read<T>();
  return v;
}

template <typename T>
void print(const std::vector<T>& values) {
  for (T v : values) std::printf("%.17g\n", static_cast<double>(v));
}

template <typename T, typename Update>
T run(NarrowArgs<T>& a, const Update& update, int blocks) {
  const int64_t width = a.params.offset[a.params.count];
  std::vector<T> partials(static_cast<size_t>(blocks * width));
  std::vector<double> block_losses(static_cast<size_t>(blocks));
  std::vector<int64_t> block_kept(static_cast<size_t>(blocks));
  T loss = T(0);
  a.partials = partials.data();
  a.block_losses = block_losses.data();
  a.block_kept = block_kept.data();
  a.loss_out = &loss;
  a.gradient_lanes = 1;
  while (a.gradient_lanes < 32 && 2 * a.gradient_lanes <= blocks &&
         width * 2 * a.gradient_lanes <= static_cast<int64_t>(blocks) * kNarrowThreads) {
    a.gradient_lanes *= 2;  // fused_reduce_lanes (fused_grid.h)
  }
  std::vector<std::vector<T>> shared(static_cast<size_t>(blocks), std::vector<T>(static_cast<size_t>(a.layout.elements)));
  std::vector<BlockScalars<Update>> scalars(static_cast<size_t>(blocks));
  cuda_emulation::launch(blocks, kNarrowThreads, [&] {
    run_narrow_step(a, update, shared[blockIdx.x].data(), scalars[blockIdx.x]);
  });
  return loss;
}

template <typename T>
int main_for(int optimizer, int blocks, int tile_rows, bool resident) {
  NarrowArgs<T> a{};
  a.n = read<int64_t>();
  const int layers = read<int>();
  std::vector<int64_t> widths = read_values<int64_t>(layers + 1);
  std::vector<bool> keeps_output;
  for (int l = 0; l < layers; ++l) {
    a.layer[l].has_bias = read<int>() != 0;
    a.layer[l].param = read<int>();
    a.layer[l].activation = static_cast<math::Activation>(read<int>());
    a.layer[l].activation_param = read<T>();
    keeps_output.push_back(a.layer[l].activation != math::Activation::kIdentity);
  }
  a.layout = make_narrow_layout(widths, keeps_output, tile_rows, resident);
  a.tiles = (a.n + tile_rows - 1) / tile_rows;
  a.loss = static_cast<math::Loss>(read<int>());
  const bool mean = read<int>() == 1;  // at::Reduction::Mean
  a.loss_param = read<T>();
  a.ignore_index = read<int64_t>();
  a.label_smoothing = read<T>();
  a.params.count = read<int>();
  std::vector<std::vector<T>> params;
  a.params.offset[0] = 0;
  for (int i = 0; i < a.params.count; ++i) {
    params.push_back(read_values<T>(read<int64_t>()));
    a.params.offset[i + 1] = a.params.offset[i] + static_cast<int64_t>(params.back().size());
  }
  for (int i = 0; i < a.params.count; ++i) a.params.data[i] = params[static_cast<size_t>(i)].data();
  const std::vector<T> x = read_values<T>(a.n * widths[0]);
  a.x = x.data();
  const bool classes = a.loss == math::Loss::kCrossEntropy;
  const std::vector<int64_t> class_target = read_values<int64_t>(classes ? a.n : 0);
  const std::vector<T> value_target = read_values<T>(classes ? 0 : a.n * widths.back());
  a.target = classes ? static_cast<const void*>(class_target.data()) : static_cast<const void*>(value_target.data());
  a.mean_over_kept = mean && classes;
  a.loss_divisor = mean ? static_cast<double>(a.n * widths.back()) : 1.0;
  a.grad_scale = static_cast<T>(1.0 / a.loss_divisor);

  T loss;
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
      for (size_t k = 0; k < lists; ++k) state[k * params.size() + i] = read_values<T>(static_cast<int64_t>(params[i].size()));
      steps[i] = read<float>();
    }
    for (size_t i = 0; i < params.size(); ++i) {
      update.exp_avg[i] = state[i].data();
      update.exp_avg_sq[i] = state[params.size() + i].data();
      if (update.h.amsgrad) update.max_exp_avg_sq[i] = state[2 * params.size() + i].data();
      update.step[i] = &steps[i];
    }
    loss = run(a, update, blocks);
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
    loss = run(a, update, blocks);
  }
  std::printf("%.17g\n", static_cast<double>(loss));
  for (const std::vector<T>& p : params) print(p);
  for (const std::vector<T>& s : state) print(s);
  print(steps);
  return 0;
}

}  // namespace

int main() {
  const int element_bytes = read<int>();
  const int optimizer = read<int>();
  const int blocks = read<int>();
  const int tile_rows = read<int>();
  const bool resident = read<int>() != 0;
  return element_bytes == 8 ? main_for<double>(optimizer, blocks, tile_rows, resident)
                            : main_for<float>(optimizer, blocks, tile_rows, resident);
}
