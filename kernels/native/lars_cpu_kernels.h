// Per-leaf CPU loops of the native LARS step, compiled once per instruction
// set (see lars_cpu_isa.cc); lars_cpu.cc picks one table at load time.
#ifndef LARS_NATIVE_CPU_KERNELS_H_
#define LARS_NATIVE_CPU_KERNELS_H_

#include <cstdint>

#include "lars_common.h"

namespace lars_native {

// One leaf: its size, dtypes, masks and buffers. `out` receives the updates or
// the new params (Hyper::mode; unused with kMomentumOnly); it may alias `w` or
// `g`, and `v_out` may alias `v`: every loop reads element i of all inputs
// before it writes element i.
struct LeafView {
  int64_t n = 0;
  const void* w = nullptr;
  const void* g = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  void* v_out = nullptr;
  Dtype p = kF32;  // params (and updates)
  Dtype gt = kF32;  // gradients
  bool decay = true;
  bool trust = true;
};

// The loops of one instruction set. All of them work on elements [begin, end).
// `streams` is how many parts of the range a loop reads side by side (see
// lars_cpu_settings.h): for `sums` it is part of the numerics (1, 2 or 4; the
// same on every instruction set gives the same bits), for `update` it is not
// (1, 2, 4 or 8).
struct CpuKernels {
  const char* isa;
  // out[0] = sum of g^2 (raw gradients, for the global norm).
  void (*sum_g2)(const LeafView&, int64_t begin, int64_t end, double* out);
  // out[0] = sum of w^2, out[1] = sum of g^2 with g after clipping and decay.
  void (*sums)(const LeafView&, int64_t begin, int64_t end, const Hyper&, const StepScalars&,
               int streams, double* out);
  // The momentum and parameter update with trust ratio `ratio` (a value of the
  // compute dtype, stored in a double).
  void (*update)(const LeafView&, int64_t begin, int64_t end, const Hyper&, const StepScalars&,
                 int streams, double ratio);
};

namespace isa_base {
const CpuKernels& Kernels();
}
namespace isa_avx2 {
const CpuKernels& Kernels();
}
namespace isa_avx512 {
const CpuKernels& Kernels();
}

}  // namespace lars_native

#endif  // LARS_NATIVE_CPU_KERNELS_H_
