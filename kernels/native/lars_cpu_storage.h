// The storage dtypes of the per-leaf CPU loops (lars_cpu_isa.cc, its only
// includer, compiled once per instruction set): bfloat16 and float16 values and
// their conversions to and from float32, loads of each storage type into the
// compute dtype C and rounding stores back (round to nearest even), and the
// compute dtype of each param dtype. Everything here is in the instruction
// set's namespace, LARS_ISA_NS: float16 uses _Float16 where the instruction set
// has it.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef LARS_ISA_NS
#error "LARS_ISA_NS must name the instruction-set namespace"
#endif

namespace lars_native {
namespace LARS_ISA_NS {
namespace {

// bfloat16 and float16 storage. bfloat16 converts by bit manipulation (round to
// nearest even, NaN kept quiet); float16 uses the compiler's _Float16 when it
// has one (F16C/AVX-512 instructions), else a bit-exact software conversion.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float Bits2F(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t F2Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float Bf16ToF32(Bf16 x) { return Bits2F(uint32_t(x.bits) << 16); }
inline Bf16 F32ToBf16(float f) {
  uint32_t u = F2Bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{uint16_t(u >> 16)};
}

#if defined(__FLT16_MAX__)
inline float F16ToF32(F16 x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
inline F16 F32ToF16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  F16 x;
  std::memcpy(&x.bits, &h, 2);
  return x;
}
#else
inline float F16ToF32(F16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1f) return Bits2F(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return Bits2F(sign);
    const float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // 2^-24
    return sign ? -f : f;
  }
  return Bits2F(sign | ((exp + 112u) << 23) | (man << 13));
}
inline F16 F32ToF16(float f) {
  const uint32_t u = F2Bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return F16{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return F16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {  // subnormal half (or zero): round at 2^-24
    const float m = Bits2F(a) * 16777216.0f;  // exact scaling by 2^24
    const float r = __builtin_nearbyintf(m);  // ties to even (default mode)
    return F16{uint16_t(sign | uint16_t(r))};
  }
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return F16{uint16_t(sign | h)};
}
#endif

// Loads a stored value into the compute dtype C, and stores one back.
template <class C>
inline C Ld(float x) {
  return static_cast<C>(x);
}
template <class C>
inline C Ld(double x) {
  return static_cast<C>(x);
}
template <class C>
inline C Ld(Bf16 x) {
  return static_cast<C>(Bf16ToF32(x));
}
template <class C>
inline C Ld(F16 x) {
  return static_cast<C>(F16ToF32(x));
}

template <class S>
struct St;
template <>
struct St<float> {
  static float Do(float c) { return c; }
  static float Do(double c) { return static_cast<float>(c); }
};
template <>
struct St<double> {
  static double Do(double c) { return c; }
};
template <>
struct St<Bf16> {
  static Bf16 Do(float c) { return F32ToBf16(c); }
};
template <>
struct St<F16> {
  static F16 Do(float c) { return F32ToF16(c); }
};

template <class P>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

}  // namespace
}  // namespace LARS_ISA_NS
}  // namespace lars_native
