// The per-leaf CPU loops, compiled once per instruction set: CMake builds this
// file with -DLARS_ISA_NS=isa_base (no extra flags), isa_avx2 (-mavx2 -mf16c)
// and isa_avx512 (-mavx512f -mavx512bw -mavx512dq -mavx512vl -mf16c), always
// with -ffp-contract=off so that every variant rounds like the reference.
//
// Sums are accumulated in float64 in kLanes independent lanes (element i of a
// part of a range goes to lane (i - part begin) % kLanes), then the lanes are
// added in a fixed tree and the parts in order (SumsK): the result depends
// only on the range and the number of parts, never on the instruction set or
// the number of threads.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lars_cpu_kernels.h"
#include "lars_cpu_storage.h"

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
// The blockwise update loop's block: 64 float32 are 4 cache lines of each
// of w, g and v (chosen, not tuned: the loop serves the timing variants).
constexpr int64_t kUpdateBlock = 64;

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
  // T is C or a vector of C (the same IEEE operations lane by lane).
  template <class T>
  inline T operator()(T g, T w) const {
    if constexpr (CN) g = (g / norm) * clip_norm;
    if constexpr (CV) {
      g = g < -clip_value ? -clip_value : g;
      g = g > clip_value ? clip_value : g;
    }
    if constexpr (WD) g = g + wd * w;
    return g;
  }
};

inline double TreeSum(double* a) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) a[l] += a[l + width];
  }
  return a[0];
}

// Blocks of kLanes elements as GCC/Clang vectors (lowered to whatever width the
// instruction set has; every lane is plain IEEE arithmetic, so all variants
// give the same bits). Lane l of a block holds element l of the block.
typedef float VF16 __attribute__((vector_size(64)));
typedef double VD16 __attribute__((vector_size(128)));
typedef float VF8 __attribute__((vector_size(32)));
typedef double VD8 __attribute__((vector_size(64)));
typedef uint16_t VU16x16 __attribute__((vector_size(32)));
typedef uint32_t VU32x16 __attribute__((vector_size(64)));
#if defined(__FLT16_MAX__)
typedef _Float16 VH16 __attribute__((vector_size(32)));
#endif

template <class C>
struct Vec;
template <>
struct Vec<float> {
  using type = VF16;
};
template <>
struct Vec<double> {
  using type = VD16;
};

inline VF16 BlockF(const float* p) {
  VF16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline VF16 BlockF(const Bf16* p) {
  VU16x16 bits;
  std::memcpy(&bits, p, sizeof(bits));
  const VU32x16 wide = __builtin_convertvector(bits, VU32x16) << 16;
  VF16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
inline VF16 BlockF(const F16* p) {
#if defined(__FLT16_MAX__)
  VH16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, VF16);
#else
  VF16 v;
  for (int l = 0; l < kLanes; ++l) v[l] = F16ToF32(p[l]);
  return v;
#endif
}

// A block of kLanes stored values in the compute dtype C.
template <class C, class S>
inline typename Vec<C>::type Block(const S* p) {
  if constexpr (std::is_same_v<C, float>) {
    return BlockF(p);
  } else if constexpr (std::is_same_v<S, double>) {
    VD16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else {
    return __builtin_convertvector(BlockF(p), VD16);
  }
}

// acc_lo/acc_hi hold lanes 0-7 / 8-15 of the float64 accumulators.
inline void AddWide(VF16 x, VD8& acc_lo, VD8& acc_hi) {
  acc_lo += __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), VD8);
  acc_hi +=
      __builtin_convertvector(__builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15), VD8);
}
inline void AddSquaresWide(VD16 x, VD8& acc_lo, VD8& acc_hi) {
  const VD8 lo = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  const VD8 hi = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  acc_lo += lo * lo;
  acc_hi += hi * hi;
}

inline void ToLanes(VD8 lo, VD8 hi, double* lanes) {
  for (int l = 0; l < 8; ++l) {
    lanes[l] = lo[l];
    lanes[l + 8] = hi[l];
  }
}

// Sums of squares of kLanes-element blocks [i, i + kLanes) of `x(i)` into
// float64 lanes; returns the index of the first element not in a full block.
// float32: each lane first adds the squares of up to kInner blocks in float32
// (16 terms, relative error below 16 * 2^-24), then that partial is added in
// float64; float64: every square is added in float64.
constexpr int kInner = 16;

template <class C, class F>
int64_t SquareBlocks(int64_t i, int64_t end, F&& x, VD8* lo, VD8* hi, int num) {
  if constexpr (std::is_same_v<C, float>) {
    while (i + kLanes <= end) {
      VF16 part[8] = {};
      for (int k = 0; k < kInner && i + kLanes <= end; ++k, i += kLanes) {
        VF16 v[8];
        x(i, v);
        for (int j = 0; j < num; ++j) part[j] += v[j] * v[j];
      }
      for (int j = 0; j < num; ++j) AddWide(part[j], lo[j], hi[j]);
    }
  } else {
    for (; i + kLanes <= end; i += kLanes) {
      VD16 v[8];
      x(i, v);
      for (int j = 0; j < num; ++j) AddSquaresWide(v[j], lo[j], hi[j]);
    }
  }
  return i;
}

template <class P, class G>
void SumG2(const LeafView& leaf, int64_t begin, int64_t end, double* out) {
  using C = typename ComputeOf<P>::type;
  const G* g = static_cast<const G*>(leaf.g);
  VD8 lo[1] = {}, hi[1] = {};
  int64_t i = SquareBlocks<C>(
      begin, end, [&](int64_t k, typename Vec<C>::type* v) { v[0] = Block<C>(g + k); }, lo, hi,
      1);
  double acc[kLanes];
  ToLanes(lo[0], hi[0], acc);
  for (int l = 0; i < end; ++i, ++l) {
    const double x = static_cast<double>(Ld<C>(g[i]));
    acc[l] += x * x;
  }
  out[0] = TreeSum(acc);
}

// Sums of w^2 and g^2 over [begin, end) as K parts: parts 0..K-2 hold `part`
// elements each (a multiple of kLanes), the last the rest; each part has its
// own lanes, and the parts' totals are added in order. K is part of the
// numerics (it decides which elements a lane adds), so every instruction set
// uses the same K. With AVX-512 the parts are read side by side (2K streams,
// which a core reads faster than 2 when its own outstanding misses, not the
// memory, are the limit); with fewer registers (AVX2: sixteen of 32 bytes) that
// loop spills and runs slower than reading the parts one after the other,
// which gives the same bits. Only the default, K = 2, reads side by side: the
// other K are timing variants, and a loop per K made the file slow to compile.
#if defined(__AVX512F__)
constexpr bool kInterleaveParts = true;
#else
constexpr bool kInterleaveParts = false;
#endif

template <int K, class P, class G, bool CN, bool CV, bool WD>
void SumsK(const LeafView& leaf, int64_t begin, int64_t end, const Hyper& h,
           const StepScalars& s, double* out) {
  using C = typename ComputeOf<P>::type;
  const P* w = static_cast<const P*>(leaf.w);
  const G* g = static_cast<const G*>(leaf.g);
  const Eff<C, CN, CV, WD> eff(h, s);
  const int64_t part = (end - begin) / (K * kLanes) * kLanes;
  VD8 lo[2 * K] = {}, hi[2 * K] = {};
  auto one = [&](int64_t k, typename Vec<C>::type* v) {
    v[0] = Block<C>(w + k);
    v[1] = eff(Block<C>(g + k), v[0]);
  };
  int64_t i = begin + K * part;
  if constexpr (kInterleaveParts && K == 2) {
    SquareBlocks<C>(
        begin, begin + part,
        [&](int64_t k, typename Vec<C>::type* v) {
          for (int j = 0; j < K; ++j) one(k + j * part, v + 2 * j);
        },
        lo, hi, 2 * K);
  } else {
    // The same sums part after part: the same blocks in the same order per
    // lane, so the same bits.
    for (int j = 0; j < K; ++j) {
      SquareBlocks<C>(begin + j * part, begin + (j + 1) * part, one, lo + 2 * j, hi + 2 * j, 2);
    }
  }
  i = SquareBlocks<C>(i, end, one, lo + 2 * (K - 1), hi + 2 * (K - 1), 2);
  double aw[K][kLanes], ag[K][kLanes];
  for (int j = 0; j < K; ++j) {
    ToLanes(lo[2 * j], hi[2 * j], aw[j]);
    ToLanes(lo[2 * j + 1], hi[2 * j + 1], ag[j]);
  }
  for (int l = 0; i < end; ++i, ++l) {
    const C wc = Ld<C>(w[i]);
    const C gc = eff(Ld<C>(g[i]), wc);
    aw[K - 1][l] += static_cast<double>(wc) * static_cast<double>(wc);
    ag[K - 1][l] += static_cast<double>(gc) * static_cast<double>(gc);
  }
  double sw = 0.0, sg = 0.0;
  for (int j = 0; j < K; ++j) {
    sw += TreeSum(aw[j]);
    sg += TreeSum(ag[j]);
  }
  out[0] = sw;
  out[1] = sg;
}

template <class P, class G, bool CN, bool CV, bool WD>
void Sums(const LeafView& leaf, int64_t begin, int64_t end, const Hyper& h,
          const StepScalars& s, int streams, double* out) {
  switch (streams) {
    case 1:
      return SumsK<1, P, G, CN, CV, WD>(leaf, begin, end, h, s, out);
    case 4:
      return SumsK<4, P, G, CN, CV, WD>(leaf, begin, end, h, s, out);
    default:
      return SumsK<2, P, G, CN, CV, WD>(leaf, begin, end, h, s, out);
  }
}

template <class P, class G, bool CN, bool CV, bool WD, int MODE, bool NESTEROV>
void UpdateLoop(const LeafView& leaf, int64_t begin, int64_t end, const Hyper& h,
                const StepScalars& s, int streams, double ratio) {
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
  auto one = [&](int64_t i) __attribute__((always_inline)) {
    const P wp = w[i];
    const C wc = Ld<C>(wp);
    const C gc = eff(Ld<C>(g[i]), wc);
    const C u = lr_in * (gc * r);
    const C vn = u + mu * v[i];
    v_out[i] = vn;
    if constexpr (MODE != kMomentumOnly) {
      const C dir = NESTEROV ? u + mu * vn : vn;
      const C step = lr_out * dir;
      if constexpr (MODE == kWriteParams) {
        // optax.apply_updates: p + u in the param dtype, u = (-step) as that dtype.
        out[i] = St<P>::Do(wc + Ld<C>(St<P>::Do(-step)));
      } else {
        out[i] = St<P>::Do(-step);
      }
    }
  };
  // `streams` (1, 2, 4 or 8) parts of the range side by side, so that more
  // streams are in flight; each element's result is the same in any order.
  // The default, 4, has its own loop (one body per part, element by element);
  // 2 and 8, timing variants, share one loop that reads kUpdateBlock elements
  // of each part in turn: a loop per number of parts made this file take about
  // four minutes to compile per instruction set. The blockwise loop was no
  // faster for the default (docs/native.md, "Work split").
  if (streams == 4) {
    const int64_t q = (end - begin) / 4;
    LARS_IVDEP
    for (int64_t i = begin; i < begin + q; ++i) {
      one(i), one(i + q), one(i + 2 * q), one(i + 3 * q);
    }
    begin += 4 * q;
  } else if (streams == 2 || streams == 8) {
    const int64_t q = (end - begin) / (streams * kUpdateBlock) * kUpdateBlock;
    for (int64_t i = begin; i < begin + q; i += kUpdateBlock) {
      for (int64_t j = 0; j < streams; ++j) {
        LARS_IVDEP
        for (int64_t k = i + j * q; k < i + j * q + kUpdateBlock; ++k) one(k);
      }
    }
    begin += streams * q;
  }
  LARS_IVDEP
  for (int64_t i = begin; i < end; ++i) one(i);
}

template <class P, class G, bool CN, bool CV, bool WD>
void Update(const LeafView& leaf, int64_t begin, int64_t end, const Hyper& h,
            const StepScalars& s, int streams, double ratio) {
#define LARS_LOOP(MODE, NEST) \
  UpdateLoop<P, G, CN, CV, WD, MODE, NEST>(leaf, begin, end, h, s, streams, ratio)
  switch (h.mode) {
    case kWriteParams:
      h.nesterov ? LARS_LOOP(kWriteParams, true) : LARS_LOOP(kWriteParams, false);
      break;
    case kMomentumOnly:
      LARS_LOOP(kMomentumOnly, false);
      break;
    default:
      h.nesterov ? LARS_LOOP(kWriteUpdates, true) : LARS_LOOP(kWriteUpdates, false);
      break;
  }
#undef LARS_LOOP
}

// Selects the template for the run-time flags of one leaf.
using SumsFn = void (*)(const LeafView&, int64_t, int64_t, const Hyper&, const StepScalars&, int,
                        double*);
using UpdateFn = void (*)(const LeafView&, int64_t, int64_t, const Hyper&, const StepScalars&, int,
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
                      const StepScalars& s, int streams, double* out) {
    static constexpr SumsFn fns[8] = {
        kSums<false, false, false>, kSums<false, false, true>, kSums<false, true, false>,
        kSums<false, true, true>,   kSums<true, false, false>, kSums<true, false, true>,
        kSums<true, true, false>,   kSums<true, true, true>};
    fns[Index(leaf, h, s)](leaf, b, e, h, s, streams, out);
  }
  static void RunUpdate(const LeafView& leaf, int64_t b, int64_t e, const Hyper& h,
                        const StepScalars& s, int streams, double ratio) {
    static constexpr UpdateFn fns[8] = {
        kUpdate<false, false, false>, kUpdate<false, false, true>, kUpdate<false, true, false>,
        kUpdate<false, true, true>,   kUpdate<true, false, false>, kUpdate<true, false, true>,
        kUpdate<true, true, false>,   kUpdate<true, true, true>};
    fns[Index(leaf, h, s)](leaf, b, e, h, s, streams, ratio);
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
             int streams, double* out) {
#define LARS_CALL(P, G) Table<P, G>::RunSums(leaf, b, e, h, s, streams, out)
  LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
}

void UpdateAny(const LeafView& leaf, int64_t b, int64_t e, const Hyper& h, const StepScalars& s,
               int streams, double ratio) {
#define LARS_CALL(P, G) Table<P, G>::RunUpdate(leaf, b, e, h, s, streams, ratio)
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
