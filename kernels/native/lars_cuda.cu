// XLA FFI handler for NVIDIA GPUs: the LARS step on all leaves in two kernel
// launches per group of up to kMaxLeaves leaves (four with grad_clip_norm), in
// the style of apex's multi_tensor_apply: a table of leaf pointers passed as a
// kernel argument, blocks mapped to (leaf, chunk) by a search over the table.
//
//   [clip]  SqKernel      per-block partial sums of g^2
//   [clip]  NormKernel    one block adds them in index order -> global norm
//           SumsKernel    per-block partial sums of w^2 and g^2 (g after
//                         clipping and decay)
//           UpdateKernel  every block adds its leaf's partials in block order
//                         (the ratio), then updates its chunk; the leaf's first
//                         block writes the ratio out
//
// No atomics: every sum has a fixed order (fixed chunks, a fixed block size, a
// fixed reduction tree), so results are bitwise identical from run to run. The
// elementwise arithmetic is the reference's, compiled with -fmad=false.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "lars_common.h"
#include "lars_ffi_leaf.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace lars_native {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kGpuChunk = 16384;  // elements per block
constexpr int kMaxLeaves = 384;       // leaves per launch (kernel arguments < 32 KiB)

struct GpuLeaf {
  const void* w;
  const void* g;
  const void* v;
  void* out;
  void* v_out;
  float* ratio_out;
  int64_t n;
  int32_t first_block;  // first block of this leaf within the launch
  int32_t num_blocks;
  int32_t slot;  // first partial-sum slot of this leaf (global over launches)
  uint8_t p, gt, decay, trust;
};

struct GpuTable {
  int32_t num_leaves;
  int32_t num_blocks;
  int32_t slot_base;  // partial-sum slot of this launch's first block
  int32_t pad;
  GpuLeaf leaves[kMaxLeaves];
};

struct DeviceHyper {
  Hyper h;
  const float* lr;
  const double* global_norm;  // written by NormKernel (nullptr without clipping)
};

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

template <class C>
struct Eff {
  bool cn, cv, wd;
  C norm, clip_norm, clip_value, decay;
  __device__ Eff(const DeviceHyper& d, bool leaf_decay) {
    const Hyper& h = d.h;
    const double gn = d.global_norm != nullptr ? *d.global_norm : 0.0;
    norm = static_cast<C>(gn);
    clip_norm = static_cast<C>(h.grad_clip_norm);
    clip_value = static_cast<C>(h.grad_clip_value);
    decay = static_cast<C>(h.weight_decay);
    cn = h.has_clip_norm && !(norm < clip_norm);
    cv = h.has_clip_value;
    wd = leaf_decay && h.weight_decay != 0.0;
  }
  __device__ __forceinline__ C operator()(C g, C w) const {
    if (cn) g = (g / norm) * clip_norm;
    if (cv) {
      g = g < -clip_value ? -clip_value : g;
      g = g > clip_value ? clip_value : g;
    }
    if (wd) g = g + decay * w;
    return g;
  }
};

// Fixed-order block reduction of one value per thread (result in thread 0).
__device__ double BlockSum(double x, double* shared) {
  shared[threadIdx.x] = x;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

__device__ int FindLeaf(const GpuTable& t, int block) {
  int lo = 0, hi = t.num_leaves - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.leaves[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

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

// --- kernels ------------------------------------------------------------------
template <class P, class G>
__device__ double ChunkSumG2(const GpuLeaf& leaf, int64_t begin, int64_t end) {
  using C = typename ComputeOf<P>::type;
  const G* g = static_cast<const G*>(leaf.g);
  double acc = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double x = static_cast<double>(Ld<C>(g[i]));
    acc += x * x;
  }
  return acc;
}

__global__ void SqKernel(const __grid_constant__ GpuTable t, double* partial) {
  __shared__ double shared[kThreads];
  const int li = FindLeaf(t, blockIdx.x);
  const GpuLeaf& leaf = t.leaves[li];
  const int64_t chunk = blockIdx.x - leaf.first_block;
  const int64_t begin = chunk * kGpuChunk;
  const int64_t end = min(leaf.n, begin + kGpuChunk);
  double acc = 0.0;
#define LARS_CALL(P, G) acc = ChunkSumG2<P, G>(leaf, begin, end)
  LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
  const double total = BlockSum(acc, shared);
  if (threadIdx.x == 0) partial[t.slot_base + blockIdx.x] = total;
}

__global__ void NormKernel(const double* partial, int num, double* global_norm) {
  __shared__ double shared[kThreads];
  // Each thread adds a contiguous run of partials in order, then the fixed tree.
  const int per = (num + kThreads - 1) / kThreads;
  double acc = 0.0;
  for (int k = threadIdx.x * per; k < min(num, (threadIdx.x + 1) * per); ++k) acc += partial[k];
  const double total = BlockSum(acc, shared);
  if (threadIdx.x == 0) *global_norm = sqrt(total);
}

template <class P, class G>
__device__ void ChunkSums(const GpuLeaf& leaf, int64_t begin, int64_t end, const DeviceHyper& d,
                          double* sw, double* sg) {
  using C = typename ComputeOf<P>::type;
  const P* w = static_cast<const P*>(leaf.w);
  const G* g = static_cast<const G*>(leaf.g);
  const Eff<C> eff(d, leaf.decay != 0);
  double aw = 0.0, ag = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const C wc = Ld<C>(w[i]);
    const C gc = eff(Ld<C>(g[i]), wc);
    aw += static_cast<double>(wc) * static_cast<double>(wc);
    ag += static_cast<double>(gc) * static_cast<double>(gc);
  }
  *sw = aw;
  *sg = ag;
}

__global__ void SumsKernel(const __grid_constant__ GpuTable t, DeviceHyper d, double* partial) {
  __shared__ double shared[kThreads];
  const int li = FindLeaf(t, blockIdx.x);
  const GpuLeaf& leaf = t.leaves[li];
  const int64_t chunk = blockIdx.x - leaf.first_block;
  const int64_t begin = chunk * kGpuChunk;
  const int64_t end = min(leaf.n, begin + kGpuChunk);
  double sw = 0.0, sg = 0.0;
  if (leaf.trust) {
#define LARS_CALL(P, G) ChunkSums<P, G>(leaf, begin, end, d, &sw, &sg)
    LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
  }
  const double tw = BlockSum(sw, shared);
  const double tg = BlockSum(sg, shared);
  if (threadIdx.x == 0) {
    partial[2 * (t.slot_base + blockIdx.x)] = tw;
    partial[2 * (t.slot_base + blockIdx.x) + 1] = tg;
  }
}

template <class P, class G>
__device__ void ChunkUpdate(const GpuLeaf& leaf, int64_t begin, int64_t end, const DeviceHyper& d,
                            double ratio) {
  using C = typename ComputeOf<P>::type;
  const Hyper& h = d.h;
  const P* w = static_cast<const P*>(leaf.w);
  const G* g = static_cast<const G*>(leaf.g);
  const C* v = static_cast<const C*>(leaf.v);
  P* out = static_cast<P*>(leaf.out);
  C* v_out = static_cast<C*>(leaf.v_out);
  const Eff<C> eff(d, leaf.decay != 0);
  const C r = static_cast<C>(ratio);
  const C mu = static_cast<C>(h.momentum);
  const C lr = static_cast<C>(*d.lr);
  const C lr_in = h.lr_inside ? lr : C(1);
  const C lr_out = h.lr_inside ? C(1) : lr;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const C wc = Ld<C>(w[i]);
    const C gc = eff(Ld<C>(g[i]), wc);
    const C u = lr_in * (gc * r);
    const C vn = u + mu * v[i];
    v_out[i] = vn;
    if (h.mode == kMomentumOnly) continue;
    const C dir = h.nesterov ? u + mu * vn : vn;
    const C step = lr_out * dir;
    if (h.mode == kWriteParams) {
      out[i] = St<P>::Do(wc + Ld<C>(St<P>::Do(-step)));
    } else {
      out[i] = St<P>::Do(-step);
    }
  }
}

__global__ void UpdateKernel(const __grid_constant__ GpuTable t, DeviceHyper d,
                             const double* partial) {
  __shared__ double shared[kThreads];
  const int li = FindLeaf(t, blockIdx.x);
  const GpuLeaf& leaf = t.leaves[li];
  const int64_t chunk = blockIdx.x - leaf.first_block;
  // The leaf's sums: thread k adds a contiguous run of the leaf's partials in
  // order, then the fixed tree; every block of the leaf gets the same bits.
  const int nb = leaf.num_blocks;
  const int per = (nb + kThreads - 1) / kThreads;
  double sw = 0.0, sg = 0.0;
  for (int k = threadIdx.x * per; k < min(nb, (int)(threadIdx.x + 1) * per); ++k) {
    sw += partial[2 * (leaf.slot + k)];
    sg += partial[2 * (leaf.slot + k) + 1];
  }
  sw = BlockSum(sw, shared);
  sg = BlockSum(sg, shared);
  double ratio;
  if (leaf.p == kF64) {
    ratio = trust_ratio<double>(sw, sg, leaf.trust != 0, d.h);
  } else {
    ratio = static_cast<double>(trust_ratio<float>(sw, sg, leaf.trust != 0, d.h));
  }
  if (chunk == 0 && threadIdx.x == 0) *leaf.ratio_out = static_cast<float>(ratio);
  const int64_t begin = chunk * kGpuChunk;
  const int64_t end = min(leaf.n, begin + kGpuChunk);
#define LARS_CALL(P, G) ChunkUpdate<P, G>(leaf, begin, end, d, ratio)
  LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
}

// --- handler ------------------------------------------------------------------
ffi::Error StepCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer lr,
                    ffi::RemainingArgs args, ffi::RemainingRets rets, double momentum,
                    double weight_decay, double trust_coefficient, double eps, double trust_clip,
                    double grad_clip_norm, double grad_clip_value, bool nesterov,
                    bool lr_inside_momentum, int32_t mode, ffi::Span<const uint8_t> decay_mask,
                    ffi::Span<const uint8_t> trust_mask, int64_t /*num_threads*/) {
  const size_t num_leaves = decay_mask.size();
  DeviceHyper d{};
  size_t outs = 0;
  StepExtras extras;
  if (ffi::Error err = ReadStepHeader(lr, args, rets, num_leaves, trust_mask.size(), momentum,
                                      weight_decay, trust_coefficient, eps, trust_clip,
                                      grad_clip_norm, grad_clip_value, nesterov,
                                      lr_inside_momentum, mode, &d.h, &outs, &extras);
      err.failure()) {
    return err;
  }
  if (extras.given_ratios || extras.finite_flag) {
    return Invalid(
        "the CUDA handler takes neither precomputed trust ratios (sharded params) nor a "
        "finite flag (skip_nonfinite); these run on the CPU handler only");
  }
  d.lr = static_cast<const float*>(lr.untyped_data());

  // Leaves, grouped into launches of at most kMaxLeaves.
  std::vector<GpuTable> tables;
  int32_t total_blocks = 0;
  for (size_t i = 0; i < num_leaves; ++i) {
    LeafBuffers b;
    if (ffi::Error err = ReadLeafBuffers(args, rets, num_leaves, outs, i, &b); err.failure()) {
      return err;
    }
    const std::string where = "leaf " + std::to_string(i) + ": ";
    GpuLeaf leaf{};
    leaf.n = b.n;
    leaf.p = b.p;
    leaf.gt = b.gt;
    leaf.w = b.w;
    leaf.g = b.g;
    leaf.v = b.v;
    leaf.out = b.out;
    leaf.v_out = b.v_out;
    leaf.ratio_out = b.ratio_out;
    leaf.decay = decay_mask[i] != 0;
    leaf.trust = trust_mask[i] != 0;
    const int64_t blocks = std::max<int64_t>(1, (leaf.n + kGpuChunk - 1) / kGpuChunk);
    if (blocks > (int64_t{1} << 30)) return Invalid(where + "too large");
    if (tables.empty() || tables.back().num_leaves == kMaxLeaves ||
        tables.back().num_blocks + blocks > (int64_t{1} << 30)) {
      tables.emplace_back();
      GpuTable& t = tables.back();
      t.num_leaves = 0;
      t.num_blocks = 0;
      t.slot_base = total_blocks;
    }
    GpuTable& t = tables.back();
    leaf.first_block = t.num_blocks;
    leaf.num_blocks = static_cast<int32_t>(blocks);
    leaf.slot = total_blocks;
    t.leaves[t.num_leaves++] = leaf;
    t.num_blocks += static_cast<int32_t>(blocks);
    total_blocks += static_cast<int32_t>(blocks);
  }
  if (num_leaves == 0) return ffi::Error::Success();

  // Scratch: 2 partials per block, one more per block with clipping, the norm.
  const size_t doubles = 3 * static_cast<size_t>(total_blocks) + 1;
  auto mem = scratch.Allocate(doubles * sizeof(double), alignof(double));
  if (!mem.has_value()) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "lars native step: no scratch memory");
  }
  double* partial = static_cast<double*>(*mem);
  double* sq_partial = partial + 2 * static_cast<size_t>(total_blocks);
  double* norm = sq_partial + total_blocks;

  if (d.h.has_clip_norm) {
    for (const GpuTable& t : tables) SqKernel<<<t.num_blocks, kThreads, 0, stream>>>(t, sq_partial);
    NormKernel<<<1, kThreads, 0, stream>>>(sq_partial, total_blocks, norm);
    d.global_norm = norm;
  }
  for (const GpuTable& t : tables) SumsKernel<<<t.num_blocks, kThreads, 0, stream>>>(t, d, partial);
  for (const GpuTable& t : tables) {
    UpdateKernel<<<t.num_blocks, kThreads, 0, stream>>>(t, d, partial);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("lars native step: CUDA launch failed: ") +
                          cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace lars_native

XLA_FFI_DEFINE_HANDLER_SYMBOL(LarsNativeStepCuda, lars_native::StepCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // learning rate
                                  .RemainingArgs()        // params, grads, momentum
                                  .RemainingRets()        // out, momentum, trust ratios
                                  .Attr<double>("momentum")
                                  .Attr<double>("weight_decay")
                                  .Attr<double>("trust_coefficient")
                                  .Attr<double>("eps")
                                  .Attr<double>("trust_clip")
                                  .Attr<double>("grad_clip_norm")
                                  .Attr<double>("grad_clip_value")
                                  .Attr<bool>("nesterov")
                                  .Attr<bool>("lr_inside_momentum")
                                  .Attr<int32_t>("mode")
                                  .Attr<ffi::Span<const uint8_t>>("decay_mask")
                                  .Attr<ffi::Span<const uint8_t>>("trust_mask")
                                  .Attr<int64_t>("num_threads"));
