// A stand-in for <cuda_runtime.h> that runs device code on CPU threads, for tests without a GPU
// (csrc/tests/test_narrow_kernel.cpp): every CUDA thread of a grid is an OS thread, so that
// __syncthreads, warp shuffles and grid-wide barriers behave as on the device, with barriers
// in place of the hardware's. Only what the kernels under test use is here.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace cuda_emulation {

struct Warp {
  std::barrier<> barrier{32};
  alignas(8) unsigned char lanes[32][8];
};

struct Block {
  explicit Block(int threads) : barrier(threads), warps(static_cast<size_t>(threads / 32)) {}
  std::barrier<> barrier;
  std::vector<Warp> warps;
};

inline thread_local dim3 thread_index, block_index;
inline dim3 block_dim, grid_dim;
inline thread_local Block* current_block = nullptr;
inline std::barrier<>* grid_barrier = nullptr;

// body() on every thread of `blocks` blocks of `threads` threads (a multiple of 32), all at once.
template <typename F>
void launch(int blocks, int threads, F body) {
  std::barrier<> grid(blocks * threads);
  grid_barrier = &grid;
  grid_dim.x = static_cast<unsigned int>(blocks);
  block_dim.x = static_cast<unsigned int>(threads);
  std::vector<std::unique_ptr<Block>> block_state;
  for (int b = 0; b < blocks; ++b) block_state.push_back(std::make_unique<Block>(threads));
  std::vector<std::thread> pool;
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        block_index.x = static_cast<unsigned int>(b);
        thread_index.x = static_cast<unsigned int>(t);
        current_block = block_state[static_cast<size_t>(b)].get();
        body();
      });
    }
  }
  for (std::thread& thread : pool) thread.join();
  grid_barrier = nullptr;
}

// The value `source_lane` of this thread's warp holds (every lane of the warp calls this).
template <typename T>
T exchange(T v, unsigned int source_lane) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  Warp& warp = current_block->warps[thread_index.x / 32];
  std::memcpy(warp.lanes[thread_index.x % 32], &v, sizeof(T));
  warp.barrier.arrive_and_wait();
  T got;
  std::memcpy(&got, warp.lanes[source_lane], sizeof(T));
  warp.barrier.arrive_and_wait();
  return got;
}

}  // namespace cuda_emulation

#define threadIdx (cuda_emulation::thread_index)
#define blockIdx (cuda_emulation::block_index)
#define blockDim (cuda_emulation::block_dim)
#define gridDim (cuda_emulation::grid_dim)

inline void __syncthreads() { cuda_emulation::current_block->barrier.arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned int, T v, int offset) {
  const unsigned int lane = cuda_emulation::thread_index.x % 32;
  return cuda_emulation::exchange(v, lane + offset < 32 ? lane + offset : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned int, T v, int mask) {
  return cuda_emulation::exchange(v, (cuda_emulation::thread_index.x % 32) ^ static_cast<unsigned int>(mask));
}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}

inline int min(int a, int b) { return a < b ? a : b; }
