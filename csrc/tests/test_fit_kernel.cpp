// Runs the one-launch fit kernel's body (csrc/cuda/stack_fit_kernel.cuh) on CPU threads
// (emulation/cuda_runtime.h: one OS thread per CUDA thread, barriers for __syncthreads and warp
// shuffles), so that tests/test_fit_kernel_emulated.py checks its gathering of batches through
// the orders, its shared-memory layout, per-batch updates, per-epoch losses and validation against
// the CPU loop without a GPU. Built with -Icsrc/tests/emulation ahead of the real headers.
//
// Reads one problem from stdin in narrow_harness.h's format, after a first line
//   element_bytes(4|8) optimizer(0 Adam, 1 SGD)
// and with, between the rows and the optimizer,
//   epochs batch rows_used has_orders; orders (epochs * rows_used) with has_orders
//   val_n (-1: no validation set); val_x; val_target
// and writes the per-epoch train losses, the validation losses (with a validation set), the
// params, then the optimizer state list by list, one value per line (%.17g).
#include <algorithm>
#include <memory>
#include <vector>

#include "../cuda/stack_fit_kernel.cuh"
#include "narrow_harness.h"

namespace {

using namespace fusedtrain;
using namespace fusedtrain::cuda;
using namespace fusedtrain::cuda::narrow;
using namespace fusedtrain::cuda::narrow::harness;

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
  fill_unwritten(shared);
  fill_unwritten(*block);
  cuda_emulation::launch(1, kNarrowThreads, [&] {
    run_fit(a, update, reinterpret_cast<unsigned char*>(shared.data()), *block);
  });
}

template <typename T>
void main_for(int optimizer) {
  FitArgs<T> a{};
  Problem<T> problem;
  problem.read_stack(a.stack);
  a.n = problem.n;
  a.mean = problem.mean;
  const std::vector<int64_t>& widths = problem.widths;
  const bool classes = problem.classes;
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

  problem.read_update(optimizer, [&](const auto& update) {
    run(a, update, widths, problem.keeps_output, update.state_lists());
  });
  print(train_losses);
  print(val_losses);
  problem.print_params_and_state();
}

}  // namespace

int main() {
  const int element_bytes = read<int>();
  const int optimizer = read<int>();
  if (element_bytes == 8) {
    main_for<double>(optimizer);
  } else {
    main_for<float>(optimizer);
  }
  return 0;
}
