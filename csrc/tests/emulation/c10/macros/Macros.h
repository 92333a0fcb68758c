// A stand-in for c10's macros on the CPU threads of ../../cuda_runtime.h: a failed device
// assertion stops the process, as it stops a CUDA context.
#pragma once

#include <cstdio>
#include <cstdlib>

#define CUDA_KERNEL_ASSERT(cond)                                   \
  if (!(cond)) {                                                   \
    std::fprintf(stderr, "device assertion failed: %s\n", #cond);  \
    std::abort();                                                  \
  }
