// Tests the host side of the CUDA kernels without a GPU. The multi-tensor launcher
// (csrc/cuda/multi_tensor_apply.cuh): the tables that for_each_chunk_table hands to each
// launch, read back with the kernels' own chunk_begin/chunk_size, must cover every element of
// every tensor exactly once, with only the slots and chunks a table can hold;
// for_each_step_table must hand over every step counter exactly once. The grid of the fused
// linear + MSE kernel (csrc/cuda/fused_grid.h): within the co-resident blocks, covering every
// row and column, with scratch memory bounded by the problem's size. Needs no torch and no test
// framework: one line per failed check, and the exit status is 1 if any check failed.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../cuda/fused_grid.h"
#include "../cuda/multi_tensor_apply.cuh"

namespace {

using fusedtrain::cuda::ChunkTable;
using fusedtrain::cuda::kChunkElements;
using fusedtrain::cuda::kMaxChunks;
using fusedtrain::cuda::StepTable;
using fusedtrain::cuda::TensorRef;

int failed_checks = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failed_checks;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// Made-up addresses, never dereferenced: stream s of tensor i, and the step counter of tensor i.
uintptr_t fake_address(size_t tensor, int stream) {
  return (static_cast<uintptr_t>(tensor) + 1) * 4096 + static_cast<uintptr_t>(stream) * 16;
}
float* fake_step(size_t tensor) { return reinterpret_cast<float*>((tensor + 1) * 4096 + 8); }

template <int kStreams, bool kWithStep>
void check_tables(const std::string& name, const std::vector<int64_t>& sizes) {
  using Table = ChunkTable<kStreams, kWithStep>;
  std::vector<TensorRef<kStreams>> tensors;
  std::map<uintptr_t, size_t> index_of;
  for (size_t i = 0; i < sizes.size(); ++i) {
    TensorRef<kStreams> t{};
    for (int s = 0; s < kStreams; ++s) t.data[s] = reinterpret_cast<void*>(fake_address(i, s));
    t.step = fake_step(i);
    t.numel = sizes[i];
    tensors.push_back(t);
    index_of[fake_address(i, 0)] = i;
  }
  // Per tensor, the [begin, end) ranges that blocks run.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges(sizes.size());
  int launches = 0;
  fusedtrain::cuda::for_each_chunk_table<kStreams, kWithStep>(
      tensors, [&](const Table& table, int num_chunks) {
        const std::string where = name + ", launch " + std::to_string(launches++);
        check(num_chunks >= 1 && num_chunks <= kMaxChunks,
              where + ": " + std::to_string(num_chunks) + " chunks");
        for (int b = 0; b < num_chunks && b < kMaxChunks; ++b) {
          const int slot = table.chunk_tensor[b];
          const std::string at = where + ", block " + std::to_string(b);
          if (slot >= Table::kMaxTensors) {
            check(false, at + ": slot " + std::to_string(slot) + " out of range");
            continue;
          }
          const auto found = index_of.find(reinterpret_cast<uintptr_t>(table.data[0][slot]));
          if (found == index_of.end()) {
            check(false, at + ": slot holds no tensor of the call");
            continue;
          }
          const size_t i = found->second;
          for (int s = 1; s < kStreams; ++s) {
            check(reinterpret_cast<uintptr_t>(table.data[s][slot]) == fake_address(i, s),
                  at + ": stream " + std::to_string(s) + " of another tensor");
          }
          if constexpr (kWithStep) check(table.step[slot] == fake_step(i), at + ": wrong step");
          check(table.numel[slot] == sizes[i], at + ": wrong numel");
          const int64_t begin = fusedtrain::cuda::chunk_begin(table, b);
          const int64_t size = fusedtrain::cuda::chunk_size(table, b);
          check(size >= 1 && size <= kChunkElements && begin % kChunkElements == 0,
                at + ": chunk [" + std::to_string(begin) + ", +" + std::to_string(size) + ")");
          ranges[i].push_back({begin, begin + size});
        }
      });
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::sort(ranges[i].begin(), ranges[i].end());
    int64_t covered = 0;
    bool exact = true;
    for (const auto& [begin, end] : ranges[i]) {
      exact = exact && begin == covered;
      covered = end;
    }
    check(exact && covered == sizes[i], name + ": tensor " + std::to_string(i) + " of " +
                                            std::to_string(sizes[i]) +
                                            " elements not covered exactly once");
  }
}

// The same sizes through every table layout the optimizer kernels use.
void check_all_layouts(const std::string& name, const std::vector<int64_t>& sizes) {
  check_tables<2, false>(name + " (sgd)", sizes);
  check_tables<3, false>(name + " (sgd, momentum)", sizes);
  check_tables<4, true>(name + " (adam)", sizes);
  check_tables<5, true>(name + " (adam, amsgrad)", sizes);
}

void check_step_tables(size_t count) {
  std::vector<float*> steps;
  for (size_t i = 0; i < count; ++i) steps.push_back(fake_step(i));
  std::vector<float*> seen;
  fusedtrain::cuda::for_each_step_table(steps, [&](const StepTable& table) {
    check(table.count >= 1 && table.count <= StepTable::kMaxSteps,
          "step table of " + std::to_string(table.count));
    for (int i = 0; i < table.count && i < StepTable::kMaxSteps; ++i) seen.push_back(table.step[i]);
  });
  check(seen == steps, std::to_string(count) + " step counters not handed over once each, in order");
}

// The fused kernel's grid for x (n, in) and `out` outputs over at most max_blocks blocks.
void check_fused_grid(int64_t n, int64_t in, int64_t out, bool need_params, int max_blocks) {
  using namespace fusedtrain::cuda;
  const FusedGrid g = choose_fused_grid(n, in, out, need_params, max_blocks);
  const std::string where = "fused grid n=" + std::to_string(n) + " in=" + std::to_string(in) +
                            " out=" + std::to_string(out) + " blocks<=" + std::to_string(max_blocks);
  const int64_t row_chunks = std::max<int64_t>(1, (n + kFusedRows - 1) / kFusedRows);
  check(g.row_groups >= 1 && g.column_groups >= 1 && g.blocks() <= std::max(1, max_blocks),
        where + ": " + std::to_string(g.row_groups) + " x " + std::to_string(g.column_groups));
  // Each row group has a row chunk (or the one empty chunk of n = 0); every column is in a group.
  check(g.row_groups <= row_chunks, where + ": a row group without rows");
  check(g.column_groups * g.group_columns >= in && g.group_columns >= 0 &&
            (g.column_groups == 1 || g.group_columns >= kMinGroupColumns / 2),
        where + ": columns " + std::to_string(g.column_groups) + " x " + std::to_string(g.group_columns));
  // Scratch: at most about half of x (partial gradients of row groups of >= 32 rows) plus a
  // sixteenth (partial dot products of column groups of >= 256 columns) plus weight and target.
  const int64_t scratch = fused_scratch_elements(g, n, in, out, need_params);
  const int64_t bound = n * in / 2 + n / 2 + n * in / 16 + n * out + 2 * (out * in + out);
  check(scratch <= bound, where + ": scratch " + std::to_string(scratch) + " > " + std::to_string(bound));
  // The reduction's lanes: a power of two up to a warp, no more than the row groups, and more
  // than one only while the elements times the lanes fit the grid's threads.
  const int64_t width = out * in + out;
  const int64_t threads = static_cast<int64_t>(g.blocks()) * kFusedThreads;
  const int lanes = fused_reduce_lanes(width, g.row_groups, threads);
  check(lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0 &&
            (lanes == 1 || (lanes <= g.row_groups && width * lanes <= threads)),
        where + ": " + std::to_string(lanes) + " reduce lanes");
}

void check_fused_grids() {
  using namespace fusedtrain::cuda;
  const int64_t ns[] = {0, 1, 31, 33, 5000, 1000000};
  const int64_t ins[] = {0, 1, 33, 255, 257, 4096, 100000, 2000000};
  const int64_t outs[] = {0, 1, 16};
  const int max_blocks[] = {1, 7, 264, 1056};
  for (int64_t n : ns)
    for (int64_t in : ins)
      for (int64_t out : outs)
        for (int most : max_blocks)
          for (bool need_params : {true, false}) check_fused_grid(n, in, out, need_params, most);

  // Wide and short, the case of the issue (in = 2e6, out = 16): the columns are split, and the
  // scratch is one weight-sized partial gradient plus small partial predictions, where 256
  // partial gradients (the former design) took 256 x 32M elements.
  const int64_t in = 2000000, out = 16, n = 256;
  const FusedGrid wide = choose_fused_grid(n, in, out, true, 1056);
  check(wide.row_groups == 1 && wide.column_groups > 1 && wide.blocks() >= 1000,
        "wide problem: " + std::to_string(wide.row_groups) + " x " + std::to_string(wide.column_groups));
  check(fused_scratch_elements(wide, n, in, out, true) <= (out * in + out) + wide.column_groups * n * out,
        "wide problem: more scratch than one partial gradient and the partial predictions");
  // Tall and narrow: rows split over every block, columns not.
  const FusedGrid tall = choose_fused_grid(1000000, 64, 1, true, 1056);
  check(tall.column_groups == 1 && tall.row_groups == 1056,
        "tall problem: " + std::to_string(tall.row_groups) + " x " + std::to_string(tall.column_groups));
  // Fewer blocks than the device holds when the problem is small: no block without work.
  const FusedGrid small = choose_fused_grid(100, 33, 4, true, 1056);
  check(small.row_groups == 4 && small.column_groups == 1, "small problem: not 4 x 1");
}

}  // namespace

int main() {
  constexpr int64_t kTableChunks = kMaxChunks * kChunkElements;  // elements one launch can hold
  const int kAdamSlots = ChunkTable<4, true>::kMaxTensors;

  check_all_layouts("no tensors", {});
  check_all_layouts("empty tensors only", {0, 0, 0});
  check_all_layouts("one element", {1});
  check_all_layouts("chunk edges", {kChunkElements - 1, kChunkElements, kChunkElements + 1});
  check_all_layouts("a tensor filling a table exactly", {kTableChunks, 5, kTableChunks});
  check_all_layouts("a tensor over three tables", {7, 2 * kTableChunks + 3, 0, 9});
  check_all_layouts("a full table of single chunks", std::vector<int64_t>(kAdamSlots, 3));
  check_all_layouts("one more than a full table", std::vector<int64_t>(kAdamSlots + 1, 3));
  // Slots and chunks running out at the same tensor.
  std::vector<int64_t> both_full(kAdamSlots - 1, 1);
  both_full.push_back((kMaxChunks - (kAdamSlots - 1)) * kChunkElements);
  both_full.push_back(kChunkElements + 1);
  check_tables<4, true>("slots and chunks full together", both_full);

  std::mt19937_64 rng(20240611);
  const std::vector<int64_t> typical = {0, 1, 7, 129, 4097, kChunkElements - 1, kChunkElements,
                                        kChunkElements + 1, 3 * kChunkElements + 5, 40 * kChunkElements};
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<int64_t> sizes(1 + rng() % 400);
    for (int64_t& size : sizes) size = typical[rng() % typical.size()];
    if (trial % 4 == 0) sizes[rng() % sizes.size()] = kTableChunks + 1 + rng() % kTableChunks;
    check_all_layouts("random sizes, trial " + std::to_string(trial), sizes);
  }

  for (size_t count : {size_t{0}, size_t{1}, size_t{StepTable::kMaxSteps}, size_t{StepTable::kMaxSteps + 1}, size_t{1000}}) {
    check_step_tables(count);
  }

  check_fused_grids();

  std::printf("%s (%d failed checks)\n", failed_checks == 0 ? "OK" : "FAILED", failed_checks);
  return failed_checks == 0 ? 0 : 1;
}
