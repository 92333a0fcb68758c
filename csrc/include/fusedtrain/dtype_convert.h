// Bit-exact conversions between fp32 and the 16-bit storage formats, written with integer
// operations only so the compiler vectorizes them on every instruction set (and they need nothing
// from c10, which keeps the per-ISA translation units free of external inline functions).
#pragma once

#include <cstdint>
#include <cstring>

#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace convert {

FT_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

FT_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 is the top half of an fp32.
FT_INLINE float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. NaN is kept quiet
// (the carry could otherwise turn a NaN with low payload bits into inf).
FT_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

// IEEE binary16 -> binary32 (exact). Normal halves rebias the exponent (15 -> 127); zero and
// subnormals are m * 2^-24, exact in fp32; inf/NaN keep an all-ones exponent and the payload.
FT_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp_mant = h & 0x7fffu;
  float magnitude;
  if (exp_mant >= 0x7c00u) {
    magnitude = bits_float((exp_mant << 13) | 0x7f800000u);
  } else if (exp_mant < 0x0400u) {
    magnitude = static_cast<float>(exp_mant) * 5.9604644775390625e-08f;  // 2^-24
  } else {
    magnitude = bits_float((exp_mant << 13) + ((127u - 15u) << 23));
  }
  return bits_float(float_bits(magnitude) | sign);
}

// IEEE binary32 -> binary16, round to nearest even, overflow to inf, NaN kept quiet.
FT_INLINE uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7fffffffu;
  const float abs_f = bits_float(abs_bits);
  uint16_t out;
  if (abs_bits > 0x7f800000u) {
    out = 0x7e00u;                                            // NaN
  } else if (abs_bits >= 0x477ff000u) {
    out = 0x7c00u;                                            // rounds to >= 65520: inf
  } else if (abs_bits < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 aligns the value so that the fp32 adder
    // rounds it to a multiple of 2^-24 (the half subnormal step), nearest even, for free.
    out = static_cast<uint16_t>(float_bits(abs_f + 0.5f) - float_bits(0.5f));
  } else {
    const uint32_t mant_odd = (abs_bits >> 13) & 1u;
    out = static_cast<uint16_t>((abs_bits + 0x0fffu + mant_odd - ((127u - 15u) << 23)) >> 13);
  }
  return static_cast<uint16_t>(out | sign);
}

}  // namespace convert
}  // namespace fusedtrain
