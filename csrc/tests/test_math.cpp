// Tests the per-element math headers in csrc/include/fusedtrain against references written here
// from the definitions (IEEE 754 formats, the update formulas in the header comments), not from
// the headers' tricks. Needs no torch and no test framework: one line per check, and the exit
// status is 1 if any check failed. Build it with -ffp-contract=off, as the kernels are.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fusedtrain/adam_math.h"
#include "fusedtrain/dtype_convert.h"
#include "fusedtrain/sgd_math.h"

namespace {

using fusedtrain::convert::bf16_to_float;
using fusedtrain::convert::float_to_bf16;
using fusedtrain::convert::float_to_fp16;
using fusedtrain::convert::fp16_to_float;

constexpr uint64_t kSeed = 20240611;
constexpr int kRandomFloats = 4'000'000;
constexpr int kPrintedFailuresPerCheck = 5;

int failed_checks = 0;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buffer[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  return buffer;
}

// One named check over many cases. Prints its first failures as they happen and a summary line
// when it goes out of scope.
class Check {
 public:
  explicit Check(std::string name) : name_(std::move(name)) {}
  Check(const Check&) = delete;
  Check& operator=(const Check&) = delete;
  ~Check() {
    if (failures_ == 0) {
      std::printf("PASS  %s (%ld cases)\n", name_.c_str(), cases_);
    } else {
      std::printf("FAIL  %s (%ld of %ld cases failed)\n", name_.c_str(), failures_, cases_);
      ++failed_checks;
    }
    std::fflush(stdout);
  }

  // `describe` runs only for failures, so passing cases cost no formatting.
  template <typename Describe>
  void expect(bool ok, Describe describe) {
    ++cases_;
    if (ok) return;
    if (failures_++ < kPrintedFailuresPerCheck) {
      std::printf("      %s: %s\n", name_.c_str(), describe().c_str());
    }
  }

 private:
  std::string name_;
  long cases_ = 0;
  long failures_ = 0;
};

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

class Random {
 public:
  explicit Random(uint64_t seed) : engine_(seed) {}

  uint32_t bits32() { return static_cast<uint32_t>(engine_() >> 32); }

  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(engine_); }

  bool one_in(int n) { return std::uniform_int_distribution<int>(0, n - 1)(engine_) == 0; }

  // Magnitudes log-uniform over [10^min_exp10, 10^max_exp10], random sign unless non_negative,
  // and now and then exactly zero, since zero moments are the first step's state.
  double spread(double min_exp10, double max_exp10, bool non_negative = false) {
    if (one_in(16)) return 0.0;
    const double magnitude = std::pow(10.0, uniform(min_exp10, max_exp10));
    return non_negative || one_in(2) ? magnitude : -magnitude;
  }

 private:
  std::mt19937_64 engine_;
};

// ---------------------------------------------------------------------------------------------
// 16-bit formats

// A binary interchange format decoded by its definition: binary16 is (5, 10), bfloat16 (8, 7).
double decode_binary(uint32_t bits, int exponent_bits, int mantissa_bits) {
  const uint32_t mantissa = bits & ((1u << mantissa_bits) - 1);
  const uint32_t exponent = (bits >> mantissa_bits) & ((1u << exponent_bits) - 1);
  const bool negative = (bits >> (mantissa_bits + exponent_bits)) & 1u;
  const int bias = (1 << (exponent_bits - 1)) - 1;
  double magnitude;
  if (exponent == (1u << exponent_bits) - 1) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, 1 - bias - mantissa_bits);
  } else {
    magnitude = std::ldexp(mantissa | (1u << mantissa_bits),
                           static_cast<int>(exponent) - bias - mantissa_bits);
  }
  return negative ? -magnitude : magnitude;
}

// The fp32 a 16-bit pattern widens to: its value, or for NaN the same sign and payload (the
// headers keep payloads, as c10's conversions do).
uint32_t widened_bits(uint16_t h, int exponent_bits, int mantissa_bits) {
  const double value = decode_binary(h, exponent_bits, mantissa_bits);
  if (!std::isnan(value)) return bits_of(static_cast<float>(value));
  const uint32_t sign = static_cast<uint32_t>(h >> (exponent_bits + mantissa_bits)) << 31;
  const uint32_t payload = (h & ((1u << mantissa_bits) - 1)) << (23 - mantissa_bits);
  return sign | 0x7f800000u | payload;
}

bool is_fp16_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0; }
bool is_bf16_nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x007fu) != 0; }

// binary32 -> binary16 by the definition of round to nearest even: scale |x| so that the binary16
// step at its exponent is 1, round to an integer (the default rounding mode breaks ties to even),
// scale back; anything that rounds above the largest finite half overflows to inf.
uint16_t reference_float_to_fp16(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  if (std::isnan(x)) return sign | 0x7e00u;
  if (std::isinf(x)) return sign | 0x7c00u;
  const double magnitude = std::fabs(static_cast<double>(x));
  if (magnitude == 0.0) return sign;
  int exponent;  // magnitude is in [2^(exponent-1), 2^exponent)
  std::frexp(magnitude, &exponent);
  const int step_exponent = std::max(exponent - 1, -14) - 10;
  const double steps = std::nearbyint(std::ldexp(magnitude, -step_exponent));
  const double rounded = std::ldexp(steps, step_exponent);
  if (rounded > 65504.0) return sign | 0x7c00u;
  if (rounded < 0x1p-14) return sign | static_cast<uint16_t>(std::ldexp(rounded, 24));
  std::frexp(rounded, &exponent);
  const int unbiased = exponent - 1;
  const auto mantissa = static_cast<uint16_t>(std::ldexp(rounded, 10 - unbiased) - 1024.0);
  return sign | static_cast<uint16_t>((unbiased + 15) << 10) | mantissa;
}

// binary32 -> bfloat16 by the rounding rule on the 16 dropped bits; a carry out of the kept
// mantissa correctly bumps the exponent (up to inf).
uint16_t reference_float_to_bf16(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t kept = u >> 16;
  const uint32_t dropped = u & 0xffffu;
  const bool round_up = dropped > 0x8000u || (dropped == 0x8000u && (kept & 1u));
  return static_cast<uint16_t>(kept + (round_up ? 1u : 0u));
}

#if defined(__x86_64__)
bool cpu_has_f16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") != 0;
  }();
  return has;
}

__attribute__((target("f16c"))) float f16c_fp16_to_float(uint16_t h) { return _cvtsh_ss(h); }

__attribute__((target("f16c"))) uint16_t f16c_float_to_fp16(float x) {
  return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
}
#endif

// The hardware conversions, a second reference where the CPU has them.
std::optional<float> hardware_fp16_to_float(uint16_t h) {
#if defined(__x86_64__)
  if (cpu_has_f16c()) return f16c_fp16_to_float(h);
#endif
  (void)h;
  return std::nullopt;
}

std::optional<uint16_t> hardware_float_to_fp16(float x) {
#if defined(__x86_64__)
  if (cpu_has_f16c()) return f16c_float_to_fp16(x);
#endif
  (void)x;
  return std::nullopt;
}

void check_fp16_to_float() {
  {
    Check check("fp16_to_float: all 65536 patterns vs ldexp decode (NaN: same sign and payload)");
    for (uint32_t h = 0; h <= 0xffffu; ++h) {
      const uint32_t got = bits_of(fp16_to_float(static_cast<uint16_t>(h)));
      const uint32_t expected = widened_bits(static_cast<uint16_t>(h), 5, 10);
      check.expect(got == expected, [&] {
        return format("h=0x%04x: got 0x%08x, expected 0x%08x", h, got, expected);
      });
    }
  }
  if (!hardware_fp16_to_float(0)) {
    std::printf("SKIP  fp16_to_float vs F16C: the CPU has no F16C\n");
    return;
  }
  Check hardware("fp16_to_float: all 65536 patterns vs F16C _cvtsh_ss (NaN: any NaN)");
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const float got = fp16_to_float(static_cast<uint16_t>(h));
    const float expected = *hardware_fp16_to_float(static_cast<uint16_t>(h));
    const bool ok = std::isnan(expected) ? std::isnan(got) : bits_of(got) == bits_of(expected);
    hardware.expect(ok, [&] {
      return format("h=0x%04x: got 0x%08x, F16C 0x%08x", h, bits_of(got), bits_of(expected));
    });
  }
}

// A case passes when the header matches the slow reference and, where present, F16C; NaN only
// has to stay NaN.
void expect_float_to_fp16(Check& check, float x) {
  const uint16_t got = float_to_fp16(x);
  if (std::isnan(x)) {
    check.expect(is_fp16_nan(got), [&] {
      return format("x=0x%08x (NaN): got 0x%04x, not a NaN", bits_of(x), got);
    });
    return;
  }
  const uint16_t expected = reference_float_to_fp16(x);
  const std::optional<uint16_t> hardware = hardware_float_to_fp16(x);
  check.expect(got == expected && (!hardware || *hardware == expected), [&] {
    return format("x=0x%08x (%.9g): got 0x%04x, reference 0x%04x, F16C %s", bits_of(x), x, got,
                  expected, hardware ? format("0x%04x", *hardware).c_str() : "n/a");
  });
}

void check_float_to_fp16(Random& random) {
  {
    // Pinned answers, so that the references themselves are checked too.
    const float inf = std::numeric_limits<float>::infinity();
    const std::pair<float, uint16_t> known[] = {
        {0.0f, 0x0000},     {-0.0f, 0x8000},          {1.0f, 0x3c00},
        {-2.0f, 0xc000},    {1.0f + 0x1p-11f, 0x3c00}, {1.0f + 0x3p-11f, 0x3c02},
        {65504.0f, 0x7bff}, {65519.99f, 0x7bff},      {65520.0f, 0x7c00},
        {-65520.0f, 0xfc00}, {inf, 0x7c00},           {-inf, 0xfc00},
        {0x1p-14f, 0x0400}, {0x1p-24f, 0x0001},       {0x1p-25f, 0x0000},
        {0x1.0p-25f + 0x1p-40f, 0x0001}, {0x3p-25f, 0x0002}, {0x1p-30f, 0x0000},
        {std::nextafter(0x1p-14f, 0.0f), 0x0400},
    };
    Check check("float_to_fp16: known values");
    for (const auto& [x, expected] : known) {
      const uint16_t got = float_to_fp16(x);
      check.expect(got == expected, [&] {
        return format("x=0x%08x (%.9g): got 0x%04x, expected 0x%04x", bits_of(x), x, got,
                      expected);
      });
      expect_float_to_fp16(check, x);
    }
    for (const uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7f801fffu, 0x7fffffffu, 0xff800001u,
                               0xffc00000u, 0xffffffffu}) {
      expect_float_to_fp16(check, float_of(nan));
    }
  }
  {
    Check check("float_to_fp16: every fp16 value round-trips");
    for (uint32_t h = 0; h <= 0xffffu; ++h) {
      const float x = float_of(widened_bits(static_cast<uint16_t>(h), 5, 10));
      expect_float_to_fp16(check, x);
      if (!std::isnan(x)) {
        const uint16_t got = float_to_fp16(x);
        check.expect(got == h, [&] { return format("h=0x%04x: came back as 0x%04x", h, got); });
      }
    }
  }
  {
    // Midpoints need one bit more than fp16 has, so they are exact floats.
    Check check("float_to_fp16: midpoints of adjacent fp16 values (ties to even) and neighbours");
    for (uint32_t h = 0; h < 0x7bffu; ++h) {
      const double mid = (decode_binary(h, 5, 10) + decode_binary(h + 1, 5, 10)) / 2;
      const float x = static_cast<float>(mid);
      for (const float y : {x, std::nextafter(x, 0.0f), std::nextafter(x, 1e30f)}) {
        expect_float_to_fp16(check, y);
        expect_float_to_fp16(check, -y);
      }
      const uint16_t even = (h & 1u) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h);
      const uint16_t got = float_to_fp16(x);
      check.expect(got == even, [&] {
        return format("midpoint of 0x%04x and 0x%04x: got 0x%04x", h, h + 1, got);
      });
    }
  }
  {
    Check check("float_to_fp16: around overflow");
    for (const float x : {65504.0f, 65519.99f, 65520.0f, 65536.0f, 1e5f,
                          std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity()}) {
      for (const float y : {x, std::nextafter(x, 0.0f), std::nextafter(x, 1e30f)}) {
        expect_float_to_fp16(check, y);
        expect_float_to_fp16(check, -y);
      }
    }
  }
  {
    Check check("float_to_fp16: random floats below 2^-14 (fp16 subnormals, underflow)");
    for (int i = 0; i < kRandomFloats / 4; ++i) {
      const uint32_t magnitude = random.bits32() % 0x38800000u;
      expect_float_to_fp16(check, float_of(magnitude | (random.bits32() & 0x80000000u)));
    }
  }
  {
    Check check("float_to_fp16: random float bit patterns");
    for (int i = 0; i < kRandomFloats; ++i) expect_float_to_fp16(check, float_of(random.bits32()));
  }
}

void check_bf16_to_float() {
  Check check("bf16_to_float: all 65536 patterns (value by ldexp decode, bits = h << 16)");
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const uint32_t got = bits_of(bf16_to_float(static_cast<uint16_t>(h)));
    const uint32_t expected = widened_bits(static_cast<uint16_t>(h), 8, 7);
    check.expect(got == expected && got == h << 16, [&] {
      return format("h=0x%04x: got 0x%08x, expected 0x%08x", h, got, expected);
    });
  }
}

void expect_float_to_bf16(Check& check, float x) {
  const uint16_t got = float_to_bf16(x);
  if (std::isnan(x)) {
    check.expect(is_bf16_nan(got), [&] {
      return format("x=0x%08x (NaN): got 0x%04x, not a NaN", bits_of(x), got);
    });
    return;
  }
  const uint16_t expected = reference_float_to_bf16(x);
  check.expect(got == expected, [&] {
    return format("x=0x%08x (%.9g): got 0x%04x, expected 0x%04x", bits_of(x), x, got, expected);
  });
}

void check_float_to_bf16(Random& random) {
  {
    Check check("float_to_bf16: every bf16 value, midpoint and midpoint neighbour");
    for (uint32_t h = 0; h <= 0xffffu; ++h) {
      for (const uint32_t low : {0x0000u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
        expect_float_to_bf16(check, float_of(h << 16 | low));
      }
    }
  }
  {
    // A NaN whose payload lies only in the dropped bits must not become inf.
    Check check("float_to_bf16: overflow and NaN payloads");
    const std::pair<uint32_t, uint16_t> known[] = {
        {0x7f7f7fffu, 0x7f7f}, {0x7f7f8000u, 0x7f80}, {0x7f7fffffu, 0x7f80},
        {0xff7fffffu, 0xff80}, {0x7f800000u, 0x7f80}, {0x3f808000u, 0x3f80},
        {0x3f818000u, 0x3f82},
    };
    for (const auto& [bits, expected] : known) {
      const uint16_t got = float_to_bf16(float_of(bits));
      check.expect(got == expected, [&] {
        return format("x=0x%08x: got 0x%04x, expected 0x%04x", bits, got, expected);
      });
    }
    for (const uint32_t nan : {0x7f800001u, 0x7f80ffffu, 0x7fc00000u, 0x7fffffffu, 0xff800001u,
                               0xffffffffu}) {
      expect_float_to_bf16(check, float_of(nan));
    }
  }
  {
    Check check("float_to_bf16: random float bit patterns");
    for (int i = 0; i < kRandomFloats; ++i) expect_float_to_bf16(check, float_of(random.bits32()));
  }
}

// ---------------------------------------------------------------------------------------------
// Optimizer updates

// Within tolerance of the reference; NaN only matches NaN.
bool close(double got, double expected, double tolerance) {
  if (std::isnan(expected) || std::isnan(got)) return std::isnan(expected) && std::isnan(got);
  return std::fabs(got - expected) <= tolerance;
}

// Rounding error allowed, relative to the magnitudes the result was computed from: ~16 float ulps,
// ~90 double ulps.
template <typename T>
constexpr double kRelativeTolerance = std::is_same_v<T, float> ? 1e-6 : 1e-14;

template <typename T>
constexpr const char* kTypeName = std::is_same_v<T, float> ? "float" : "double";

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad, maximize;
  double step;
};

struct AdamState {
  double param, exp_avg, exp_avg_sq, max_exp_avg_sq;
};

// The update as the header comment defines it, in double, with the sums of absolute values of
// the terms each result is computed from: rounding error in T is bounded relative to those
// (the result itself can be near 0 by cancellation).
struct AdamReference {
  AdamState state;
  double param_scale, exp_avg_scale, exp_avg_sq_scale;
};

AdamReference reference_adam(const AdamHyper& h, AdamState s, double grad) {
  double g = h.maximize ? -grad : grad;
  double g_scale = std::fabs(g);
  if (h.decoupled) {
    s.param *= 1 - h.lr * h.weight_decay;
  } else {
    g += h.weight_decay * s.param;
    g_scale += std::fabs(h.weight_decay * s.param);
  }
  const double exp_avg_scale = std::fabs(h.beta1 * s.exp_avg) + (1 - h.beta1) * g_scale;
  const double exp_avg_sq_scale = h.beta2 * s.exp_avg_sq + (1 - h.beta2) * g_scale * g_scale;
  s.exp_avg = h.beta1 * s.exp_avg + (1 - h.beta1) * g;
  s.exp_avg_sq = h.beta2 * s.exp_avg_sq + (1 - h.beta2) * g * g;
  double v_hat = s.exp_avg_sq;
  if (h.amsgrad) {
    s.max_exp_avg_sq = std::max(s.max_exp_avg_sq, s.exp_avg_sq);
    v_hat = s.max_exp_avg_sq;
  }
  const double step_size = h.lr / (1 - std::pow(h.beta1, h.step));
  const double denom = std::sqrt(v_hat) / std::sqrt(1 - std::pow(h.beta2, h.step)) + h.eps;
  const double update = step_size * s.exp_avg / denom;
  // Error in g reaches v_hat through g*g; when g cancels that error is large relative to v_hat,
  // and through sqrt(v_hat) it is at most half as large relative to the update.
  const double v_hat_sensitivity =
      v_hat > 0 ? (1 - h.beta2) * std::fabs(g) * g_scale / v_hat : 0.0;
  const double param_scale = std::fabs(s.param) + step_size * exp_avg_scale / denom +
                             std::fabs(update) * (1 + v_hat_sensitivity);
  s.param -= update;
  return {s, param_scale, exp_avg_scale, exp_avg_sq_scale};
}

template <typename T>
void run_adam_element(bool amsgrad, bool coupled_decay, T& param, T grad, T& exp_avg,
                      T& exp_avg_sq, T& max_exp_avg_sq,
                      const fusedtrain::math::AdamCoeffs<T>& c) {
  using fusedtrain::math::adam_element;
  if (amsgrad && coupled_decay) {
    adam_element<true, true>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c);
  } else if (amsgrad) {
    adam_element<true, false>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c);
  } else if (coupled_decay) {
    adam_element<false, true>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c);
  } else {
    adam_element<false, false>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c);
  }
}

// Runs the header's Adam step on one element of type T; the kernels' rule for the decay flag.
template <typename T>
AdamState header_adam(const AdamHyper& h, const AdamState& s, T grad) {
  const auto c = fusedtrain::math::make_adam_coeffs<T>(h.lr, h.beta1, h.beta2, h.eps,
                                                       h.weight_decay, h.decoupled, h.maximize,
                                                       h.step);
  T param = static_cast<T>(s.param);
  T exp_avg = static_cast<T>(s.exp_avg);
  T exp_avg_sq = static_cast<T>(s.exp_avg_sq);
  T max_exp_avg_sq = static_cast<T>(s.max_exp_avg_sq);
  run_adam_element<T>(h.amsgrad, h.weight_decay != 0 && !h.decoupled, param, grad, exp_avg,
                      exp_avg_sq, max_exp_avg_sq, c);
  return {param, exp_avg, exp_avg_sq, max_exp_avg_sq};
}

std::string describe_adam(const AdamHyper& h, const AdamState& s, double grad) {
  return format(
      "lr=%g b1=%g b2=%g eps=%g wd=%g decoupled=%d amsgrad=%d maximize=%d step=%g | p=%.17g "
      "g=%.17g m=%.17g v=%.17g vmax=%.17g",
      h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled, h.amsgrad, h.maximize, h.step,
      s.param, grad, s.exp_avg, s.exp_avg_sq, s.max_exp_avg_sq);
}

template <typename T>
void check_adam_grid(Random& random) {
  Check check(format("adam_element<%s>: hyperparameter grid x random values vs double reference",
                     kTypeName<T>));
  const double rtol = kRelativeTolerance<T>;
  for (const double lr : {1e-3, 0.5})
  for (const double beta1 : {0.9, 0.5, 0.3, 0.0})  // lerp switches formula at weight 0.5
  for (const double beta2 : {0.999, 0.5})
  for (const double eps : {1e-8, 1e-3})
  for (const double weight_decay : {0.0, 1e-2})
  for (const bool decoupled : {false, true})
  for (const bool amsgrad : {false, true})
  for (const bool maximize : {false, true})
  for (const double step : {1.0, 3.0, 1000.0}) {
    const AdamHyper h{lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, step};
    for (int i = 0; i < 100; ++i) {
      // Inputs are drawn in double and rounded to T, so both sides start from the same values.
      const AdamState start{static_cast<T>(random.spread(-4, 2)),
                            static_cast<T>(random.spread(-4, 2)),
                            static_cast<T>(random.spread(-8, 4, true)),
                            static_cast<T>(random.spread(-8, 4, true))};
      const T grad = static_cast<T>(random.spread(-4, 2));
      const AdamReference ref = reference_adam(h, start, grad);
      const AdamState got = header_adam<T>(h, start, grad);
      const double max_scale = std::max(ref.exp_avg_sq_scale, start.max_exp_avg_sq);
      const bool ok =
          close(got.param, ref.state.param, rtol * ref.param_scale) &&
          close(got.exp_avg, ref.state.exp_avg, rtol * ref.exp_avg_scale) &&
          close(got.exp_avg_sq, ref.state.exp_avg_sq, rtol * ref.exp_avg_sq_scale) &&
          (amsgrad ? close(got.max_exp_avg_sq, ref.state.max_exp_avg_sq, rtol * max_scale)
                   : got.max_exp_avg_sq == start.max_exp_avg_sq);
      check.expect(ok, [&] {
        return describe_adam(h, start, grad) +
               format(" | got p=%.17g m=%.17g v=%.17g vmax=%.17g, expected p=%.17g m=%.17g "
                      "v=%.17g vmax=%.17g",
                      got.param, got.exp_avg, got.exp_avg_sq, got.max_exp_avg_sq,
                      ref.state.param, ref.state.exp_avg, ref.state.exp_avg_sq,
                      ref.state.max_exp_avg_sq);
      });
    }
  }
}

template <typename T>
void check_adam_special_values() {
  using fusedtrain::math::nan_max;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  {
    Check check(format("nan_max<%s>: NaN from either side wins, else the larger", kTypeName<T>));
    const std::pair<T, T> nan_cases[] = {{nan, 1}, {1, nan}, {nan, nan}, {nan, -inf}, {inf, nan}};
    for (const auto& [a, b] : nan_cases) {
      check.expect(std::isnan(nan_max(a, b)),
                   [&] { return format("nan_max(%g, %g) = %g", double(a), double(b),
                                       double(nan_max(a, b))); });
    }
    const T ordered_cases[][3] = {{1, 2, 2}, {2, 1, 2}, {-inf, 1, 1}, {3, inf, inf}, {0, 0, 0}};
    for (const auto& [a, b, expected] : ordered_cases) {
      check.expect(nan_max(a, b) == expected,
                   [&] { return format("nan_max(%g, %g) = %g", double(a), double(b),
                                       double(nan_max(a, b))); });
    }
  }
  Check check(format("adam_element<%s>: NaN and inf propagation", kTypeName<T>));
  for (const bool amsgrad : {false, true})
  for (const bool decoupled : {false, true})
  for (const bool maximize : {false, true}) {
    const AdamHyper h{1e-3, 0.9, 0.999, 1e-8, 1e-2, decoupled, amsgrad, maximize, 5.0};
    const AdamState start{0.5, 0.01, 1e-4, 2e-4};
    // NaN and inf gradients both poison the moments and the parameter (inf / inf in the step),
    // as in torch.optim.Adam; amsgrad's max keeps the NaN.
    for (const T grad : {nan, inf, -inf}) {
      const AdamState got = header_adam<T>(h, start, grad);
      const bool ok = std::isnan(got.param) &&
                      (std::isnan(grad) ? std::isnan(got.exp_avg) && std::isnan(got.exp_avg_sq)
                                        : std::isinf(got.exp_avg) && std::isinf(got.exp_avg_sq)) &&
                      (!amsgrad || std::isnan(got.max_exp_avg_sq) == std::isnan(grad));
      check.expect(ok, [&] {
        return describe_adam(h, start, grad) + format(" | got p=%g m=%g v=%g vmax=%g",
                                                      got.param, got.exp_avg, got.exp_avg_sq,
                                                      got.max_exp_avg_sq);
      });
    }
    if (amsgrad) {
      // A NaN already in max_exp_avg_sq stays there and reaches the parameter.
      const AdamState poisoned{0.5, 0.01, 1e-4, nan};
      const AdamState got = header_adam<T>(h, poisoned, T(0.1));
      check.expect(std::isnan(got.max_exp_avg_sq) && std::isnan(got.param), [&] {
        return describe_adam(h, poisoned, 0.1) +
               format(" | got p=%g vmax=%g", got.param, got.max_exp_avg_sq);
      });
    }
  }
  {
    // Without the coupled-decay flag an inf parameter must not leak into the moments through
    // 0 * inf, and it stays inf itself.
    const AdamHyper h{1e-3, 0.9, 0.999, 1e-8, 0.0, false, false, false, 5.0};
    const AdamState start{inf, 0.01, 1e-4, 0.0};
    const AdamState got = header_adam<T>(h, start, T(0.1));
    check.expect(std::isfinite(got.exp_avg) && std::isfinite(got.exp_avg_sq) &&
                     got.param == inf,
                 [&] {
                   return describe_adam(h, start, 0.1) +
                          format(" | got p=%g m=%g v=%g", got.param, got.exp_avg, got.exp_avg_sq);
                 });
  }
}

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool maximize;
};

template <int kFlags>
struct SgdVariant {
  static constexpr bool kDecay = kFlags & 1;
  static constexpr bool kMomentum = kFlags & 2;
  static constexpr bool kFirstStep = kFlags & 4;
  static constexpr bool kNesterov = kFlags & 8;
};

template <typename T, int kFlags>
void check_sgd_variant(Random& random) {
  using V = SgdVariant<kFlags>;
  Check check(format("sgd_element<%s, decay=%d momentum=%d first_step=%d nesterov=%d> vs double "
                     "reference",
                     kTypeName<T>, V::kDecay, V::kMomentum, V::kFirstStep, V::kNesterov));
  const double rtol = kRelativeTolerance<T>;
  for (const double lr : {1e-2, 0.5})
  for (const double momentum : {0.9, 0.3})
  for (const double dampening : {0.0, 0.1})
  for (const double weight_decay : {1e-4, 0.1})
  for (const bool maximize : {false, true}) {
    const SgdHyper h{lr, momentum, dampening, weight_decay, maximize};
    const auto c = fusedtrain::math::make_sgd_coeffs<T>(lr, momentum, dampening, weight_decay,
                                                        maximize);
    for (int i = 0; i < 500; ++i) {
      const T param = static_cast<T>(random.spread(-4, 2));
      const T grad = static_cast<T>(random.spread(-4, 2));
      const T buffer = static_cast<T>(random.spread(-4, 2));

      // The reference, from the header comment, with the sums of absolute values of the terms.
      double g = maximize ? -double(grad) : double(grad);
      double g_scale = std::fabs(g);
      if (V::kDecay) {
        g += weight_decay * param;
        g_scale += std::fabs(weight_decay * param);
      }
      double expected_buffer = buffer;
      double buffer_scale = 0;
      if (V::kMomentum) {
        if (V::kFirstStep) {
          expected_buffer = g;
          buffer_scale = g_scale;
        } else {
          expected_buffer = momentum * buffer + (1 - dampening) * g;
          buffer_scale = std::fabs(momentum * buffer) + (1 - dampening) * g_scale;
        }
        if (V::kNesterov) {
          g += momentum * expected_buffer;
          g_scale += momentum * buffer_scale;
        } else {
          g = expected_buffer;
          g_scale = buffer_scale;
        }
      }
      const double expected_param = param - lr * g;
      const double param_scale = std::fabs(double(param)) + lr * g_scale;

      T got_param = param;
      T got_buffer = buffer;
      fusedtrain::math::sgd_element<V::kDecay, V::kMomentum, V::kFirstStep, V::kNesterov>(
          got_param, grad, got_buffer, c);
      const bool ok = close(got_param, expected_param, rtol * param_scale) &&
                      (V::kMomentum ? close(got_buffer, expected_buffer, rtol * buffer_scale)
                                    : got_buffer == buffer);
      check.expect(ok, [&] {
        return format("lr=%g momentum=%g dampening=%g wd=%g maximize=%d | p=%.17g g=%.17g "
                      "buf=%.17g | got p=%.17g buf=%.17g, expected p=%.17g buf=%.17g",
                      h.lr, h.momentum, h.dampening, h.weight_decay, h.maximize, double(param),
                      double(grad), double(buffer), double(got_param), double(got_buffer),
                      expected_param, expected_buffer);
      });
    }
  }
}

template <typename T, int... kFlags>
void check_sgd_variants(Random& random, std::integer_sequence<int, kFlags...>) {
  (check_sgd_variant<T, kFlags>(random), ...);
}

}  // namespace

int main() {
  std::printf("test_math: seed %llu, F16C reference %s\n", static_cast<unsigned long long>(kSeed),
              hardware_float_to_fp16(0.0f) ? "in use" : "unavailable");
  Random random(kSeed);
  check_fp16_to_float();
  check_float_to_fp16(random);
  check_bf16_to_float();
  check_float_to_bf16(random);
  check_adam_grid<float>(random);
  check_adam_grid<double>(random);
  check_adam_special_values<float>();
  check_adam_special_values<double>();
  check_sgd_variants<float>(random, std::make_integer_sequence<int, 16>());
  check_sgd_variants<double>(random, std::make_integer_sequence<int, 16>());
  if (failed_checks != 0) {
    std::printf("%d check(s) failed\n", failed_checks);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
