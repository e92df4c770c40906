// XLA FFI handler for the CPU: one custom call performs the LARS step on all
// leaves (the "multi-tensor" step).
//
// The step's work is a list of items (lars_cpu_schedule.cc says which, and in
// which order) that the calling thread and `num_threads - 1` tasks on XLA's
// intra-op thread pool take from a shared counter. A large leaf's kShare items
// run here: a worker claims chunks of the leaf one share at a time (an atomic
// counter) and sums them until the leaf's ratio is ready (the worker that sums
// the last chunk adds the partials in chunk order and computes it), then
// updates the chunks it summed, the last first, while they are in its own
// cache. A worker waits only when every share is claimed, that is for chunks
// that running workers are summing, so no wait lasts for ever (a pool thread
// that starts late finds the shares claimed and goes on); the caller never
// waits for a helper to start.
// Every reduction has a fixed order (fixed chunks, fixed lanes, partials added
// in index order), so results are bitwise identical from run to run and do not
// depend on the number of threads or on which worker ran which item.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LARS_PAUSE() _mm_pause()
#else
#define LARS_PAUSE() std::this_thread::yield()
#endif

#include "lars_common.h"
#include "lars_cpu_kernels.h"
#include "lars_cpu_settings.h"
#include "lars_cpu_work.h"
#include "lars_ffi_leaf.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace lars_native {

namespace {

// ---------------------------------------------------------------------------
// Instruction-set selection.

std::atomic<const CpuKernels*> g_kernels{nullptr};

// Diagnostics of the last step: threads used, items run off the caller, and
// the nanoseconds the handler ran.
std::atomic<int64_t> g_last_threads{0};
std::atomic<int64_t> g_last_helper_items{0};
std::atomic<int64_t> g_last_nanos{0};
std::atomic<int64_t> g_last_start{0};  // steady_clock nanoseconds at the start

const CpuKernels* KernelsByName(const std::string& name) {
  if (name == "base") return &isa_base::Kernels();
#if defined(LARS_HAVE_AVX2)
  if (name == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    return &isa_avx2::Kernels();
  }
#endif
#if defined(LARS_HAVE_AVX512)
  if (name == "avx512" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c")) {
    return &isa_avx512::Kernels();
  }
#endif
  return nullptr;
}

const CpuKernels& ActiveKernels() {
  const CpuKernels* k = g_kernels.load(std::memory_order_acquire);
  if (k != nullptr) return *k;
  for (const char* name : {"avx512", "avx2", "base"}) {
    k = KernelsByName(name);
    if (k != nullptr) break;
  }
  g_kernels.store(k, std::memory_order_release);
  return *k;
}

inline void SpinUntil(const std::atomic<uint8_t>& flag) {
  for (int spins = 0; flag.load(std::memory_order_acquire) == 0; ++spins) {
    if (spins < 2048) {
      LARS_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

void Finalize(Job& job, int32_t group_index) {
  const Group& grp = job.groups[group_index];
  if (grp.leaf < 0) {
    double total = 0.0;
    for (int32_t k = 0; k < grp.num_slots; ++k) total += job.sq_slots[grp.first_slot + k];
    job.scalars.global_norm = std::sqrt(total);
    return;
  }
  double sw = 0.0, sg = 0.0;
  for (int32_t k = 0; k < grp.num_slots; ++k) {
    sw += job.sum_slots[2 * (grp.first_slot + k)];
    sg += job.sum_slots[2 * (grp.first_slot + k) + 1];
  }
  SetRatio(job, grp.leaf, LeafRatio(job, grp.leaf, sw, sg));
}

// Counts `n` finished sums towards a group; the worker that counts the last
// ones computes the group's result and marks it ready.
void CountSums(Job& job, int32_t group_index, int32_t n) {
  Group& grp = job.groups[group_index];
  if (grp.remaining.fetch_sub(n, std::memory_order_acq_rel) == n) {
    Finalize(job, group_index);
    grp.ready.store(1, std::memory_order_release);
  }
}

void Execute(Job& job, const Item& it) {
  const LeafView& leaf = job.leaves[it.leaf];
  const CpuKernels& k = *job.kernels;
  const bool sums = (job.tuning.phases & CpuTuning::kNormPass) != 0;
  const bool update = (job.tuning.phases & CpuTuning::kUpdatePass) != 0;
  const int sum_streams = static_cast<int>(job.tuning.sum_streams);
  const int update_streams = static_cast<int>(job.tuning.update_streams);
  switch (it.kind) {
    case kSq:
      if (sums) k.sum_g2(leaf, it.begin, it.end, &job.sq_slots[it.slot]);
      break;
    case kSmall: {
      double r = 1.0;
      if (leaf.trust && sums) {
        double s[2];
        k.sums(leaf, it.begin, it.end, job.hyper, job.scalars, sum_streams, s);
        r = LeafRatio(job, it.leaf, s[0], s[1]);
      }
      SetRatio(job, it.leaf, r);
      if (update) {
        k.update(leaf, it.begin, it.end, job.hyper, job.scalars, update_streams, r);
      }
      break;
    }
    case kSum:
      if (sums) {
        k.sums(leaf, it.begin, it.end, job.hyper, job.scalars, sum_streams,
               &job.sum_slots[2 * it.slot]);
      }
      break;
    case kShare:  // run by RunShare
      break;
    case kUpd:
      if (update) {
        k.update(leaf, it.begin, it.end, job.hyper, job.scalars, update_streams,
                 job.ratio[it.leaf]);
      }
      break;
  }
}

// The first chunk of a share of a leaf run in shares.
inline int32_t ShareBegin(const Group& grp, int32_t share) {
  return std::min(share * grp.share_chunks, grp.num_slots);
}

// A kShare item: claims shares of the leaf and sums their chunks until the
// leaf's ratio is ready (a worker that finds every share claimed waits for the
// ratio: every share is then being summed by a running worker, so no wait
// lasts for ever; the worker whose sums complete the leaf computes the ratio);
// then updates the shares it summed, the last one first and each from its end,
// while they are in its own cache.
void RunShare(Job& job, int32_t g) {
  Group& grp = job.groups[g];
  const LeafView& leaf = job.leaves[grp.leaf];
  std::vector<int32_t> mine;
  for (;;) {
    if (!mine.empty() && grp.ready.load(std::memory_order_acquire) != 0) break;
    const int32_t share = grp.next_share.fetch_add(1, std::memory_order_relaxed);
    if (share >= grp.num_shares) {
      if (mine.empty()) return;  // every share is another worker's
      SpinUntil(grp.ready);
      break;
    }
    const int32_t c0 = ShareBegin(grp, share), c1 = ShareBegin(grp, share + 1);
    for (int32_t c = c0; c < c1; ++c) {
      Execute(job, ChunkItem(kSum, grp.leaf, leaf.n, c, grp.first_slot + c, -1, -1));
    }
    CountSums(job, g, c1 - c0);
    mine.push_back(share);
  }
  for (auto share = mine.rbegin(); share != mine.rend(); ++share) {
    for (int32_t c = ShareBegin(grp, *share + 1) - 1; c >= ShareBegin(grp, *share); --c) {
      Execute(job, ChunkItem(kUpd, grp.leaf, leaf.n, c, -1, -1, -1));
    }
  }
}

// Runs items until none is left; returns how many it ran.
int64_t RunItems(Job& job) {
  const int64_t n = static_cast<int64_t>(job.items.size());
  for (int64_t ran = 0;; ++ran) {
    const int64_t index = job.next.fetch_add(1, std::memory_order_relaxed);
    if (index >= n) return ran;
    const Item& it = job.items[index];
    if (it.wait >= 0) SpinUntil(job.groups[it.wait].ready);
    if (it.kind == kShare) {
      RunShare(job, it.slot);
      job.done.fetch_add(1, std::memory_order_acq_rel);
      continue;
    }
    Execute(job, it);
    if (it.signal >= 0) CountSums(job, it.signal, 1);
    job.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

// A skipped step (skip_nonfinite, a gradient is not finite): params and
// momentum stay as they are (their results alias the operands), updates are
// -0.0 (x + -0.0 == x for every x), ratios 1 (the caller keeps the old ones).
void SkipStep(Job& job) {
  for (size_t i = 0; i < job.leaves.size(); ++i) {
    const LeafView& lv = job.leaves[i];
    *job.ratio_out[i] = 1.0f;
    if (job.hyper.mode != kWriteUpdates || lv.n == 0) continue;
    switch (lv.p) {
      case kF32:
        std::fill_n(static_cast<float*>(lv.out), lv.n, -0.0f);
        break;
      case kF64:
        std::fill_n(static_cast<double*>(lv.out), lv.n, -0.0);
        break;
      default:  // bfloat16, float16: the sign bit alone
        std::fill_n(static_cast<uint16_t*>(lv.out), lv.n, static_cast<uint16_t>(0x8000));
        break;
    }
  }
}

ffi::Error StepCpu(ffi::ThreadPool pool, ffi::AnyBuffer lr, ffi::RemainingArgs args,
                   ffi::RemainingRets rets, double momentum, double weight_decay,
                   double trust_coefficient, double eps, double trust_clip,
                   double grad_clip_norm, double grad_clip_value, bool nesterov,
                   bool lr_inside_momentum, int32_t mode, ffi::Span<const uint8_t> decay_mask,
                   ffi::Span<const uint8_t> trust_mask, int64_t num_threads,
                   ffi::Span<const int64_t> /*fused: the CUDA handler's*/) {
  const auto start = std::chrono::steady_clock::now();
  const size_t num_leaves = decay_mask.size();
  auto job = std::make_shared<Job>();
  job->kernels = &ActiveKernels();
  job->tuning = CurrentTuning();
  const CpuTuning& tuning = job->tuning;
  size_t outs = 0;
  StepExtras extras;
  if (ffi::Error err = ReadStepHeader(lr, args, rets, num_leaves, trust_mask.size(), momentum,
                                      weight_decay, trust_coefficient, eps, trust_clip,
                                      grad_clip_norm, grad_clip_value, nesterov,
                                      lr_inside_momentum, mode, &job->hyper, &outs,
                                      &extras);
      err.failure()) {
    return err;
  }
  job->scalars.lr = static_cast<double>(*static_cast<const float*>(lr.untyped_data()));

  job->leaves.resize(num_leaves);
  job->ratio_out.resize(num_leaves);
  job->ratio.assign(num_leaves, 1.0);
  for (size_t i = 0; i < num_leaves; ++i) {
    LeafBuffers b;
    if (ffi::Error err = ReadLeafBuffers(args, rets, num_leaves, outs, i, &b); err.failure()) {
      return err;
    }
    LeafView& lv = job->leaves[i];
    lv.n = b.n;
    lv.p = b.p;
    lv.gt = b.gt;
    lv.w = b.w;
    lv.g = b.g;
    lv.v = b.v;
    lv.out = b.out;
    lv.v_out = b.v_out;
    lv.decay = decay_mask[i] != 0;
    lv.trust = trust_mask[i] != 0;
    job->ratio_out[i] = b.ratio_out;
  }

  int64_t threads = num_threads > 0 ? num_threads : pool.num_threads();
  size_t next_extra = extras.first;
  if (extras.finite_flag) {
    bool finite = true;
    if (ffi::Error err = ReadFiniteFlag(args, next_extra++, &finite); err.failure()) return err;
    if (!finite) {
      SkipStep(*job);
      return ffi::Error::Success();
    }
  }
  if (extras.given_ratios) {
    std::vector<double> given;
    if (ffi::Error err = ReadGivenRatios(args, next_extra, num_leaves, &given,
                                         &job->scalars.global_norm);
        err.failure()) {
      return err;
    }
    BuildUpdateItems(*job, given);
  } else {
    BuildItems(*job, tuning, std::max<int64_t>(threads, 1));
  }
  const int64_t num_items = static_cast<int64_t>(job->items.size());
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, num_items));
  // Helpers that start late find no items left and return; the job stays alive
  // through their shared_ptr. The caller never waits for a helper to start, so
  // a busy or absent pool cannot deadlock the step.
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([job]() { job->helper_items.fetch_add(RunItems(*job)); });
  }
  RunItems(*job);
  for (int spins = 0; job->done.load(std::memory_order_acquire) < num_items; ++spins) {
    if (spins < 4096) {
      LARS_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
  g_last_threads.store(threads, std::memory_order_relaxed);
  g_last_helper_items.store(job->helper_items.load(), std::memory_order_relaxed);
  g_last_nanos.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                         std::chrono::steady_clock::now() - start)
                         .count(),
                     std::memory_order_relaxed);
  g_last_start.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                         start.time_since_epoch())
                         .count(),
                     std::memory_order_relaxed);
  return ffi::Error::Success();
}

}  // namespace


}  // namespace lars_native

XLA_FFI_DEFINE_HANDLER_SYMBOL(LarsNativeStepCpu, lars_native::StepCpu,
                              lars_native::BindStep(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

// The instruction set the CPU loops use ("avx512", "avx2" or "base").
extern "C" const char* LarsNativeCpuIsa() { return lars_native::ActiveKernels().isa; }

// Forces an instruction set for the following steps; returns 0 on success, -1
// when `name` is not built or not supported by this processor.
extern "C" int LarsNativeSetCpuIsa(const char* name) {
  const lars_native::CpuKernels* k = lars_native::KernelsByName(name);
  if (k == nullptr) return -1;
  lars_native::g_kernels.store(k, std::memory_order_release);
  return 0;
}

// Diagnostics of the last step: the number of threads it used, and how many
// work items pool threads ran (the rest ran on the calling thread). Items still
// being run when the call returned are not counted.
extern "C" void LarsNativeLastStepThreads(int64_t* threads, int64_t* helper_items) {
  *threads = lars_native::g_last_threads.load(std::memory_order_relaxed);
  *helper_items = lars_native::g_last_helper_items.load(std::memory_order_relaxed);
}

// The nanoseconds the last CPU step spent in the handler (0 before any step).
extern "C" int64_t LarsNativeLastStepNanos() {
  return lars_native::g_last_nanos.load(std::memory_order_relaxed);
}

// When the last CPU step's handler started, in nanoseconds of the monotonic
// clock (std::chrono::steady_clock; on Linux the clock of Python's
// time.perf_counter_ns and time.monotonic_ns), 0 before any step.
extern "C" int64_t LarsNativeLastStepStartNanos() {
  return lars_native::g_last_start.load(std::memory_order_relaxed);
}
