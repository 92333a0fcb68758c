// Tests the host side of the CUDA multi-tensor launcher (csrc/cuda/multi_tensor_apply.cuh)
// without a GPU: the tables that for_each_chunk_table hands to each launch, read back with the
// kernels' own chunk_begin/chunk_size, must cover every element of every tensor exactly once,
// with only the slots and chunks a table can hold; for_each_step_table must hand over every
// step counter exactly once. Needs no torch and no test framework: one line per failed check,
// and the exit status is 1 if any check failed.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

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

  std::printf("%s (%d failed checks)\n", failed_checks == 0 ? "OK" : "FAILED", failed_checks);
  return failed_checks == 0 ? 0 : 1;
}
