// Host stand-ins for the CUDA built-ins that kernels/native/lars_cuda.cu's
// kernels use, so that check.cc can run them on the CPU: a launch runs its
// blocks one after another, the threads of a block as std::threads meeting at
// a barrier for __syncthreads (and between blocks); __shared__ variables are
// function statics (shared by the threads of the block running); atomics and
// fences are the host's. With LARS_EMULATE_CONCURRENT_BLOCKS, all blocks of a
// launch run at once instead, one host thread each (blocks of one thread).
// What this cannot show: the GPU's memory model (the host's is stronger).
#ifndef LARS_CUDA_EMULATION_SHIM_H_
#define LARS_CUDA_EMULATION_SHIM_H_
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#undef __device__
#undef __global__
#undef __forceinline__
#undef __grid_constant__
#undef __launch_bounds__
#undef __shared__
#define __device__
#define __global__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
struct Dim { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim threadIdx;
inline thread_local Dim blockIdx;
#ifdef LARS_EMULATE_CONCURRENT_BLOCKS
// Blocks of one thread (bench/cuda_emulate.py sets kThreads = 1), each a host
// thread, all of a launch's blocks at once: a block's shared memory is its
// thread's, and a barrier has nothing to wait for.
#define __shared__ static thread_local
inline void __syncthreads() {}
// A waiting block lets the others run (the host has fewer cores than blocks).
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
#else
#define __shared__ static
inline std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
#endif
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicCAS(unsigned* p, unsigned expected, unsigned desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline double __ldcg(const double* p) { double x; __atomic_load(p, &x, __ATOMIC_SEQ_CST); return x; }
template <class A, class B> inline auto min(A a, B b) { using T = std::common_type_t<A, B>; return T(a) < T(b) ? T(a) : T(b); }
using std::sqrt;

#endif  // LARS_CUDA_EMULATION_SHIM_H_
