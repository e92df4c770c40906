// The global-norm clip's kernels (grad_clip_norm), run before the sums:
// SqKernel writes each block's partial sum of g^2, NormKernel adds them in
// block order and writes the global norm. Included by lars_cuda.cu in its
// kernels section, after GpuTable, BlockSum and FindLeaf.

template <class P, class G>
__device__ double ChunkSumG2(const GpuLeaf& leaf, int64_t begin, int64_t end) {
  using C = typename ComputeOf<P>::type;
  constexpr int kV = kVec<P>;
  const G* g = static_cast<const G*>(leaf.g);
  const bool aligned = Aligned16(leaf.g);
  double acc = 0.0;
  // Thread k takes groups k, k + kThreads, ... of the chunk; only the last
  // group of a leaf can be partial.
  for (int64_t i = begin + int64_t(threadIdx.x) * kV; i < end; i += kThreads * kV) {
    const bool vec = aligned && i + kV <= end;
    G gx[kV];
    LoadGroup<kV>(g, i, end, vec, gx);
    C part = C(0);
#pragma unroll
    for (int k = 0; k < kV; ++k) {
      const C x = Ld<C>(gx[k]);
      part = part + x * x;
    }
    acc += static_cast<double>(part);
  }
  return acc;
}

__global__ void SqKernel(const __grid_constant__ GpuTable t, double* partial) {
  __shared__ double shared[kThreads];
  const int li = FindLeaf(t, blockIdx.x);
  const GpuLeaf& leaf = t.leaves[li];
  const int64_t chunk = blockIdx.x - leaf.first_block;
  const int64_t begin = chunk * t.chunk;
  const int64_t end = min(leaf.n, begin + t.chunk);
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
