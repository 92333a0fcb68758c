// How the one-launch narrow-stack kernel (stack_narrow_cuda.cu) lays out a block's shared memory
// and sizes its grid. Plain C++, so the host side is tested without a GPU
// (csrc/tests/test_narrow_layout.cpp).
//
// A block runs tiles of `rows` rows of the batch through the whole stack. Its shared memory
// holds, in elements of the math type:
//   * weights: every layer's W (out x pitch(in)) and bias (out) once for the whole kernel
//     ("resident"), or, when they do not all fit, one slot as large as the largest layer's,
//     reloaded layer by layer ("staged");
//   * the tile's input rows (rows x pitch(in_0)), and per layer its pre-activation z and, for an
//     activation other than the identity, its output a (rows x pitch(out) each): the forward's
//     values that the backward reads;
//   * two gradient buffers (rows x pitch(widest layer)): dloss/dz of a layer and of the one below.
// Rows are padded to an odd pitch: a warp's threads reading one column of consecutive rows (W's
// rows in the forward) then hit 32 different banks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedtrain {
namespace cuda {

constexpr int kNarrowThreads = 256;
constexpr int kMaxNarrowLayers = 8;
constexpr int kMaxNarrowParams = 2 * kMaxNarrowLayers;
// A thread computes one output column for this many consecutive rows (a register tile): each
// weight read from shared memory serves that many multiply-adds. Tiles are multiples of it.
constexpr int kNarrowRowsPerThread = 4;
// The tile heights tried, tallest first; a taller tile reloads staged weights less often and
// adds fewer partial-gradient updates per row.
constexpr int kNarrowTileRows[] = {32, 16, 8, 4};
// The per-block partial gradients (blocks x all params' elements) are kept below this many
// elements by launching fewer blocks: scratch memory stays bounded for the widest stacks.
constexpr int64_t kMaxNarrowPartialElements = int64_t{1} << 24;

// The row pitch of a buffer of `width` columns: odd, so consecutive rows start in different banks
// (constexpr: the kernel calls it too).
constexpr int64_t narrow_pitch(int64_t width) { return width | 1; }

struct NarrowLayout {
  int layers = 0;
  int rows = 0;           // rows per tile, a multiple of kNarrowRowsPerThread
  bool resident = false;  // every layer's weights in its own slot, loaded once per block
  int64_t in[kMaxNarrowLayers] = {};
  int64_t out[kMaxNarrowLayers] = {};
  // Offsets in elements from the start of the block's shared memory.
  int64_t weight[kMaxNarrowLayers] = {};  // W_l, its bias right after (staged: all the same slot)
  int64_t input = 0;                      // the tile's rows of x
  int64_t z[kMaxNarrowLayers] = {};       // pre-activations
  int64_t a[kMaxNarrowLayers] = {};       // outputs; == z for the identity
  int64_t grad[2] = {};                   // dloss/dz buffers, used alternately down the layers
  int64_t elements = 0;                   // the whole layout

  int64_t widest() const {
    int64_t w = layers > 0 ? in[0] : 0;
    for (int l = 0; l < layers; ++l) w = std::max(w, out[l]);
    return w;
  }
};

// The layout of a stack with widths[0] inputs and widths[l + 1] outputs of layer l, where
// keeps_output[l] says layer l's activation is not the identity (its output is stored apart
// from z). widths.size() == keeps_output.size() + 1 <= kMaxNarrowLayers + 1.
inline NarrowLayout make_narrow_layout(const std::vector<int64_t>& widths,
                                       const std::vector<bool>& keeps_output, int rows, bool resident) {
  NarrowLayout s;
  s.layers = static_cast<int>(keeps_output.size());
  s.rows = rows;
  s.resident = resident;
  int64_t next = 0;
  int64_t largest_layer = 0;
  for (int l = 0; l < s.layers; ++l) {
    s.in[l] = widths[l];
    s.out[l] = widths[l + 1];
    const int64_t layer_elements = s.out[l] * narrow_pitch(s.in[l]) + s.out[l];
    largest_layer = std::max(largest_layer, layer_elements);
    if (resident) {
      s.weight[l] = next;
      next += layer_elements;
    }
  }
  if (!resident) next = largest_layer;  // every s.weight[l] is 0
  s.input = next;
  next += rows * narrow_pitch(s.in[0]);
  for (int l = 0; l < s.layers; ++l) {
    const int64_t size = rows * narrow_pitch(s.out[l]);
    s.z[l] = next;
    next += size;
    s.a[l] = s.z[l];
    if (keeps_output[l]) {
      s.a[l] = next;
      next += size;
    }
  }
  const int64_t grad_size = rows * narrow_pitch(s.widest());
  s.grad[0] = next;
  s.grad[1] = next + grad_size;
  s.elements = next + 2 * grad_size;
  return s;
}

// The layouts to try, best first: each tile height, resident weights before staged ones. The
// launcher takes the first that fits twice on a multiprocessor (so one block's barriers overlap
// another's work), else the first that fits once.
inline std::vector<NarrowLayout> narrow_layout_candidates(const std::vector<int64_t>& widths,
                                                          const std::vector<bool>& keeps_output) {
  std::vector<NarrowLayout> candidates;
  for (int rows : kNarrowTileRows) {
    for (bool resident : {true, false}) candidates.push_back(make_narrow_layout(widths, keeps_output, rows, resident));
  }
  return candidates;
}

// The blocks of the cooperative grid: no more than there are tiles (a block without a tile would
// only add a zero partial), than the device holds at once, and than keeps the partial gradients
// (param_elements per block) within kMaxNarrowPartialElements; at least one.
inline int narrow_grid_blocks(int64_t tiles, int64_t coresident, int64_t param_elements) {
  const int64_t by_scratch = kMaxNarrowPartialElements / std::max<int64_t>(param_elements, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min({tiles, coresident, by_scratch})));
}

}  // namespace cuda
}  // namespace fusedtrain
