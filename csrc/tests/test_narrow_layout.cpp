// Tests the host side of the narrow-stack kernel without a GPU (csrc/cuda/stack_narrow_layout.h):
// each candidate shared-memory layout gives every buffer its own range, of the size the kernel
// addresses (rows x odd pitch), with nothing left over; candidates come tallest first, resident
// before staged; the grid never has more blocks than tiles or co-resident blocks, and its
// partial gradients stay within their bound. Needs no torch and no test framework: one line
// per failed check, and the exit status is 1 if any check failed.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "../cuda/stack_narrow_layout.h"

namespace {

using namespace fusedtrain::cuda;

int failed_checks = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failed_checks;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

std::string describe(const std::vector<int64_t>& widths, const std::vector<bool>& keeps, int rows, bool resident) {
  std::string s = "widths";
  for (int64_t w : widths) s += " " + std::to_string(w);
  s += " keeps";
  for (bool k : keeps) s += k ? " 1" : " 0";
  return s + " rows " + std::to_string(rows) + (resident ? " resident" : " staged");
}

void check_layout(const std::vector<int64_t>& widths, const std::vector<bool>& keeps, int rows, bool resident) {
  const std::string where = describe(widths, keeps, rows, resident);
  const NarrowLayout s = make_narrow_layout(widths, keeps, rows, resident);
  check(s.layers == static_cast<int>(keeps.size()) && s.rows == rows && s.resident == resident, where + ": header");
  check(rows % kNarrowRowsPerThread == 0, where + ": a row group of a tile would read past its buffer");
  // Every range [begin, begin + size) the kernel touches.
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t widest = widths[0];
  int64_t largest_layer = 0;
  for (int l = 0; l < s.layers; ++l) {
    check(s.in[l] == widths[l] && s.out[l] == widths[l + 1], where + ": layer " + std::to_string(l) + " widths");
    const int64_t layer_size = s.out[l] * narrow_pitch(s.in[l]) + s.out[l];
    largest_layer = std::max(largest_layer, layer_size);
    if (resident) {
      ranges.push_back({s.weight[l], layer_size});
    } else {
      check(s.weight[l] == 0, where + ": staged layers share slot 0");
    }
    widest = std::max(widest, s.out[l]);
    ranges.push_back({s.z[l], rows * narrow_pitch(s.out[l])});
    if (keeps[l]) {
      ranges.push_back({s.a[l], rows * narrow_pitch(s.out[l])});
    } else {
      check(s.a[l] == s.z[l], where + ": the identity's output is z");
    }
  }
  if (!resident) ranges.push_back({0, largest_layer});
  ranges.push_back({s.input, rows * narrow_pitch(widths[0])});
  check(s.widest() == widest, where + ": widest");
  for (int b = 0; b < 2; ++b) ranges.push_back({s.grad[b], rows * narrow_pitch(widest)});
  std::sort(ranges.begin(), ranges.end());
  int64_t end = 0;
  for (const auto& [begin, size] : ranges) {
    check(begin >= end, where + ": ranges overlap at " + std::to_string(begin));
    end = std::max(end, begin + size);
  }
  // The ranges tile the layout exactly: nothing overlaps (above) and nothing is left over.
  int64_t total = 0;
  for (const auto& range : ranges) total += range.second;
  check(end == s.elements && total == s.elements, where + ": " + std::to_string(total) + " elements used of " +
                                                      std::to_string(s.elements));
}

void check_layouts() {
  const int64_t widths_tried[] = {1, 2, 31, 32, 33, 64, 127, 128};
  for (int depth = 1; depth <= kMaxNarrowLayers; ++depth) {
    for (int64_t first : widths_tried) {
      for (int64_t step : {int64_t{1}, int64_t{3}}) {
        std::vector<int64_t> widths{first};
        std::vector<bool> keeps;
        for (int l = 0; l < depth; ++l) {
          widths.push_back(widths_tried[(l * step + static_cast<int64_t>(first)) % 8]);
          keeps.push_back((l + step) % 2 == 0);
        }
        for (int rows : kNarrowTileRows) {
          for (bool resident : {true, false}) check_layout(widths, keeps, rows, resident);
        }
        // Tallest first, resident before staged; a staged layout never needs more memory.
        const std::vector<NarrowLayout> candidates = narrow_layout_candidates(widths, keeps);
        const std::string where = describe(widths, keeps, 0, true);
        check(candidates.size() == 2 * std::size(kNarrowTileRows), where + ": candidate count");
        for (size_t c = 0; c + 1 < candidates.size(); ++c) {
          check(candidates[c].rows >= candidates[c + 1].rows, where + ": candidates not tallest first");
        }
        for (size_t c = 0; c + 1 < candidates.size(); c += 2) {
          check(candidates[c].resident && !candidates[c + 1].resident &&
                    candidates[c + 1].elements <= candidates[c].elements,
                where + ": resident, then staged with no more memory");
        }
      }
    }
  }
  // The tutorial MLP 10-64-32-1 (ReLU, ReLU, identity) in fp32 at 32 rows, resident: weights
  // 64 x 11 + 64, 32 x 65 + 32, 1 x 33 + 1; x 32 x 11; z and a 32 x 65 and 32 x 33 twice each;
  // z 32 x 1; two gradient buffers 32 x 65.
  const NarrowLayout tutorial = make_narrow_layout({10, 64, 32, 1}, {true, true, false}, 32, true);
  check(tutorial.elements == 768 + 2112 + 34 + 352 + 4160 + 2112 + 32 + 4160,
        "tutorial MLP layout: " + std::to_string(tutorial.elements) + " elements");
}

void check_grids() {
  for (int64_t tiles : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{2048}, int64_t{1} << 30}) {
    for (int64_t coresident : {int64_t{1}, int64_t{132}, int64_t{264}, int64_t{2000}}) {
      for (int64_t params : {int64_t{0}, int64_t{1}, int64_t{2817}, int64_t{66048}, kMaxNarrowPartialElements * 2}) {
        const int blocks = narrow_grid_blocks(tiles, coresident, params);
        const std::string where = "grid tiles=" + std::to_string(tiles) + " coresident=" +
                                  std::to_string(coresident) + " params=" + std::to_string(params);
        check(blocks >= 1, where + ": no block");
        check(blocks <= std::max<int64_t>(1, std::min(tiles, coresident)), where + ": a block without a tile or not resident");
        check(params > kMaxNarrowPartialElements || blocks * params <= kMaxNarrowPartialElements,
              where + ": partial gradients over their bound");
        // Nothing but those bounds holds the grid back.
        check(blocks == std::max<int64_t>(1, std::min({tiles, coresident, kMaxNarrowPartialElements / std::max<int64_t>(params, 1)})),
              where + ": fewer blocks than allowed");
      }
    }
  }
}

}  // namespace

int main() {
  check_layouts();
  check_grids();
  if (failed_checks == 0) std::printf("all checks passed\n");
  return failed_checks == 0 ? 0 : 1;
}
