// How the one-launch fit kernel (stack_fit_cuda.cu) lays out its block's shared memory. Plain
// C++, so the host side and the CPU emulation of the kernel (csrc/tests/test_fit_kernel.cpp)
// build it without CUDA.
//
// The kernel is one block that keeps the whole model on chip for the whole fit. Its shared memory
// holds, in elements of the math type, from the (16-byte aligned) start:
//   * the tile's targets, gathered through the epoch's row order: rows x out values, or rows
//     int64 classes for cross entropy (first, so that the int64s are aligned);
//   * the narrow step's layout (stack_narrow_layout.h) with resident weights: every layer's W and
//     bias at the padded pitch its loops read, the tile's input rows, z, outputs and gradients;
//   * every param, contiguous in param order (the optimizer updates these; the padded weights are
//     copied from them after each update);
//   * the batch's gradient of every param, in the same order;
//   * the optimizer's state lists (Adam: exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad; SGD:
//     the momentum buffer with momentum), each as long as all params together.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "stack_narrow_layout.h"

namespace fusedtrain {
namespace cuda {

struct FitLayout {
  NarrowLayout narrow;      // offsets from `narrow_base`
  int64_t target = 0;       // the tile's gathered targets
  int64_t narrow_base = 0;
  int64_t params = 0;
  int64_t grads = 0;
  int64_t state = 0;        // state list k of param i at state + k * param_elements + offset of i
  int64_t elements = 0;     // the whole layout
};

// The rows of a tile for batches of `batch` rows: the whole batch, rounded up to the register tile
// (kNarrowRowsPerThread), so that each step's rows are one tile.
inline int fit_tile_rows(int64_t batch) {
  const int64_t rows = (std::max<int64_t>(batch, 1) + kNarrowRowsPerThread - 1) / kNarrowRowsPerThread *
                       kNarrowRowsPerThread;
  return static_cast<int>(rows);
}

// widths and keeps_output as make_narrow_layout's; param_elements: all params' elements;
// state_lists: the optimizer's state tensors per param; classes: cross entropy's int64 targets.
inline FitLayout make_fit_layout(const std::vector<int64_t>& widths, const std::vector<bool>& keeps_output,
                                 int rows, int64_t param_elements, int state_lists, bool classes,
                                 int64_t element_bytes) {
  FitLayout f;
  f.narrow = make_narrow_layout(widths, keeps_output, rows, /*resident=*/true);
  const int64_t target_bytes =
      classes ? rows * static_cast<int64_t>(sizeof(int64_t)) : rows * widths.back() * element_bytes;
  // In whole 8-byte units, so that what follows starts 8-byte aligned for fp64 too.
  f.narrow_base = (target_bytes + 7) / 8 * 8 / element_bytes;
  f.params = f.narrow_base + f.narrow.elements;
  f.grads = f.params + param_elements;
  f.state = f.grads + param_elements;
  f.elements = f.state + state_lists * param_elements;
  return f;
}

}  // namespace cuda
}  // namespace fusedtrain
