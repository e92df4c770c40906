// The per-leaf CPU loops, compiled once per instruction set: CMake builds this
// file with -DLARS_ISA_NS=isa_base (no extra flags), isa_avx2 (-mavx2 -mf16c)
// and isa_avx512 (-mavx512f -mavx512bw -mavx512dq -mavx512vl -mf16c), always
// with -ffp-contract=off so that every variant rounds like the reference.
//
// Sums are accumulated in float64 in kLanes independent lanes (element i of a
// range goes to lane (i - begin) % kLanes), then the lanes are added in a fixed
// tree: the result depends only on the range, never on the instruction set or
// the number of threads.
#include <cstdint>
#include <cstring>

#include "lars_cpu_kernels.h"

#ifndef LARS_ISA_NS
#error "LARS_ISA_NS must name the instruction-set namespace"
#endif

#if defined(__clang__)
#define LARS_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define LARS_IVDEP _Pragma("GCC ivdep")
#else
#define LARS_IVDEP
#endif

namespace lars_native {
namespace LARS_ISA_NS {
namespace {

constexpr int kLanes = 16;

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

// The effective gradient: global-norm clipping (when it triggers), value
// clipping, coupled weight decay, in the reference's order and rounding.
template <class C, bool CN, bool CV, bool WD>
struct Eff {
  C norm, clip_norm, clip_value, wd;
  Eff(const Hyper& h, const StepScalars& s)
      : norm(static_cast<C>(s.global_norm)),
        clip_norm(static_cast<C>(h.grad_clip_norm)),
        clip_value(static_cast<C>(h.grad_clip_value)),
        wd(static_cast<C>(h.weight_decay)) {}
  inline C operator()(C g, C w) const {
    if (CN) g = (g / norm) * clip_norm;
    if (CV) {
      g = g < -clip_value ? -clip_value : g;
      g = g > clip_value ? clip_value : g;
    }
    if (WD) g = g + wd * w;
    return g;
  }
};

inline double TreeSum(double* a) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) a[l] += a[l + width];
  }
  return a[0];
}

template <class P, class G>
void SumG2(const LeafView& leaf, int64_t begin, int64_t end, double* out) {
  using C = typename ComputeOf<P>::type;
  const G* g = static_cast<const G*>(leaf.g);
  double acc[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double x = static_cast<double>(Ld<C>(g[i + l]));
      acc[l] += x * x;
    }
  }
  for (int l = 0; i < end; ++i, ++l) {
    const double x = static_cast<double>(Ld<C>(g[i]));
    acc[l] += x * x;
  }
  out[0] = TreeSum(acc);
}

template <class P, class G, bool CN, bool CV, bool WD>
void Sums(const LeafView& leaf, int64_t begin, int64_t end, const Hyper& h,
          const StepScalars& s, double* out) {
  using C = typename ComputeOf<P>::type;
  const P* w = static_cast<const P*>(leaf.w);
  const G* g = static_cast<const G*>(leaf.g);
  const Eff<C, CN, CV, WD> eff(h, s);
  double aw[kLanes] = {};
  double ag[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const C wc = Ld<C>(w[i + l]);
      const C gc = eff(Ld<C>(g[i + l]), wc);
      aw[l] += static_cast<double>(wc) * static_cast<double>(wc);
      ag[l] += static_cast<double>(gc) * static_cast<double>(gc);
    }
  }
  for (int l = 0; i < end; ++i, ++l) {
    const C wc = Ld<C>(w[i]);
    const C gc = eff(Ld<C>(g[i]), wc);
    aw[l] += static_cast<double>(wc) * static_cast<double>(wc);
    ag[l] += static_cast<double>(gc) * static_cast<double>(gc);
  }
  out[0] = TreeSum(aw);
  out[1] = TreeSum(ag);
}

template <class P, class G, bool CN, bool CV, bool WD, bool APPLY, bool NESTEROV>
void UpdateLoop(const LeafView& leaf, int64_t begin, int64_t end, const Hyper& h,
                const StepScalars& s, double ratio) {
  using C = typename ComputeOf<P>::type;
  const P* w = static_cast<const P*>(leaf.w);
  const G* g = static_cast<const G*>(leaf.g);
  const C* v = static_cast<const C*>(leaf.v);
  P* out = static_cast<P*>(leaf.out);
  C* v_out = static_cast<C*>(leaf.v_out);
  const Eff<C, CN, CV, WD> eff(h, s);
  const C r = static_cast<C>(ratio);
  const C mu = static_cast<C>(h.momentum);
  const C lr = static_cast<C>(s.lr);
  // lr multiplies either the momentum input or the direction; the other factor
  // is 1, and x * 1 == x exactly, so this matches both forms bit for bit.
  const C lr_in = h.lr_inside ? lr : C(1);
  const C lr_out = h.lr_inside ? C(1) : lr;
  LARS_IVDEP
  for (int64_t i = begin; i < end; ++i) {
    const P wp = w[i];
    const C wc = Ld<C>(wp);
    const C gc = eff(Ld<C>(g[i]), wc);
    const C u = lr_in * (gc * r);
    const C vn = u + mu * v[i];
    const C dir = NESTEROV ? u + mu * vn : vn;
    const C step = lr_out * dir;
    v_out[i] = vn;
    if constexpr (APPLY) {
      // optax.apply_updates: p + u in the param dtype, u = (-step) as that dtype.
      out[i] = St<P>::Do(wc + Ld<C>(St<P>::Do(-step)));
    } else {
      out[i] = St<P>::Do(-step);
    }
  }
}

template <class P, class G, bool CN, bool CV, bool WD>
void Update(const LeafView& leaf, int64_t begin, int64_t end, const Hyper& h,
            const StepScalars& s, double ratio) {
  if (h.apply) {
    if (h.nesterov) {
      UpdateLoop<P, G, CN, CV, WD, true, true>(leaf, begin, end, h, s, ratio);
    } else {
      UpdateLoop<P, G, CN, CV, WD, true, false>(leaf, begin, end, h, s, ratio);
    }
  } else {
    if (h.nesterov) {
      UpdateLoop<P, G, CN, CV, WD, false, true>(leaf, begin, end, h, s, ratio);
    } else {
      UpdateLoop<P, G, CN, CV, WD, false, false>(leaf, begin, end, h, s, ratio);
    }
  }
}

// Selects the template for the run-time flags of one leaf.
using SumsFn = void (*)(const LeafView&, int64_t, int64_t, const Hyper&, const StepScalars&,
                        double*);
using UpdateFn = void (*)(const LeafView&, int64_t, int64_t, const Hyper&, const StepScalars&,
                          double);

template <class P, class G>
struct Table {
  template <bool CN, bool CV, bool WD>
  static constexpr SumsFn kSums = &Sums<P, G, CN, CV, WD>;
  template <bool CN, bool CV, bool WD>
  static constexpr UpdateFn kUpdate = &Update<P, G, CN, CV, WD>;

  static int Index(const LeafView& leaf, const Hyper& h, const StepScalars& s) {
    const bool cn = h.has_clip_norm &&
                    !(static_cast<typename ComputeOf<P>::type>(s.global_norm) <
                      static_cast<typename ComputeOf<P>::type>(h.grad_clip_norm));
    const bool cv = h.has_clip_value;
    const bool wd = leaf.decay && h.weight_decay != 0.0;
    return (cn ? 4 : 0) | (cv ? 2 : 0) | (wd ? 1 : 0);
  }
  static void RunSums(const LeafView& leaf, int64_t b, int64_t e, const Hyper& h,
                      const StepScalars& s, double* out) {
    static constexpr SumsFn fns[8] = {
        kSums<false, false, false>, kSums<false, false, true>, kSums<false, true, false>,
        kSums<false, true, true>,   kSums<true, false, false>, kSums<true, false, true>,
        kSums<true, true, false>,   kSums<true, true, true>};
    fns[Index(leaf, h, s)](leaf, b, e, h, s, out);
  }
  static void RunUpdate(const LeafView& leaf, int64_t b, int64_t e, const Hyper& h,
                        const StepScalars& s, double ratio) {
    static constexpr UpdateFn fns[8] = {
        kUpdate<false, false, false>, kUpdate<false, false, true>, kUpdate<false, true, false>,
        kUpdate<false, true, true>,   kUpdate<true, false, false>, kUpdate<true, false, true>,
        kUpdate<true, true, false>,   kUpdate<true, true, true>};
    fns[Index(leaf, h, s)](leaf, b, e, h, s, ratio);
  }
};

// Dispatch on the (params, grads) dtype pair; SupportedPair lists the pairs.
#define LARS_DISPATCH_PAIR(leaf, CALL)                                     \
  switch ((int(leaf.p) << 2) | int(leaf.gt)) {                             \
    case (kF32 << 2) | kF32: CALL(float, float); break;                    \
    case (kF32 << 2) | kBF16: CALL(float, Bf16); break;                    \
    case (kF32 << 2) | kF16: CALL(float, F16); break;                      \
    case (kBF16 << 2) | kBF16: CALL(Bf16, Bf16); break;                    \
    case (kF16 << 2) | kF16: CALL(F16, F16); break;                        \
    case (kF64 << 2) | kF64: CALL(double, double); break;                  \
    case (kF64 << 2) | kBF16: CALL(double, Bf16); break;                   \
    case (kF64 << 2) | kF16: CALL(double, F16); break;                     \
    default: break;                                                        \
  }

void SumG2Any(const LeafView& leaf, int64_t b, int64_t e, double* out) {
#define LARS_CALL(P, G) SumG2<P, G>(leaf, b, e, out)
  LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
}

void SumsAny(const LeafView& leaf, int64_t b, int64_t e, const Hyper& h, const StepScalars& s,
             double* out) {
#define LARS_CALL(P, G) Table<P, G>::RunSums(leaf, b, e, h, s, out)
  LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
}

void UpdateAny(const LeafView& leaf, int64_t b, int64_t e, const Hyper& h, const StepScalars& s,
               double ratio) {
#define LARS_CALL(P, G) Table<P, G>::RunUpdate(leaf, b, e, h, s, ratio)
  LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
}

#define LARS_STR2(x) #x
#define LARS_STR(x) LARS_STR2(x)

}  // namespace

const CpuKernels& Kernels() {
  static const CpuKernels kernels{LARS_STR(LARS_ISA_NS), &SumG2Any, &SumsAny, &UpdateAny};
  return kernels;
}

}  // namespace LARS_ISA_NS
}  // namespace lars_native
