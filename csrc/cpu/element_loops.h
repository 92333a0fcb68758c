// The element loops of the CPU kernels, compiled once per instruction set.
//
// Each isa_*.cpp defines FT_ISA_NAMESPACE, switches the compiler's target and includes this file,
// so the loops below become AVX-512, AVX2 or baseline code; the namespace keeps the three copies
// apart for the linker. The loops are plain: load, convert to the compute type, call the shared
// element math, convert back, store. They are written so that the compiler vectorizes them
// (restrict pointers, no calls, branch-free conversions, compile-time flags); -ffp-contract=off
// keeps every instruction set bit-identical to the baseline, which the tests check.
#ifndef FT_ISA_NAMESPACE
#error "define FT_ISA_NAMESPACE before including element_loops.h"
#endif

namespace fusedtrain {
namespace cpu {
namespace FT_ISA_NAMESPACE {

// Loading and storing one element in each storage format.
struct Float32Format {
  using storage_t = float;
  using compute_t = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
struct Float64Format {
  using storage_t = double;
  using compute_t = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};
struct BFloat16Format {
  using storage_t = uint16_t;
  using compute_t = float;
  static float load(uint16_t x) { return convert::bf16_to_float(x); }
  static uint16_t store(float x) { return convert::float_to_bf16(x); }
};
struct Float16Format {
  using storage_t = uint16_t;
  using compute_t = float;
  static float load(uint16_t x) { return convert::fp16_to_float(x); }
  static uint16_t store(float x) { return convert::float_to_fp16(x); }
};

template <typename T>
const math::AdamCoeffs<T>& coeffs_for(const AdamTensor& t);
template <>
const math::AdamCoeffs<float>& coeffs_for<float>(const AdamTensor& t) { return t.coeffs_f32; }
template <>
const math::AdamCoeffs<double>& coeffs_for<double>(const AdamTensor& t) { return t.coeffs_f64; }

template <typename T>
const math::SgdCoeffs<T>& coeffs_for(const SgdOptions& o);
template <>
const math::SgdCoeffs<float>& coeffs_for<float>(const SgdOptions& o) { return o.coeffs_f32; }
template <>
const math::SgdCoeffs<double>& coeffs_for<double>(const SgdOptions& o) { return o.coeffs_f64; }

// Turns runtime flags into template arguments: f(std::true_type{}) or f(std::false_type{}).
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
void with_format(Storage storage, F&& f) {
  switch (storage) {
    case Storage::kFloat32: f(Float32Format{}); break;
    case Storage::kFloat64: f(Float64Format{}); break;
    case Storage::kBFloat16: f(BFloat16Format{}); break;
    case Storage::kFloat16: f(Float16Format{}); break;
  }
}

template <typename Fmt, bool kAmsgrad, bool kCoupledDecay, bool kUnscaleGrad>
void adam_loop(const AdamTensor& t, typename Fmt::compute_t grad_scale, int64_t begin,
               int64_t end) {
  using S = typename Fmt::storage_t;
  using T = typename Fmt::compute_t;
  S* __restrict__ param = static_cast<S*>(t.param);
  S* __restrict__ grad = static_cast<S*>(t.grad);
  S* __restrict__ exp_avg = static_cast<S*>(t.exp_avg);
  S* __restrict__ exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
  S* __restrict__ max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq);
  const math::AdamCoeffs<T> c = coeffs_for<T>(t);
  for (int64_t i = begin; i < end; ++i) {
    T p = Fmt::load(param[i]);
    T m = Fmt::load(exp_avg[i]);
    T v = Fmt::load(exp_avg_sq[i]);
    T v_max = kAmsgrad ? Fmt::load(max_exp_avg_sq[i]) : T(0);
    const T g = kUnscaleGrad ? Fmt::load(grad[i]) / grad_scale : Fmt::load(grad[i]);
    math::adam_element<kAmsgrad, kCoupledDecay>(p, g, m, v, v_max, c);
    param[i] = Fmt::store(p);
    exp_avg[i] = Fmt::store(m);
    exp_avg_sq[i] = Fmt::store(v);
    if (kAmsgrad) max_exp_avg_sq[i] = Fmt::store(v_max);
    if (kUnscaleGrad) grad[i] = Fmt::store(g);
  }
}

void adam_range(const AdamOptions& o, const AdamTensor& t, int64_t begin, int64_t end) {
  with_format(t.storage, [&](auto fmt) {
    using Fmt = decltype(fmt);
    using T = typename Fmt::compute_t;
    with_flag(o.amsgrad, [&](auto amsgrad) {
      with_flag(o.coupled_decay, [&](auto coupled) {
        with_flag(o.has_grad_scale, [&](auto unscale_grad) {
          adam_loop<Fmt, decltype(amsgrad)::value, decltype(coupled)::value,
                    decltype(unscale_grad)::value>(t, static_cast<T>(o.grad_scale), begin, end);
        });
      });
    });
  });
}

template <typename Fmt, bool kDecay, bool kMomentum, bool kFirstStep, bool kNesterov,
          bool kUnscaleGrad>
void sgd_loop(const SgdOptions& o, const SgdTensor& t, int64_t begin, int64_t end) {
  using S = typename Fmt::storage_t;
  using T = typename Fmt::compute_t;
  S* __restrict__ param = static_cast<S*>(t.param);
  S* __restrict__ grad = static_cast<S*>(t.grad);
  S* __restrict__ momentum_buffer = static_cast<S*>(t.momentum_buffer);
  const math::SgdCoeffs<T> c = coeffs_for<T>(o);
  const T grad_scale = static_cast<T>(o.grad_scale);
  for (int64_t i = begin; i < end; ++i) {
    T p = Fmt::load(param[i]);
    T b = (kMomentum && !kFirstStep) ? Fmt::load(momentum_buffer[i]) : T(0);
    const T g = kUnscaleGrad ? Fmt::load(grad[i]) / grad_scale : Fmt::load(grad[i]);
    math::sgd_element<kDecay, kMomentum, kFirstStep, kNesterov>(p, g, b, c);
    param[i] = Fmt::store(p);
    if (kMomentum) momentum_buffer[i] = Fmt::store(b);
    if (kUnscaleGrad) grad[i] = Fmt::store(g);
  }
}

void sgd_range(const SgdOptions& o, const SgdTensor& t, int64_t begin, int64_t end) {
  with_format(t.storage, [&](auto fmt) {
    using Fmt = decltype(fmt);
    with_flag(o.weight_decay, [&](auto decay) {
      with_flag(o.has_grad_scale, [&](auto unscale_grad) {
        constexpr bool kDecay = decltype(decay)::value;
        constexpr bool kUnscale = decltype(unscale_grad)::value;
        if (!o.momentum) {
          sgd_loop<Fmt, kDecay, false, false, false, kUnscale>(o, t, begin, end);
          return;
        }
        with_flag(o.first_step, [&](auto first) {
          with_flag(o.nesterov, [&](auto nesterov) {
            sgd_loop<Fmt, kDecay, true, decltype(first)::value, decltype(nesterov)::value,
                     kUnscale>(o, t, begin, end);
          });
        });
      });
    });
  });
}

}  // namespace FT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedtrain
