// Device-side element access for the CUDA handler (lars_cuda.cu, its only
// includer): loads of each storage type into the compute type C, rounding
// stores back (round to nearest even), the group width kVec(P) (16 bytes of
// params) and aligned group loads and stores of kV elements in one access,
// with an element-by-element path for unaligned or partial groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "lars_common.h"

namespace lars_native {
namespace {

// --- storage types ----------------------------------------------------------
template <class C>
__device__ __forceinline__ C Ld(float x) {
  return static_cast<C>(x);
}
template <class C>
__device__ __forceinline__ C Ld(double x) {
  return static_cast<C>(x);
}
template <class C>
__device__ __forceinline__ C Ld(__nv_bfloat16 x) {
  return static_cast<C>(__bfloat162float(x));
}
template <class C>
__device__ __forceinline__ C Ld(__half x) {
  return static_cast<C>(__half2float(x));
}

template <class S>
struct St;
template <>
struct St<float> {
  __device__ __forceinline__ static float Do(float c) { return c; }
};
template <>
struct St<double> {
  __device__ __forceinline__ static double Do(double c) { return c; }
};
template <>
struct St<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 Do(float c) { return __float2bfloat16_rn(c); }
};
template <>
struct St<__half> {
  __device__ __forceinline__ static __half Do(float c) { return __float2half_rn(c); }
};

template <class P>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

// Elements per group: 16 bytes of params.
template <class P>
constexpr int kVec = 16 / static_cast<int>(sizeof(P));

// kV elements of T moved as one aligned access of kV * sizeof(T) bytes
// (two 16-byte accesses for 8 float32 momenta).
template <class T, int kV>
struct alignas(kV * sizeof(T) < 16 ? kV * sizeof(T) : 16) Pack {
  T x[kV];
};

// Loads group [i, i + kV) of p into x: one vector access when `vec` (the
// group is whole and aligned), else element by element up to `end`.
template <int kV, class T>
__device__ __forceinline__ void LoadGroup(const T* p, int64_t i, int64_t end, bool vec, T* x) {
  if (vec) {
    const Pack<T, kV> pk = *reinterpret_cast<const Pack<T, kV>*>(p + i);
#pragma unroll
    for (int k = 0; k < kV; ++k) x[k] = pk.x[k];
  } else {
#pragma unroll
    for (int k = 0; k < kV; ++k) x[k] = i + k < end ? p[i + k] : T(0.0f);
  }
}

template <int kV, class T>
__device__ __forceinline__ void StoreGroup(T* p, int64_t i, int64_t end, bool vec, const T* x) {
  if (vec) {
    Pack<T, kV> pk;
#pragma unroll
    for (int k = 0; k < kV; ++k) pk.x[k] = x[k];
    *reinterpret_cast<Pack<T, kV>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < kV; ++k) {
      if (i + k < end) p[i + k] = x[k];
    }
  }
}

// CALL(P, G) with the storage types of the leaf's (params, grads) dtype pair.
#define LARS_DISPATCH_PAIR(leaf, CALL)                    \
  switch ((int(leaf.p) << 2) | int(leaf.gt)) {            \
    case (kF32 << 2) | kF32: CALL(float, float); break;   \
    case (kF32 << 2) | kBF16: CALL(float, __nv_bfloat16); break; \
    case (kF32 << 2) | kF16: CALL(float, __half); break;  \
    case (kBF16 << 2) | kBF16: CALL(__nv_bfloat16, __nv_bfloat16); break; \
    case (kF16 << 2) | kF16: CALL(__half, __half); break; \
    case (kF64 << 2) | kF64: CALL(double, double); break; \
    case (kF64 << 2) | kBF16: CALL(double, __nv_bfloat16); break; \
    case (kF64 << 2) | kF16: CALL(double, __half); break; \
    default: break;                                       \
  }

__device__ __forceinline__ bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace
}  // namespace lars_native
