// Instruction-set tables that were not compiled (the compiler lacks the flags,
// or the processor is not x86-64) fall back to the portable loops.
#include "lars_cpu_kernels.h"

namespace lars_native {
#if !defined(LARS_HAVE_AVX2)
namespace isa_avx2 {
const CpuKernels& Kernels() { return isa_base::Kernels(); }
}  // namespace isa_avx2
#endif
#if !defined(LARS_HAVE_AVX512)
namespace isa_avx512 {
const CpuKernels& Kernels() { return isa_base::Kernels(); }
}  // namespace isa_avx512
#endif
}  // namespace lars_native
