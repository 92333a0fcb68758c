// The CUDA multi-tensor launcher: many tensors per launch, as torch's and apex's
// multi_tensor_apply. The host cuts every tensor of the call into fixed-size chunks, one thread
// block per chunk, and writes the tensors' addresses and the chunk list into a table that
// travels in the kernel's arguments: no device buffer, no host-to-device copy, no
// synchronisation, so a step can be captured in a CUDA graph (which records the arguments by
// value). A table holds up to kMaxTensors tensors and kMaxChunks chunks; when either is full the
// table is launched and filling goes on in a fresh one, where a tensor whose chunks were not all
// placed yet continues. Plain C++, so the host side can be tested without a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace cuda {

constexpr int64_t kChunkElements = 65536;  // per block: enough work to amortise the block
constexpr int kThreads = 512;

// Kernel arguments must fit the classic 4 KB parameter space; a table takes at most
// kTableBytes of it, which leaves the rest for the kernel's other arguments.
constexpr size_t kKernelParamBytes = 4096;
constexpr size_t kTableBytes = 3584;
constexpr int kMaxChunks = 320;

// The tensors of one launch: kStreams element pointers laid out like the param (param, grad,
// state...), the size, and with kWithStep the address of its one-element float32 step counter.
// Block b runs chunk chunk_index[b] of the tensor in slot chunk_tensor[b] (chunk_begin and
// chunk_size below).
template <int kStreams, bool kWithStep>
struct ChunkTable {
  static constexpr size_t kBytesPerTensor = (kStreams + 1 + (kWithStep ? 1 : 0)) * sizeof(int64_t);
  static constexpr size_t kStepArrayPadding = kWithStep ? 0 : sizeof(float*);
  static constexpr int kMaxTensors = static_cast<int>(
      (kTableBytes - kStepArrayPadding - kMaxChunks * (sizeof(int32_t) + sizeof(uint8_t))) /
      kBytesPerTensor);

  void* data[kStreams][kMaxTensors];
  int64_t numel[kMaxTensors];
  float* step[kWithStep ? kMaxTensors : 1];
  int32_t chunk_index[kMaxChunks];
  uint8_t chunk_tensor[kMaxChunks];

  static_assert(kMaxTensors >= 1 && kMaxTensors <= 256, "chunk_tensor is a uint8_t slot");
};

// Where chunk b of a table begins in its tensor: in int64, as an int32 chunk number covers
// tensors of up to 2^47 elements.
template <int kStreams, bool kWithStep>
FT_INLINE int64_t chunk_begin(const ChunkTable<kStreams, kWithStep>& table, int b) {
  return static_cast<int64_t>(table.chunk_index[b]) * kChunkElements;
}

// Elements in chunk b: kChunkElements, except in the last chunk of a tensor.
template <int kStreams, bool kWithStep>
FT_INLINE int64_t chunk_size(const ChunkTable<kStreams, kWithStep>& table, int b) {
  const int64_t rest = table.numel[table.chunk_tensor[b]] - chunk_begin(table, b);
  return rest < kChunkElements ? rest : kChunkElements;
}

// One tensor of the call, as the host describes it.
template <int kStreams>
struct TensorRef {
  void* data[kStreams];
  float* step;  // ignored by tables without steps
  int64_t numel;
};

// Calls launch(table, num_chunks) once per filled table, in order, over all chunks of
// `tensors`; empty tensors take no slot.
template <int kStreams, bool kWithStep, typename Launch>
void for_each_chunk_table(const std::vector<TensorRef<kStreams>>& tensors, Launch&& launch) {
  using Table = ChunkTable<kStreams, kWithStep>;
  static_assert(sizeof(Table) <= kTableBytes, "chunk table exceeds its kernel-argument budget");
  Table table{};
  int slots = 0;
  int chunks = 0;
  auto place = [&](int slot, const TensorRef<kStreams>& t) {
    for (int s = 0; s < kStreams; ++s) table.data[s][slot] = t.data[s];
    table.numel[slot] = t.numel;
    if constexpr (kWithStep) table.step[slot] = t.step;
  };
  for (const TensorRef<kStreams>& t : tensors) {
    if (t.numel == 0) continue;
    place(slots++, t);
    const int64_t num_chunks = (t.numel + kChunkElements - 1) / kChunkElements;
    for (int64_t c = 0; c < num_chunks; ++c) {
      table.chunk_tensor[chunks] = static_cast<uint8_t>(slots - 1);
      table.chunk_index[chunks] = static_cast<int32_t>(c);
      ++chunks;
      const bool last_chunk = c == num_chunks - 1;
      if (chunks == kMaxChunks || (slots == Table::kMaxTensors && last_chunk)) {
        launch(table, chunks);
        chunks = 0;
        slots = 0;
        // The rest of this tensor's chunks go in the next table.
        if (!last_chunk) place(slots++, t);
      }
    }
  }
  if (chunks > 0) launch(table, chunks);
}

// The step counters of a call, for the kernel that increments them after the update launches.
struct StepTable {
  static constexpr int kMaxSteps = static_cast<int>((kTableBytes - sizeof(int64_t)) / sizeof(float*));
  float* step[kMaxSteps];
  int32_t count;
};
static_assert(sizeof(StepTable) <= kTableBytes, "step table exceeds its kernel-argument budget");

// Calls launch(table) once per table of up to kMaxSteps counters, in order.
template <typename Launch>
void for_each_step_table(const std::vector<float*>& steps, Launch&& launch) {
  StepTable table{};
  for (size_t begin = 0; begin < steps.size(); begin += StepTable::kMaxSteps) {
    const size_t count = std::min<size_t>(StepTable::kMaxSteps, steps.size() - begin);
    for (size_t i = 0; i < count; ++i) table.step[i] = steps[begin + i];
    table.count = static_cast<int32_t>(count);
    launch(table);
  }
}

}  // namespace cuda
}  // namespace fusedtrain
