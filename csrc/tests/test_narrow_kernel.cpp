// Runs the narrow-stack train step's kernel body (csrc/cuda/stack_narrow_kernel.cuh) on CPU
// threads (emulation/cuda_runtime.h: one OS thread per CUDA thread, barriers for __syncthreads,
// warp shuffles and the grid barrier), so that tests/test_narrow_kernel_emulated.py checks the
// kernel's tiling, shared-memory indexing, reductions and updates against fusedtrain.reference
// without a GPU. Built with -Icsrc/tests/emulation ahead of the real headers.
//
// Reads one problem from stdin in narrow_harness.h's format, after a first line
//   element_bytes(4|8) optimizer(0 Adam, 1 SGD) blocks tile_rows resident
// and writes the loss, then the params, then the optimizer state list by list, one value per
// line (%.17g).
#include <cstdio>
#include <vector>

#include "narrow_harness.h"

namespace {

using namespace fusedtrain::cuda;
using namespace fusedtrain::cuda::narrow;
using namespace fusedtrain::cuda::narrow::harness;

template <typename T, typename Update>
T run(NarrowArgs<T>& a, const Update& update, int blocks) {
  const int64_t width = a.params.offset[a.params.count];
  std::vector<T> partials(static_cast<size_t>(blocks * width));
  std::vector<double> block_losses(static_cast<size_t>(blocks));
  std::vector<int64_t> block_kept(static_cast<size_t>(blocks));
  fill_unwritten(partials);
  fill_unwritten(block_losses);
  fill_unwritten(block_kept);
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
  for (auto& block_shared : shared) fill_unwritten(block_shared);
  fill_unwritten(scalars);
  cuda_emulation::launch(blocks, kNarrowThreads, [&] {
    run_narrow_step(a, update, shared[blockIdx.x].data(), scalars[blockIdx.x]);
  });
  return loss;
}

template <typename T>
void main_for(int optimizer, int blocks, int tile_rows, bool resident) {
  NarrowArgs<T> a{};
  Problem<T> problem;
  problem.read_stack(a);
  a.n = problem.n;
  a.layout = make_narrow_layout(problem.widths, problem.keeps_output, tile_rows, resident);
  a.tiles = (a.n + tile_rows - 1) / tile_rows;
  Rows<T> rows;
  rows.read_rows(a.n, problem.widths.front(), problem.widths.back(), problem.classes);
  a.x = rows.x.data();
  a.target = rows.target(problem.classes);
  a.mean_over_kept = problem.mean && problem.classes;
  a.loss_divisor = problem.mean ? static_cast<double>(a.n * problem.widths.back()) : 1.0;
  a.grad_scale = static_cast<T>(1.0 / a.loss_divisor);

  T loss;
  problem.read_update(optimizer, [&](const auto& update) { loss = run(a, update, blocks); });
  std::printf("%.17g\n", static_cast<double>(loss));
  problem.print_params_and_state();
}

}  // namespace

int main() {
  const int element_bytes = read<int>();
  const int optimizer = read<int>();
  const int blocks = read<int>();
  const int tile_rows = read<int>();
  const bool resident = read<int>() != 0;
  if (element_bytes == 8) {
    main_for<double>(optimizer, blocks, tile_rows, resident);
  } else {
    main_for<float>(optimizer, blocks, tile_rows, resident);
  }
  return 0;
}
