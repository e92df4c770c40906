// XLA FFI handler for NVIDIA GPUs: the LARS step on all leaves in two kernel
// launches per group of up to kMaxLeaves leaves (four with grad_clip_norm), in
// the style of apex's multi_tensor_apply: a table of leaf pointers passed as a
// kernel argument, blocks mapped to (leaf, chunk) by a search over the table.
//
//   [clip]  SqKernel      per-block partial sums of g^2 (lars_cuda_clip.cuh)
//   [clip]  NormKernel    one block adds them in index order -> global norm
//           SumsKernel    per-block partial sums of w^2 and g^2 (g after
//                         clipping and decay); the leaf's last block to finish
//                         adds the leaf's partials in block order and writes
//                         the trust ratio (once per leaf)
//           UpdateKernel  every block reads its leaf's ratio and updates its
//                         chunk
//   or      FusedKernel   (option fused) both, in one launch of a persistent
//                         grid that claims the items in order, each update
//                         soon after its leaf's sums, so that its second read
//                         of w and g can come from L2 (lars_cuda_fused.cuh)
//
// Data movement: each thread takes groups of kVec(P) = 16 / sizeof(P)
// consecutive elements, loaded and stored 16 bytes at a time (params and
// momentum; narrower grads in one 8- or 4-byte access) when every buffer of
// the leaf is 16-byte aligned, element by element otherwise and for the last,
// partial group. The squares of one group are added in the compute dtype C,
// left to right, then that group's sum is added in float64: a float64
// conversion per group, not per element.
//
// Determinism: every sum has a fixed order (fixed chunks, fixed groups, a
// fixed block size and reduction tree, blocks added in index order), whatever
// the alignment path or the order in which blocks finish; the only atomic is
// the per-leaf ticket that elects the block which adds the leaf's partials, so
// results are bitwise identical from run to run. The elementwise arithmetic is
// the reference's, compiled with -fmad=false.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "lars_common.h"
#include "lars_cuda_access.cuh"
#include "lars_ffi_leaf.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace lars_native {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kGpuChunk = 16384;  // elements per block of the two launches
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
  int32_t chunk;      // elements per block: kGpuChunk, or the fused launch's option
  int32_t slot_base;  // partial-sum slot of this launch's first block
  int32_t leaf_base;  // global index of this launch's first leaf (ratio, ticket)
  GpuLeaf leaves[kMaxLeaves];
};

struct DeviceHyper {
  Hyper h;
  const float* lr;
  const double* global_norm;  // written by NormKernel (nullptr without clipping)
};

// Whether the leaf's buffers allow 16-byte groups (a null `out` is aligned).
__device__ __forceinline__ bool LeafAligned(const GpuLeaf& leaf) {
  return Aligned16(leaf.w) && Aligned16(leaf.g) && Aligned16(leaf.v) && Aligned16(leaf.out) &&
         Aligned16(leaf.v_out);
}

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

// --- kernels ------------------------------------------------------------------
#include "lars_cuda_clip.cuh"  // [clip] SqKernel, NormKernel: the global norm

template <class P, class G>
__device__ void ChunkSums(const GpuLeaf& leaf, int64_t begin, int64_t end, const DeviceHyper& d,
                          double* sw, double* sg) {
  using C = typename ComputeOf<P>::type;
  constexpr int kV = kVec<P>;
  const P* w = static_cast<const P*>(leaf.w);
  const G* g = static_cast<const G*>(leaf.g);
  const Eff<C> eff(d, leaf.decay != 0);
  const bool aligned = Aligned16(leaf.w) && Aligned16(leaf.g);
  double aw = 0.0, ag = 0.0;
  // Thread k takes groups k, k + kThreads, ... of the chunk; only the last
  // group of a leaf can be partial.
  for (int64_t i = begin + int64_t(threadIdx.x) * kV; i < end; i += kThreads * kV) {
    const bool vec = aligned && i + kV <= end;
    P wx[kV];
    G gx[kV];
    LoadGroup<kV>(w, i, end, vec, wx);
    LoadGroup<kV>(g, i, end, vec, gx);
    C pw = C(0), pg = C(0);
#pragma unroll
    for (int k = 0; k < kV; ++k) {
      const C wc = Ld<C>(wx[k]);
      // A padded element (past the end) is 0 in w and g, and stays 0 after
      // clipping and decay, so it adds nothing.
      const C gc = eff(Ld<C>(gx[k]), wc);
      pw = pw + wc * wc;
      pg = pg + gc * gc;
    }
    aw += static_cast<double>(pw);
    ag += static_cast<double>(pg);
  }
  *sw = aw;
  *sg = ag;
}

// The leaf's sums from its partials: thread k adds a contiguous run of them in
// block order, then the fixed tree (the same bits whichever block does it).
__device__ void LeafSums(const double* partial, int slot, int nb, double* shared, double* sw,
                         double* sg) {
  const int per = (nb + kThreads - 1) / kThreads;
  double aw = 0.0, ag = 0.0;
  for (int k = threadIdx.x * per; k < min(nb, (int)(threadIdx.x + 1) * per); ++k) {
    // Written by other blocks of this launch: read through L2, not L1.
    aw += __ldcg(partial + 2 * (slot + k));
    ag += __ldcg(partial + 2 * (slot + k) + 1);
  }
  *sw = BlockSum(aw, shared);
  *sg = BlockSum(ag, shared);
}

// Block `block`'s sums: its partials, and, in the leaf's last block to finish
// (elected by the leaf's ticket), the leaf's sums and trust ratio. Returns
// whether this block wrote the ratio (in every thread).
__device__ bool SumsItem(const GpuTable& t, const DeviceHyper& d, double* partial,
                         double* ratios, unsigned int* tickets, int block) {
  __shared__ double shared[kThreads];
  __shared__ bool last;
  const int li = FindLeaf(t, block);
  const GpuLeaf& leaf = t.leaves[li];
  const int64_t chunk = block - leaf.first_block;
  const int64_t begin = chunk * t.chunk;
  const int64_t end = min(leaf.n, begin + t.chunk);
  double sw = 0.0, sg = 0.0;
  if (leaf.trust) {
#define LARS_CALL(P, G) ChunkSums<P, G>(leaf, begin, end, d, &sw, &sg)
    LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
  }
  const double tw = BlockSum(sw, shared);
  const double tg = BlockSum(sg, shared);
  if (threadIdx.x == 0) {
    partial[2 * (t.slot_base + block)] = tw;
    partial[2 * (t.slot_base + block) + 1] = tg;
    __threadfence();  // the partials are visible before the ticket is taken
    const unsigned int ticket = atomicAdd(tickets + t.leaf_base + li, 1u);
    last = ticket == static_cast<unsigned int>(leaf.num_blocks - 1);
  }
  __syncthreads();
  const bool wrote = last;
  __syncthreads();  // `last` is read before a next item of this block sets it
  if (!wrote) return false;
  // The leaf's last block: every partial of the leaf is written.
  __threadfence();
  double lw, lg;
  LeafSums(partial, leaf.slot, leaf.num_blocks, shared, &lw, &lg);
  if (threadIdx.x == 0) {
    double ratio;
    if (leaf.p == kF64) {
      ratio = trust_ratio<double>(lw, lg, leaf.trust != 0, d.h);
    } else {
      ratio = static_cast<double>(trust_ratio<float>(lw, lg, leaf.trust != 0, d.h));
    }
    ratios[t.leaf_base + li] = ratio;
    *leaf.ratio_out = static_cast<float>(ratio);
  }
  return true;
}

__global__ void SumsKernel(const __grid_constant__ GpuTable t, DeviceHyper d, double* partial,
                           double* ratios, unsigned int* tickets) {
  SumsItem(t, d, partial, ratios, tickets, blockIdx.x);
}

template <class P, class G>
__device__ void ChunkUpdate(const GpuLeaf& leaf, int64_t begin, int64_t end, const DeviceHyper& d,
                            double ratio) {
  using C = typename ComputeOf<P>::type;
  constexpr int kV = kVec<P>;
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
  const bool aligned = LeafAligned(leaf);
  // Thread k takes groups k, k + kThreads, ... of the chunk; only the last
  // group of a leaf can be partial.
  for (int64_t i = begin + int64_t(threadIdx.x) * kV; i < end; i += kThreads * kV) {
    const bool vec = aligned && i + kV <= end;
    P wx[kV];
    G gx[kV];
    C vx[kV];
    LoadGroup<kV>(w, i, end, vec, wx);
    LoadGroup<kV>(g, i, end, vec, gx);
    LoadGroup<kV>(v, i, end, vec, vx);
    C vn[kV];
    P ox[kV];
#pragma unroll
    for (int k = 0; k < kV; ++k) {
      const C wc = Ld<C>(wx[k]);
      const C gc = eff(Ld<C>(gx[k]), wc);
      const C u = lr_in * (gc * r);
      vn[k] = u + mu * vx[k];
      const C dir = h.nesterov ? u + mu * vn[k] : vn[k];
      const C step = lr_out * dir;
      ox[k] = h.mode == kWriteParams ? St<P>::Do(wc + Ld<C>(St<P>::Do(-step))) : St<P>::Do(-step);
    }
    StoreGroup<kV>(v_out, i, end, vec, vn);
    if (h.mode != kMomentumOnly) StoreGroup<kV>(out, i, end, vec, ox);
  }
}

// Block `block`'s update, with its leaf's trust ratio.
__device__ void UpdateItem(const GpuTable& t, const DeviceHyper& d, int block, double ratio) {
  const GpuLeaf& leaf = t.leaves[FindLeaf(t, block)];
  const int64_t chunk = block - leaf.first_block;
  const int64_t begin = chunk * t.chunk;
  const int64_t end = min(leaf.n, begin + t.chunk);
#define LARS_CALL(P, G) ChunkUpdate<P, G>(leaf, begin, end, d, ratio)
  LARS_DISPATCH_PAIR(leaf, LARS_CALL)
#undef LARS_CALL
}

__global__ void UpdateKernel(const __grid_constant__ GpuTable t, DeviceHyper d,
                             const double* ratios) {
  const int block = blockIdx.x;
  UpdateItem(t, d, block, ratios[t.leaf_base + FindLeaf(t, block)]);
}

#include "lars_cuda_fused.cuh"  // FusedKernel: both passes in one launch

// --- handler ------------------------------------------------------------------
// The fused launch's persistent grid: the device's SMs times FusedKernel's
// blocks per SM (at most `per_sm`, when > 0), asked once per device.
ffi::Error FusedGrid(int64_t per_sm_cap, int* blocks) {
  static std::atomic<int> known[64][2] = {};  // SMs, blocks per SM
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  const bool cacheable = err == cudaSuccess && device >= 0 && device < 64;
  if (cacheable && known[device][0].load() > 0) {
    sms = known[device][0].load();
    per_sm = known[device][1].load();
  } else {
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    }
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, FusedKernel, kThreads, 0);
    }
    if (err != cudaSuccess) {
      return ffi::Error(ffi::ErrorCode::kInternal,
                        std::string("lars native step: the device's SMs and occupancy: ") +
                            cudaGetErrorString(err));
    }
    if (cacheable) {
      known[device][1].store(per_sm);
      known[device][0].store(sms);  // last: a reader that sees the SMs sees both
    }
  }
  if (per_sm_cap > 0) per_sm = static_cast<int>(std::min<int64_t>(per_sm, per_sm_cap));
  *blocks = std::max(1, sms * per_sm);
  return ffi::Error::Success();
}

ffi::Error StepCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer lr,
                    ffi::RemainingArgs args, ffi::RemainingRets rets, double momentum,
                    double weight_decay, double trust_coefficient, double eps, double trust_clip,
                    double grad_clip_norm, double grad_clip_value, bool nesterov,
                    bool lr_inside_momentum, int32_t mode, ffi::Span<const uint8_t> decay_mask,
                    ffi::Span<const uint8_t> trust_mask, int64_t /*num_threads*/,
                    ffi::Span<const int64_t> fused) {
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
  // fused: {lookahead, chunk, blocks per SM}; a lookahead of 0 runs two launches.
  if (fused.size() != 3 || fused[0] < 0 || fused[0] > (int64_t{1} << 30) ||
      (fused[0] > 0 && (fused[1] < 1024 || fused[1] > (1 << 20) || fused[1] % 1024 != 0)) ||
      fused[2] < 0) {
    return Invalid("fused must be {lookahead in [0, 2^30], chunk a multiple of 1024 up to "
                   "2^20, blocks per SM >= 0}");
  }
  const int64_t chunk = fused[0] > 0 ? fused[1] : kGpuChunk;
  d.lr = static_cast<const float*>(lr.untyped_data());

  // Leaves, grouped into launches of at most kMaxLeaves.
  std::vector<GpuTable> tables;
  int32_t total_blocks = 0;
  for (size_t i = 0; i < num_leaves; ++i) {
    LeafBuffers b;
    if (ffi::Error err = ReadLeafBuffers(args, rets, num_leaves, outs, i, &b); err.failure()) {
      return err;
    }
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
    const int64_t blocks = std::max<int64_t>(1, (leaf.n + chunk - 1) / chunk);
    if (blocks > (int64_t{1} << 30)) return LeafInvalid(i, "too large");
    if (tables.empty() || tables.back().num_leaves == kMaxLeaves ||
        tables.back().num_blocks + blocks > (int64_t{1} << 30)) {
      tables.emplace_back();
      GpuTable& t = tables.back();
      t.num_leaves = 0;
      t.num_blocks = 0;
      t.chunk = static_cast<int32_t>(chunk);
      t.slot_base = total_blocks;
      t.leaf_base = static_cast<int32_t>(i);
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

  // Scratch: 2 partials per block, one more per block with clipping, the norm,
  // one ratio per leaf; then per leaf a ticket counter and a ready flag, and
  // per launch a FusedState: the counters, zeroed here.
  const size_t doubles = 3 * static_cast<size_t>(total_blocks) + 1 + num_leaves;
  const size_t counters = 2 * num_leaves + 3 * tables.size();
  const size_t bytes = doubles * sizeof(double) + counters * sizeof(unsigned int);
  auto mem = scratch.Allocate(bytes, alignof(double));
  if (!mem.has_value()) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "lars native step: no scratch memory");
  }
  double* partial = static_cast<double*>(*mem);
  double* sq_partial = partial + 2 * static_cast<size_t>(total_blocks);
  double* norm = sq_partial + total_blocks;
  double* ratios = norm + 1;
  unsigned int* tickets = reinterpret_cast<unsigned int*>(ratios + num_leaves);
  unsigned int* ready = tickets + num_leaves;
  FusedState* states = reinterpret_cast<FusedState*>(ready + num_leaves);
  static_assert(sizeof(FusedState) == 3 * sizeof(unsigned int));
  if (cudaError_t err = cudaMemsetAsync(tickets, 0, counters * sizeof(unsigned int), stream);
      err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("lars native step: cudaMemsetAsync failed: ") +
                          cudaGetErrorString(err));
  }

  if (d.h.has_clip_norm) {
    for (const GpuTable& t : tables) SqKernel<<<t.num_blocks, kThreads, 0, stream>>>(t, sq_partial);
    NormKernel<<<1, kThreads, 0, stream>>>(sq_partial, total_blocks, norm);
    d.global_norm = norm;
  }
  if (fused[0] > 0) {
    int resident = 0;
    if (ffi::Error err = FusedGrid(fused[2], &resident); err.failure()) return err;
    const auto lookahead = static_cast<unsigned int>(fused[0]);
    for (size_t k = 0; k < tables.size(); ++k) {
      const GpuTable& t = tables[k];
      FusedKernel<<<std::min(t.num_blocks, resident), kThreads, 0, stream>>>(
          t, d, partial, ratios, tickets, ready, states + k, lookahead);
    }
  } else {
    for (const GpuTable& t : tables) {
      SumsKernel<<<t.num_blocks, kThreads, 0, stream>>>(t, d, partial, ratios, tickets);
    }
    for (const GpuTable& t : tables) {
      UpdateKernel<<<t.num_blocks, kThreads, 0, stream>>>(t, d, ratios);
    }
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
                              lars_native::BindStep(ffi::Ffi::Bind()
                                                        .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                        .Ctx<ffi::ScratchAllocator>()));
