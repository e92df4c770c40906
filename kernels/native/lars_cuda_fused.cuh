// FusedKernel: the sums and the updates of one launch's leaves in a single
// launch (backend option `fused`), so that an update re-reads w and g while
// they are still in L2. Included by lars_cuda.cu after SumsItem and UpdateItem
// (its kernels section, which bench/cuda_emulate.py also compiles for the CPU).
//
// Items: every chunk (t.chunk elements, the backend option `chunk`) of the
// launch twice, sums items S_0..S_{N-1} and update items U_0..U_{N-1}, both in
// leaf order (item k is the chunk that block k of SumsKernel and UpdateKernel
// would take at that chunk size). A persistent grid's blocks claim items
// until every update is claimed; thread 0 claims:
//   1. U_u, u the next unclaimed update, when u's leaf has its trust ratio
//      (`ready`), by compare-and-swap on `u_next`: updates are claimed in order
//      and never wait;
//   2. else S_s, s the next unclaimed sums item (atomicAdd on `s_next`), when
//      s lies in the window: inside u's leaf, or s < u + lookahead. The window
//      keeps the sums ahead of the updates by about a leaf and `lookahead`
//      chunks, what L2 has to hold between an element's two reads. s is read
//      with u (one round trip) and the add races other claims, so the window
//      can be overrun by the number of blocks claiming at that moment; a
//      wait decided on an old s is sound (s only grows: the window is full);
//   3. else it waits (a nanosleep) and tries again.
// No schedule deadlocks: a block waits only when the window is full, that is
// when every sums item of u's leaf is claimed; each is held by a running
// block that finishes it without waiting, and the last of them marks the
// leaf ready, which enables U_u. A block holding an item never waits.
//
// The sums, the partial order and the ratio are those of SumsKernel, the
// update that of UpdateKernel: results are bitwise those of the two launches
// at the same chunk size. A wait longer than kFusedSpinLimit tries (tens of
// seconds: each try is two or three L2 round trips and a 200 ns sleep) is a
// bug: the block sets `abort` and the awaited leaf's ratio output to NaN, and
// every block stops claiming, so that the step ends with a visible error
// instead of hanging.

// Per launch, zeroed before it: the next unclaimed items and the abort flag.
struct FusedState {
  unsigned int s_next;
  unsigned int u_next;
  unsigned int abort;
};

constexpr int kFusedDone = -1 - (1 << 30);  // no item: every update is claimed
constexpr long long kFusedSpinLimit = 1ll << 24;

__device__ __forceinline__ unsigned int LoadVolatile(const unsigned int* p) {
  return *static_cast<const volatile unsigned int*>(p);
}

__device__ __forceinline__ void Pause() {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700) || defined(LARS_EMULATE_CONCURRENT_BLOCKS)
  __nanosleep(200);  // in bench/cuda_emulation (concurrent blocks): a yield
#endif
}

// The next item of the calling block (thread 0): s >= 0 for S_s, -1 - u for
// U_u, kFusedDone when there is none left.
__device__ int FusedClaim(const GpuTable& t, FusedState* st, const unsigned int* ready,
                          unsigned int lookahead) {
  const unsigned int n = static_cast<unsigned int>(t.num_blocks);
  for (long long tries = 0;; ++tries) {
    // Three independent loads, in flight together: one round trip, not three.
    const unsigned int abort = LoadVolatile(&st->abort);
    const unsigned int u = LoadVolatile(&st->u_next);
    const unsigned int s = LoadVolatile(&st->s_next);  // may be older than the flag below
    if (abort != 0 || u >= n) return kFusedDone;
    const int li = FindLeaf(t, static_cast<int>(u));
    const GpuLeaf& leaf = t.leaves[li];
    if (LoadVolatile(ready + t.leaf_base + li) != 0) {
      if (atomicCAS(&st->u_next, u, u + 1) == u) {
        __threadfence();  // the ratio is read after the flag
        return -1 - static_cast<int>(u);
      }
      continue;  // another block took U_u
    }
    const unsigned int leaf_end = static_cast<unsigned int>(leaf.first_block + leaf.num_blocks);
    if (s < n && (s < leaf_end || s < u + lookahead)) {
      const unsigned int mine = atomicAdd(&st->s_next, 1u);
      if (mine < n) return static_cast<int>(mine);
      continue;
    }
    if (tries > kFusedSpinLimit) {
      st->abort = 1u;
      *leaf.ratio_out = __int_as_float(0x7fc00000);  // NaN
      __threadfence();
      return kFusedDone;
    }
    Pause();
  }
}

// At least 4 blocks of kThreads per SM, the occupancy of UpdateKernel: 64
// registers and no spills for sm_90 with nvcc 13.0 (70 registers, 3 blocks,
// without the bound); bench/kernel_report.py shows the figures.
__global__ void __launch_bounds__(kThreads, 4)
    FusedKernel(const __grid_constant__ GpuTable t, DeviceHyper d, double* partial,
                double* ratios, unsigned int* tickets, unsigned int* ready, FusedState* st,
                unsigned int lookahead) {
  __shared__ int item;
  for (;;) {
    if (threadIdx.x == 0) item = FusedClaim(t, st, ready, lookahead);
    __syncthreads();
    const int it = item;
    __syncthreads();  // every thread has read `item` before thread 0 claims again
    if (it == kFusedDone) return;
    if (it >= 0) {
      if (SumsItem(t, d, partial, ratios, tickets, it) && threadIdx.x == 0) {
        __threadfence();  // the ratio is visible before the flag
        atomicExch(ready + t.leaf_base + FindLeaf(t, it), 1u);
      }
    } else {
      const int u = -1 - it;
      UpdateItem(t, d, u, __ldcg(ratios + t.leaf_base + FindLeaf(t, u)));
    }
  }
}
