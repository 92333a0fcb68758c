// What test_narrow_kernel.cpp and test_fit_kernel.cpp share: both run kernel bodies built on
// stack_narrow_kernel.cuh on CPU threads and read their problems from stdin in one format of
// whitespace-separated numbers, each harness adding its own fields between the parts read here:
//   n layers  widths[layers + 1]
//   per layer: has_bias param activation activation_param
//   loss reduction loss_param ignore_index label_smoothing
//   params; per param: numel, values
//   x (n * widths[0]); target (n classes, or n * widths[layers] values)
//   Adam: lr beta1 beta2 eps weight_decay decoupled amsgrad maximize, then per param exp_avg,
//         exp_avg_sq, max_exp_avg_sq (amsgrad only) and its step count
//   SGD: lr momentum dampening weight_decay nesterov maximize first_step, then per param its
//        momentum buffer (momentum only)
// and both write values back one a line (%.17g).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <type_traits>
#include <vector>

#include "../cuda/stack_narrow_kernel.cuh"

namespace fusedtrain {
namespace cuda {
namespace narrow {
namespace harness {

// Device memory the kernel must write before it reads (shared memory, scratch, block scalars)
// holds anything at launch; the harness fills it with all-one bytes (NaN as a float or double,
// -1 as an integer), so that a read before the kernel's own write shows in the results instead
// of passing as a zero.
template <typename V>
void fill_unwritten(std::vector<V>& memory) {
  std::memset(static_cast<void*>(memory.data()), 0xFF, memory.size() * sizeof(V));
}
template <typename V>
void fill_unwritten(V& object) {
  static_assert(std::is_trivially_copyable_v<V>, "fill_unwritten: only plain data");
  std::memset(static_cast<void*>(&object), 0xFF, sizeof(V));
}

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

// A problem's stack and optimizer state, which the kernel's arguments point into.
template <typename T>
struct Problem {
  int64_t n = 0;
  std::vector<int64_t> widths;
  std::vector<bool> keeps_output;  // per layer: an output kept apart from z
  bool mean = false;               // at::Reduction::Mean
  bool classes = false;            // targets are classes (cross entropy)
  std::vector<std::vector<T>> params;
  // Read per param, written per list: Adam's exp_avgs, exp_avg_sqs and max_exp_avg_sqs, SGD's
  // momentum buffers.
  std::vector<std::vector<T>> state;
  std::vector<float> steps;  // Adam's

  // The stack, from n up to the params (the rows follow), into the stack's arguments.
  void read_stack(NarrowArgs<T>& a) {
    n = read<int64_t>();
    const int layers = read<int>();
    widths = read_values<int64_t>(layers + 1);
    for (int l = 0; l < layers; ++l) {
      a.layer[l].has_bias = read<int>() != 0;
      a.layer[l].param = read<int>();
      a.layer[l].activation = static_cast<math::Activation>(read<int>());
      a.layer[l].activation_param = read<T>();
      keeps_output.push_back(a.layer[l].activation != math::Activation::kIdentity);
    }
    a.loss = static_cast<math::Loss>(read<int>());
    mean = read<int>() == 1;
    a.loss_param = read<T>();
    a.ignore_index = read<int64_t>();
    a.label_smoothing = read<T>();
    a.params.count = read<int>();
    a.params.offset[0] = 0;
    for (int i = 0; i < a.params.count; ++i) {
      params.push_back(read_values<T>(read<int64_t>()));
      a.params.offset[i + 1] = a.params.offset[i] + static_cast<int64_t>(params.back().size());
    }
    for (int i = 0; i < a.params.count; ++i) a.params.data[i] = params[static_cast<size_t>(i)].data();
    classes = a.loss == math::Loss::kCrossEntropy;
  }

  // The optimizer (0 Adam, 1 SGD): run(update) with its update, whose state points into this.
  template <typename Run>
  void read_update(int optimizer, Run&& run) {
    if (optimizer == 0) {
      NarrowAdam<T> update{};
      update.h = AdamHyper{read<double>(), read<double>(), read<double>(), read<double>(), read<double>(),
                           read<int>() != 0, read<int>() != 0, read<int>() != 0};
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
      run(update);
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
      state.reserve(params.size());  // no reallocation: the update points into state's lists
      for (size_t i = 0; update.momentum && i < params.size(); ++i) {
        state.push_back(read_values<T>(static_cast<int64_t>(params[i].size())));
        update.momentum_buffer[i] = state.back().data();
      }
      run(update);
    }
  }

  // The params, then the state list by list, then the step counts.
  void print_params_and_state() const {
    for (const std::vector<T>& p : params) print(p);
    for (const std::vector<T>& s : state) print(s);
    print(steps);
  }
};

}  // namespace harness
}  // namespace narrow
}  // namespace cuda
}  // namespace fusedtrain
