// The CUDA multi-tensor launcher: many tensors per launch. The host lists every tensor of the
// call (its element pointers and size) and cuts them into fixed-size chunks; one thread block
// runs one chunk. The two tables go to the device in one copy, so a launch covers any number of
// tensors without hitting the kernel-argument limit.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>

namespace fusedtrain {
namespace cuda {

constexpr int64_t kChunkElements = 65536;  // per block: enough work to amortise the block
constexpr int kThreads = 512;

// One tensor of the call: up to kMaxStreams element pointers laid out like the param, the
// address of its one-element step counter (or 0), and its size.
constexpr int kMaxStreams = 5;
struct TensorEntry {
  int64_t data[kMaxStreams];
  int64_t step;
  int64_t numel;
};

struct ChunkEntry {
  int64_t tensor;
  int64_t begin;
};

// Both tables in one device buffer: entries first, then chunks.
struct LaunchTables {
  at::Tensor device_buffer;
  const TensorEntry* tensors;
  const ChunkEntry* chunks;
  int64_t num_chunks;
};

inline LaunchTables make_tables(const std::vector<TensorEntry>& tensors, at::Device device) {
  std::vector<ChunkEntry> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    for (int64_t b = 0; b < tensors[t].numel; b += kChunkElements) {
      chunks.push_back({static_cast<int64_t>(t), b});
    }
  }
  const int64_t tensor_words = static_cast<int64_t>(tensors.size() * sizeof(TensorEntry) / 8);
  const int64_t chunk_words = static_cast<int64_t>(chunks.size() * sizeof(ChunkEntry) / 8);
  at::Tensor host = at::empty({tensor_words + chunk_words}, at::kLong);
  std::memcpy(host.data_ptr<int64_t>(), tensors.data(), tensors.size() * sizeof(TensorEntry));
  std::memcpy(host.data_ptr<int64_t>() + tensor_words, chunks.data(),
              chunks.size() * sizeof(ChunkEntry));
  at::Tensor buffer = host.to(device, /*non_blocking=*/false);
  const int64_t* base = buffer.data_ptr<int64_t>();
  return {buffer, reinterpret_cast<const TensorEntry*>(base),
          reinterpret_cast<const ChunkEntry*>(base + tensor_words),
          static_cast<int64_t>(chunks.size())};
}

}  // namespace cuda
}  // namespace fusedtrain
