// The CPU multi-tensor launcher: the work of one optimizer call, all tensors together, cut into
// fixed-size chunks and run in ONE parallel region (torch's fused CPU optimizers open one region
// per tensor, which costs more than the math for many small tensors).
#pragma once

#include <algorithm>
#include <array>
#include <initializer_list>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "kernel_table.h"

namespace fusedtrain {
namespace cpu {

// The elements of all tensors of a call, one tensor after another, form one flat sequence cut
// into chunks of kChunkElements; a chunk may span several small tensors. Threads take equal
// runs of chunks, so 100 tensors of 1e3 elements balance as well as one tensor of 1e5.
// 4096 elements: a few microseconds of work, against tens of nanoseconds to enter a range.
constexpr int64_t kChunkElements = 4096;
// Below this many elements in total, waking the thread pool costs more than it saves.
constexpr int64_t kMinParallelElements = 65536;

// Calls run_range(tensor_index, begin, end) on pieces that together cover every element of
// every tensor exactly once.
template <typename RunRange>
void for_each_chunk(const std::vector<int64_t>& numels, const RunRange& run_range) {
  // starts[t]: flat index of tensor t's first element; starts.back(): all elements.
  std::vector<int64_t> starts(numels.size() + 1, 0);
  std::partial_sum(numels.begin(), numels.end(), starts.begin() + 1);
  const int64_t total = starts.back();

  const auto run_flat = [&](int64_t begin, int64_t end) {
    // The last tensor starting at or before `begin` contains it (empty tensors share starts).
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end;) {
      while (starts[t + 1] <= pos) ++t;
      const int64_t stop = std::min(end, starts[t + 1]);
      run_range(static_cast<int64_t>(t), pos - starts[t], stop - starts[t]);
      pos = stop;
    }
  };
  const auto run_chunks = [&](int64_t first, int64_t last) {
    run_flat(first * kChunkElements, std::min(last * kChunkElements, total));
  };
  const int64_t chunks = (total + kChunkElements - 1) / kChunkElements;
  if (total < kMinParallelElements) {
    run_chunks(0, chunks);
  } else {
    at::parallel_for(0, chunks, kMinParallelElements / kChunkElements / 2, run_chunks);
  }
}

inline Storage storage_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return Storage::kFloat64;
    case at::kBFloat16: return Storage::kBFloat16;
    case at::kHalf: return Storage::kFloat16;
    default: return Storage::kFloat32;
  }
}

// The tensors updated together for one param (param, grad, optimizer state). When they share
// one dense layout, element i sits at the same offset in each and the loops run over raw
// memory. Otherwise (a sliced param, a grad with other strides) the loops run on contiguous
// copies, which finish() writes back into the tensors that the kernel mutated.
template <size_t kMaxTensors>
class ParamTensors {
 public:
  ParamTensors(std::initializer_list<const at::Tensor*> tensors) {
    const at::Tensor& param = **tensors.begin();
    bool shared_layout = param.is_non_overlapping_and_dense();
    for (const at::Tensor* t : tensors) {
      shared_layout = shared_layout && t->strides() == param.strides();
    }
    size_t k = 0;
    for (const at::Tensor* t : tensors) {
      if (shared_layout) {
        data_[k] = t->data_ptr();
      } else {
        staged_.emplace_back(Staged{k, *t, t->contiguous()});
        data_[k] = staged_.back().work.data_ptr();
      }
      ++k;
    }
  }

  void* data(size_t k) const { return data_[k]; }

  // Copies staged results back; `mutated[k]` says whether tensor k was written.
  void finish(const std::array<bool, kMaxTensors>& mutated) const {
    for (const Staged& s : staged_) {
      if (mutated[s.index] && !s.work.is_same(s.original)) s.original.copy_(s.work);
    }
  }

 private:
  struct Staged {
    size_t index;
    at::Tensor original;
    at::Tensor work;
  };
  std::array<void*, kMaxTensors> data_{};
  std::vector<Staged> staged_;  // empty in the common, shared-layout case
};

// Reads a one-element float32/float64 CPU tensor without a dispatcher round trip.
inline double read_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.data_ptr<double>()
                                        : static_cast<double>(*t.data_ptr<float>());
}

inline void write_scalar(const at::Tensor& t, double value) {
  if (t.scalar_type() == at::kDouble) {
    *t.data_ptr<double>() = value;
  } else {
    *t.data_ptr<float>() = static_cast<float>(value);
  }
}

}  // namespace cpu
}  // namespace fusedtrain
