// How the fused kernel of the narrow linear + MSE path (linear_mse_cuda.cu, out <= 16) splits a
// problem over its cooperative grid. Plain C++, so the host side can be tested without a GPU
// (csrc/tests/test_chunk_tables.cpp).
//
// The grid is row_groups x column_groups blocks, all resident at once (a cooperative launch).
// Block (r, c) owns the row chunks r, r + row_groups, ... (kFusedRows rows each) and the
// columns [c * group_columns, (c + 1) * group_columns) of x and weight. Its scratch memory:
//   * with column_groups > 1, its partial dot products over its columns, column_groups x n x out
//     values in all, summed over the column groups once every block has written them;
//   * its row group's partial gradient, row_groups x (out * in + out) values in all, summed over
//     the row groups once every block has added its rows.
// Either sum is spread over the whole grid, in a fixed order (fused_reduce_lanes). The split that keeps the most blocks busy wins, and
// among those the one with the least scratch memory: tall, narrow problems split rows only, and
// wide ones with few rows split columns only (scratch then the size of weight, plus n x out per
// column group), so memory stays bounded by the problem's size instead of growing with the
// number of blocks times the weight.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fusedtrain {
namespace cuda {

constexpr int kFusedThreads = 256;
constexpr int kFusedRows = 32;  // rows per block iteration, a warp per row
// A column group is at least this wide, so that each thread has a column of it.
constexpr int64_t kMinGroupColumns = kFusedThreads;
// The most blocks the kernel launches (the co-resident count of a device is below it).
constexpr int kMaxFusedBlocks = 4096;

struct FusedGrid {
  int64_t row_groups;
  int64_t column_groups;
  int64_t group_columns;  // columns per column group; the last group may have fewer, or none

  int blocks() const { return static_cast<int>(row_groups * column_groups); }
};

// The scratch elements a grid needs for x (n, in) and `out` outputs; with need_params the
// partial gradients too (the loss and grad_x alone need none).
inline int64_t fused_scratch_elements(const FusedGrid& g, int64_t n, int64_t in, int64_t out,
                                      bool need_params) {
  const int64_t predictions = g.column_groups > 1 ? g.column_groups * n * out : 0;
  const int64_t gradients = need_params ? g.row_groups * (out * in + out) : 0;
  return predictions + gradients;
}

// The split of x (n, in) with `out` outputs over at most max_blocks (>= 1) blocks.
inline FusedGrid choose_fused_grid(int64_t n, int64_t in, int64_t out, bool need_params,
                                   int max_blocks) {
  const int64_t row_chunks = std::max<int64_t>(1, (n + kFusedRows - 1) / kFusedRows);
  const int64_t column_tiles = std::max<int64_t>(1, (in + kMinGroupColumns - 1) / kMinGroupColumns);
  const int64_t most = std::clamp<int64_t>(max_blocks, 1, kMaxFusedBlocks);
  FusedGrid best{1, 1, in};
  int64_t best_blocks = 0;
  int64_t best_scratch = 0;
  for (int64_t columns = 1; columns <= std::min(most, column_tiles); ++columns) {
    const FusedGrid g{std::min(row_chunks, most / columns), columns, (in + columns - 1) / columns};
    const int64_t blocks = g.row_groups * g.column_groups;
    const int64_t scratch = fused_scratch_elements(g, n, in, out, need_params);
    if (blocks > best_blocks || (blocks == best_blocks && scratch < best_scratch)) {
      best = g;
      best_blocks = blocks;
      best_scratch = scratch;
    }
  }
  return best;
}

// Lanes that sum one gradient element's row_groups partials (then a fixed shuffle tree): 1, a
// coalesced thread per element, when the elements alone fill the grid's threads; up to a warp
// per element when they are few, so that a long sum does not run on one thread.
inline int fused_reduce_lanes(int64_t width, int64_t row_groups, int64_t grid_threads) {
  int lanes = 1;
  while (lanes < 32 && 2 * lanes <= row_groups && width * 2 * lanes <= grid_threads) lanes *= 2;
  return lanes;
}

}  // namespace cuda
}  // namespace fusedtrain
