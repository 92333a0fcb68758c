// The device side of the one-launch fit of a small layer stack (the design: stack_fit_cuda.cu,
// which launches it): all epochs and batches of fusedtrain.fit in one block. Written against
// CUDA's built-ins only, so that csrc/tests/test_fit_kernel.cpp runs the same body on CPU threads
// (csrc/tests/emulation) and checks it without a GPU.
//
// The block loads the params and the optimizer state into shared memory once (stack_fit_layout.h),
// then per batch: its rows gathered through the epoch's order into a tile, the narrow step's
// forward, loss head and backward (stack_narrow_kernel.cuh) adding every param's gradient into
// shared memory, and the narrow step's update of every element from it; the padded weights the
// loops read are then copied again from the updated params. Each epoch ends with the mean of its
// batch losses (in double) and, given a validation set, its loss. Everything goes back to global
// memory at the end. Every sum runs in a fixed order (the loops' own, warps in order, batches in
// order), so two runs give the same bits.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include "stack_fit_layout.h"
#include "stack_narrow_kernel.cuh"

namespace fusedtrain {
namespace cuda {
namespace narrow {

template <typename T>
struct FitArgs {
  // The stack as the narrow step's device functions read it: layers, layout (layout.narrow),
  // params (in global memory, read at the start and written at the end) and loss head. Its rows,
  // targets and grid scratch are not used: the fit's rows are below.
  NarrowArgs<T> stack;
  FitLayout layout;
  const T* x;            // n x in_0
  const void* target;    // n x out_L in T, or n int64 classes for cross entropy
  int64_t n;
  const int64_t* orders;  // epochs x rows_used rows of x, or null: rows 0 .. rows_used - 1
  int64_t epochs;
  int64_t rows_used;     // per epoch
  int64_t batch;         // rows per batch (the last one may have fewer)
  int64_t batches;       // per epoch, at least one (no rows: one empty batch, as the CPU loop)
  bool mean;             // reduction "mean": a loss over its rows x out_L, or cross entropy's kept rows
  const T* val_x;        // val_n x in_0, or null without a validation set
  const void* val_target;
  int64_t val_n;
  T* train_losses;       // epochs
  T* val_losses;         // epochs, with val_x
};

// The block's scalars: the stack and the update as the kernel's arguments give them, but with the
// params, targets and optimizer state in shared memory.
template <typename T, typename Update>
struct FitBlock {
  NarrowArgs<T> stack;
  Update update;
  BlockScalars<Update> scalars;
};

// The row of the source that row i of an epoch takes.
__device__ __forceinline__ int64_t source_row(const int64_t* order, int64_t i, int64_t n) {
  if (order == nullptr) return i;
  const int64_t row = order[i];
  // As for cross entropy's classes: an index out of range stops the kernel (a host check of a
  // device tensor would synchronise).
  CUDA_KERNEL_ASSERT(row >= 0 && row < n);
  return row;
}

// Row r of a tile is row source_row(order, first + r) of (x, target): its inputs into the tile's
// input rows (at the narrow layout's pitch), its target into tile_target.
template <typename T>
__device__ void gather_tile(const T* x, const void* target, int64_t n, const int64_t* order, int64_t first,
                            int rows, int in, int out, bool classes, T* input, void* tile_target) {
  const int64_t pitch = narrow_pitch(in);
  for (int e = threadIdx.x; e < rows * in; e += kThreads) {
    const int r = e / in, k = e % in;
    input[r * pitch + k] = x[source_row(order, first + r, n) * in + k];
  }
  if (classes) {
    const int64_t* classes_in = static_cast<const int64_t*>(target);
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      static_cast<int64_t*>(tile_target)[r] = classes_in[source_row(order, first + r, n)];
    }
    return;
  }
  for (int e = threadIdx.x; e < rows * out; e += kThreads) {
    const int r = e / out, c = e % out;
    static_cast<T*>(tile_target)[e] = static_cast<const T*>(target)[source_row(order, first + r, n) * out + c];
  }
}

// The kernel's body, on one thread of its single block: `dynamic_shared` is the block's dynamic
// shared memory (a.layout), `block` its scalars.
template <typename T, typename Update>
__device__ void run_fit(const FitArgs<T>& a, const Update& update, unsigned char* dynamic_shared,
                        FitBlock<T, Update>& block) {
  T* const shared = reinterpret_cast<T*>(dynamic_shared);
  const FitLayout& f = a.layout;
  NarrowArgs<T>& stack = block.stack;
  Update& u = block.update;
  const int count = a.stack.params.count;
  const int64_t width = a.stack.params.offset[count];
  const int lists = update.state_lists();
  T* const params = shared + f.params;
  T* const grads = shared + f.grads;
  T* const state = shared + f.state;
  T* const narrow = shared + f.narrow_base;
  void* const tile_target = shared + f.target;
  const int layers = f.narrow.layers;
  const int in = static_cast<int>(f.narrow.in[0]), out = static_cast<int>(f.narrow.out[layers - 1]);
  const bool classes = a.stack.loss == Loss::kCrossEntropy;

  // The params and the optimizer state into shared memory, where they stay for the whole fit.
  for (int i = 0; i < count; ++i) {
    const int64_t begin = a.stack.params.offset[i], size = a.stack.params.offset[i + 1] - begin;
    for (int64_t e = threadIdx.x; e < size; e += kThreads) {
      params[begin + e] = a.stack.params.data[i][e];
      for (int k = 0; k < lists; ++k) state[k * width + begin + e] = update.state_list(k)[i][e];
    }
  }
  if (threadIdx.x == 0) {
    stack = a.stack;
    u = update;
    stack.target = tile_target;
    for (int i = 0; i < count; ++i) {
      const int64_t begin = a.stack.params.offset[i];
      stack.params.data[i] = params + begin;
      for (int k = 0; k < lists; ++k) u.state_list(k)[i] = state + k * width + begin;
    }
  }
  __syncthreads();
  for (int l = 0; l < layers; ++l) load_layer_weights(stack, l, narrow);
  const auto resident = [](int) {};  // every layer's weights stay in their own slot

  // The kept rows of cross entropy among rows [first, first + rows) of an epoch, in every thread.
  const auto kept_rows = [&](const void* target, int64_t n, const int64_t* order, int64_t first, int64_t rows) {
    const int64_t* classes_in = static_cast<const int64_t*>(target);
    int64_t kept = 0;
    for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
      kept += classes_in[source_row(order, first + r, n)] != stack.ignore_index;
    }
    kept = block_sum(kept, block.scalars.warp_counts);
    if (threadIdx.x == 0) block.scalars.kept_rows = kept;
    __syncthreads();
    return block.scalars.kept_rows;
  };
  // R of the loss of those rows: the mean divides by it (as on the CPU); 1 under "sum".
  const auto loss_divisor = [&](const void* target, int64_t n, const int64_t* order, int64_t first, int64_t rows) {
    if (!a.mean) return 1.0;
    return static_cast<double>(classes ? kept_rows(target, n, order, first, rows) : rows * out);
  };
  // Those rows through the stack in tiles, with the gradient added into grads when training;
  // their loss summed over the block, in thread 0.
  const auto run_rows = [&](const T* x, const void* target, int64_t n, const int64_t* order, int64_t first,
                            int64_t rows, T scale, bool train) {
    double loss = 0.0;
    for (int64_t begin = 0; begin < rows; begin += f.narrow.rows) {
      const int tile = static_cast<int>(rows - begin < f.narrow.rows ? rows - begin : f.narrow.rows);
      __syncthreads();  // the previous tile, or the weights' copy, is done with every buffer
      gather_tile(x, target, n, order, first + begin, tile, in, out, classes, narrow + f.narrow.input, tile_target);
      forward_tile(stack, narrow, tile, resident);
      loss += tile_loss_and_grad(stack, narrow, int64_t{0}, tile, scale);
      if (train) backward_tile(stack, narrow, tile, grads, resident);
    }
    return block_sum(loss, block.scalars.warp_losses);
  };

  const double val_divisor = a.val_x != nullptr ? loss_divisor(a.val_target, a.val_n, nullptr, 0, a.val_n) : 1.0;
  for (int64_t epoch = 0; epoch < a.epochs; ++epoch) {
    const int64_t* order = a.orders != nullptr ? a.orders + epoch * a.rows_used : nullptr;
    double epoch_loss = 0.0;  // thread 0's
    for (int64_t b = 0; b < a.batches; ++b) {
      const int64_t first = b * a.batch;
      const int64_t rows = a.rows_used - first < a.batch ? a.rows_used - first : a.batch;
      __syncthreads();  // the last update is done reading the gradients
      for (int64_t e = threadIdx.x; e < width; e += kThreads) grads[e] = T(0);
      const double divisor = loss_divisor(a.target, a.n, order, first, rows);
      // 1 / R in double, then rounded, as the CPU; R = 0 (no row, or none kept) gives inf, which
      // no gradient sees, and a NaN loss.
      const double loss = run_rows(a.x, a.target, a.n, order, first, rows, static_cast<T>(1.0 / divisor), true);
      if (threadIdx.x == 0) epoch_loss += loss / divisor;
      u.prepare(stack.params, block.scalars.update);
      __syncthreads();  // the gradients and the update's coefficients are complete
      u.apply(stack.params, block.scalars.update, [&](auto&& element) {
        for (int64_t e = threadIdx.x; e < width; e += kThreads) element(e, grads[e]);
      });
      __syncthreads();  // every param has moved
      if (threadIdx.x == 0) {
        u.finish(stack.params);
        u.advance();
      }
      for (int l = 0; l < layers; ++l) load_layer_weights(stack, l, narrow);
    }
    if (threadIdx.x == 0) a.train_losses[epoch] = static_cast<T>(epoch_loss / static_cast<double>(a.batches));
    if (a.val_x != nullptr) {
      const double loss = run_rows(a.val_x, a.val_target, a.val_n, nullptr, 0, a.val_n, T(1), false);
      if (threadIdx.x == 0) a.val_losses[epoch] = static_cast<T>(loss / val_divisor);
    }
  }

  // The params and the optimizer state back where the caller keeps them.
  __syncthreads();
  for (int i = 0; i < count; ++i) {
    const int64_t begin = a.stack.params.offset[i], size = a.stack.params.offset[i + 1] - begin;
    for (int64_t e = threadIdx.x; e < size; e += kThreads) {
      a.stack.params.data[i][e] = params[begin + e];
      for (int k = 0; k < lists; ++k) update.state_list(k)[i][e] = state[k * width + begin + e];
    }
  }
}

}  // namespace narrow
}  // namespace cuda
}  // namespace fusedtrain
