// The CPU multi-tensor launcher: the work of one optimizer call, all tensors together, cut into
// fixed-size chunks and run in ONE parallel region (torch's fused CPU optimizers open one region
// per tensor, which costs more than the math for many small tensors).
#pragma once

#include <algorithm>
#include <array>
#include <initializer_list>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "kernel_table.h"

namespace fusedtrain {
namespace cpu {

// 32768 elements: 128 KiB per fp32 stream, enough for the hardware prefetchers to run ahead,
// small enough to balance the work of a few large tensors across threads.
constexpr int64_t kChunkElements = 32768;
// Below this many elements in total, waking the thread pool costs more than it saves.
constexpr int64_t kMinParallelElements = 65536;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Calls run_range(tensor_index, begin, end) for every chunk of every tensor.
template <typename RunRange>
void for_each_chunk(const std::vector<int64_t>& numels, const RunRange& run_range) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunkElements) {
      chunks.push_back({static_cast<int64_t>(t), b, std::min(b + kChunkElements, numels[t])});
    }
    total += numels[t];
  }
  const auto run_chunks = [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) run_range(chunks[c].tensor, chunks[c].begin, chunks[c].end);
  };
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (total < kMinParallelElements) {
    run_chunks(0, n);
  } else {
    at::parallel_for(0, n, 1, run_chunks);
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
