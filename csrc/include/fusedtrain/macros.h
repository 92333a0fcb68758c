// Qualifiers for the per-element math headers, which compile both as host C++ (CPU kernels, the
// C++ math test) and as CUDA device code.
//
// FT_INLINE functions have internal linkage on purpose: the CPU kernels compile these headers once
// per instruction set (AVX-512, AVX2, baseline) in different translation units. An external inline
// function would be emitted as a weak symbol by each of them and the linker would keep one copy,
// possibly the AVX-512 one, which a CPU without AVX-512 would then execute.
#pragma once

#if defined(__CUDACC__)
#define FT_INLINE static __host__ __device__ __forceinline__
#else
#define FT_INLINE static inline __attribute__((always_inline))
#endif
