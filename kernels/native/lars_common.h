// Definitions shared by the CPU and CUDA XLA FFI handlers of the native LARS
// backend: the static hyperparameters, the dtype codes and the trust ratio.
//
// The elementwise arithmetic mirrors lars._reference.reference_step in the
// compute dtype C (float32, or float64 for float64 params); only the per-leaf
// sums of squares are accumulated in float64 (in a fixed order), so the norms
// are at least as accurate as the reference's float32 reductions.
#ifndef LARS_NATIVE_COMMON_H_
#define LARS_NATIVE_COMMON_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LARS_HD __host__ __device__ __forceinline__
#else
#define LARS_HD inline
#endif

namespace lars_native {

// Storage dtypes of params and gradients (momentum is float32, or float64 for
// float64 params).
enum Dtype : uint8_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kBadDtype = 255 };

// Leaves with at most this many elements are done by one worker in one go (the
// sums, then the update while the leaf is still in cache); larger leaves are
// cut into chunks of kChunk elements. Both are fixed, so the order of every
// floating-point reduction is independent of the number of threads.
constexpr int64_t kSmallLeaf = 65536;
constexpr int64_t kChunk = 65536;

// What the step writes besides the momentum and the trust ratios.
enum OutputMode : int32_t {
  kWriteUpdates = 0,  // the updates -(lr * direction), in the param dtype
  kWriteParams = 1,   // the new params, params + updates (optax.apply_updates)
  kMomentumOnly = 2,  // nothing else (the caller derives the updates from v)
};

// The static hyperparameters of one step (FFI attributes).
struct Hyper {
  double momentum = 0.9;
  double weight_decay = 0.0;
  double trust_coefficient = 0.001;
  double eps = 1e-8;
  double trust_clip = 0.0;
  double grad_clip_norm = 0.0;
  double grad_clip_value = 0.0;
  bool has_trust_clip = false;
  bool has_clip_norm = false;
  bool has_clip_value = false;
  bool nesterov = false;
  bool lr_inside = false;
  int32_t mode = kWriteUpdates;  // an OutputMode
};

// Values known only at run time, in float64: the learning rate and, with
// grad_clip_norm, the global gradient norm.
struct StepScalars {
  double lr = 0.0;
  double global_norm = 0.0;
};

// The (params, grads) dtype pairs the handlers accept: grads of the params'
// dtype, or bfloat16/float16 grads on float32/float64 params.
inline bool SupportedPair(Dtype p, Dtype g) {
  switch (p) {
    case kF32:
    case kF64:
      return g == p || g == kBF16 || g == kF16;
    case kBF16:
      return g == kBF16;
    case kF16:
      return g == kF16;
    default:
      return false;
  }
}

// The trust ratio of one leaf from its float64 sums of w^2 and g^2 (g after
// clipping and weight decay), in the compute dtype C, as the reference
// computes it: r = eta * ||w|| / (||g|| + eps); 1 where a norm is 0; then
// min(r, trust_clip) when set. Leaves outside the trust mask get 1.
template <class C>
LARS_HD C trust_ratio(double sum_w2, double sum_g2, bool trust, const Hyper& h) {
  if (!trust) return C(1);
  const C wn = static_cast<C>(sqrt(sum_w2));
  const C gn = static_cast<C>(sqrt(sum_g2));
  C r = (static_cast<C>(h.trust_coefficient) * wn) / (gn + static_cast<C>(h.eps));
  if (wn == C(0) || gn == C(0)) r = C(1);
  if (h.has_trust_clip && r > static_cast<C>(h.trust_clip)) r = static_cast<C>(h.trust_clip);
  return r;
}

}  // namespace lars_native

#endif  // LARS_NATIVE_COMMON_H_
