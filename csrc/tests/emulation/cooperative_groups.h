// A stand-in for <cooperative_groups.h> on the CPU threads of cuda_runtime.h: the grid barrier.
#pragma once

#include "cuda_runtime.h"

namespace cooperative_groups {

struct grid_group {
  void sync() const { cuda_emulation::grid_barrier->arrive_and_wait(); }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
