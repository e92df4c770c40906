// XLA FFI handler for the CPU: one custom call performs the LARS step on all
// leaves (the "multi-tensor" step).
//
// Work is cut into items that any worker may take, in list order, from a shared
// counter (the calling thread and `num_threads - 1` tasks on XLA's intra-op
// thread pool):
//   * small leaves (<= kSmallLeaf elements): one item computes the sums, the
//     trust ratio and the update, so the update pass reads the leaf from cache;
//   * large leaves (several kChunk-element chunks): one item a thread; a worker
//     that takes one claims chunks of the leaf one share at a time (an atomic
//     counter) and sums them, until the leaf's ratio is ready (the worker that
//     sums the last chunk adds the partials in chunk order and computes it);
//     then it updates the chunks it summed, the last first, while they are in
//     its own cache. A worker waits only when every share is claimed, that is
//     for chunks that running workers are summing, so no wait lasts for ever
//     (a pool thread that starts late finds the shares claimed and goes on).
//     The earlier orders, where a large leaf's update items come later in the
//     list than its norm items (after a short lookahead when the leaf fits in
//     the cache, or after the next large leaf's norm items), stay for timing
//     comparisons (CpuTuning::schedule);
//   * with grad_clip_norm, a first round of items sums g^2 for the global norm,
//     and every item of the main round waits for it.
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

// ---------------------------------------------------------------------------
// The work list.

enum Kind : uint8_t { kSq, kSmall, kSum, kUpd, kShare };

struct Item {
  Kind kind;
  int32_t leaf;
  int64_t begin;
  int64_t end;
  int32_t slot;    // partial-sum slot (kSq, kSum); the leaf's group (kShare)
  int32_t wait;    // group that must be ready first, or -1
  int32_t signal;  // group this item counts towards, or -1
};

struct Group {
  std::atomic<int32_t> remaining{0};
  std::atomic<uint8_t> ready{0};
  int32_t leaf = -1;  // -1: the global gradient norm
  int32_t first_slot = 0;
  int32_t num_slots = 0;
  // A leaf run in shares (kShare): the shares, and the next one to claim.
  int32_t share_chunks = 0;
  int32_t num_shares = 0;
  std::atomic<int32_t> next_share{0};
};

struct Job {
  const CpuKernels* kernels = nullptr;
  Hyper hyper;
  StepScalars scalars;
  std::vector<LeafView> leaves;
  std::vector<float*> ratio_out;
  std::vector<double> ratio;  // per leaf, a value of the leaf's compute dtype
  std::vector<Item> items;
  std::unique_ptr<Group[]> groups;
  std::vector<double> sq_slots;
  std::vector<double> sum_slots;  // two per slot: sum w^2, sum g^2
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> helper_items{0};
  CpuTuning tuning;  // the settings read when the step started
};

inline void SpinUntil(const std::atomic<uint8_t>& flag) {
  for (int spins = 0; flag.load(std::memory_order_acquire) == 0; ++spins) {
    if (spins < 2048) {
      LARS_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

double LeafRatio(const Job& job, int32_t leaf, double sum_w2, double sum_g2) {
  const LeafView& lv = job.leaves[leaf];
  if (lv.p == kF64) return trust_ratio<double>(sum_w2, sum_g2, lv.trust, job.hyper);
  return static_cast<double>(trust_ratio<float>(sum_w2, sum_g2, lv.trust, job.hyper));
}

void SetRatio(Job& job, int32_t leaf, double r) {
  job.ratio[leaf] = r;
  *job.ratio_out[leaf] = static_cast<float>(r);
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

// The chunks of a share of a leaf run in shares.
inline int32_t ShareBegin(const Group& grp, int32_t share) {
  return std::min(share * grp.share_chunks, grp.num_slots);
}

// Sums a share's chunks into their slots and counts them towards the group.
void SumShare(Job& job, int32_t g, int32_t share) {
  Group& grp = job.groups[g];
  const LeafView& leaf = job.leaves[grp.leaf];
  const int32_t c0 = ShareBegin(grp, share), c1 = ShareBegin(grp, share + 1);
  if ((job.tuning.phases & CpuTuning::kNormPass) != 0) {
    for (int32_t c = c0; c < c1; ++c) {
      job.kernels->sums(leaf, c * kChunk, std::min(leaf.n, (c + 1) * kChunk), job.hyper,
                        job.scalars, static_cast<int>(job.tuning.sum_streams),
                        &job.sum_slots[2 * (grp.first_slot + c)]);
    }
  }
  if (grp.remaining.fetch_sub(c1 - c0, std::memory_order_acq_rel) == c1 - c0) {
    Finalize(job, g);
    grp.ready.store(1, std::memory_order_release);
  }
}

// A kShare item: claims shares of the leaf and sums them until the leaf's
// ratio is ready (a worker that finds every share claimed waits for the
// ratio: every share is then being summed by a running worker, so no wait
// lasts for ever); then updates the shares it summed, the last one first and
// each from its end, while they are in its own cache.
void RunShare(Job& job, int32_t g) {
  Group& grp = job.groups[g];
  std::vector<int32_t> mine;
  for (;;) {
    if (!mine.empty() && grp.ready.load(std::memory_order_acquire) != 0) break;
    const int32_t share = grp.next_share.fetch_add(1, std::memory_order_relaxed);
    if (share >= grp.num_shares) {
      if (mine.empty()) return;  // every share is another worker's
      SpinUntil(grp.ready);
      break;
    }
    SumShare(job, g, share);
    mine.push_back(share);
  }
  if ((job.tuning.phases & CpuTuning::kUpdatePass) == 0) return;
  const LeafView& leaf = job.leaves[grp.leaf];
  for (auto share = mine.rbegin(); share != mine.rend(); ++share) {
    for (int32_t c = ShareBegin(grp, *share + 1) - 1; c >= ShareBegin(grp, *share); --c) {
      job.kernels->update(leaf, c * kChunk, std::min(leaf.n, (c + 1) * kChunk), job.hyper,
                          job.scalars, static_cast<int>(job.tuning.update_streams),
                          job.ratio[grp.leaf]);
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
    if (it.signal >= 0) {
      Group& grp = job.groups[it.signal];
      if (grp.remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        Finalize(job, it.signal);
        grp.ready.store(1, std::memory_order_release);
      }
    }
    job.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

int64_t NumChunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

int64_t ElementBytes(Dtype d) { return d == kF64 ? 8 : d == kF32 ? 4 : 2; }

// Bytes the norm pass reads per element of a leaf (w and g), and the bytes
// its update pass touches besides (v read; w and v written in place).
int64_t NormBytes(const LeafView& lv) { return ElementBytes(lv.p) + ElementBytes(lv.gt); }
int64_t MomentumBytes(const LeafView& lv) { return lv.p == kF64 ? 8 : 4; }

// Builds the work list (see the top of this file) for `tuning.schedule`:
// kShares (the default), or one of the earlier orders kept for timing
// comparisons: kLookahead (a large leaf's update items queued after some of
// the following work when the leaf and that work fit in `tuning.cache_bytes`)
// or kNextLeaf (a large leaf's update items after the next large leaf's norm
// items, first chunk first).
void BuildItems(Job& job, const CpuTuning& tuning, int64_t threads) {
  const bool next_leaf = tuning.schedule == CpuTuning::kNextLeaf;
  const bool shares = tuning.schedule == CpuTuning::kShares;
  const int64_t cache_bytes = tuning.cache_bytes;
  const int32_t num_leaves = static_cast<int32_t>(job.leaves.size());
  const bool clip = job.hyper.has_clip_norm;
  int32_t num_groups = clip ? 1 : 0;
  for (const LeafView& lv : job.leaves) {
    if (lv.trust && lv.n > kSmallLeaf) ++num_groups;
  }
  job.groups.reset(new Group[num_groups]);
  int32_t next_group = 0;
  const int32_t global = clip ? next_group++ : -1;

  if (clip) {
    Group& grp = job.groups[global];
    grp.leaf = -1;
    int32_t slots = 0;
    for (int32_t i = 0; i < num_leaves; ++i) {
      const int64_t n = job.leaves[i].n;
      for (int64_t c = 0; c < NumChunks(n); ++c) {
        job.items.push_back(Item{kSq, i, c * kChunk, std::min(n, (c + 1) * kChunk), slots++,
                                 -1, global});
      }
    }
    grp.num_slots = slots;
    grp.remaining.store(slots, std::memory_order_relaxed);
    job.sq_slots.assign(slots, 0.0);
    if (slots == 0) grp.ready.store(1, std::memory_order_relaxed);
  }

  // A large leaf's update items wait for its ratio, so they are queued after
  // some of the work that follows its norm items (`lookahead` bytes of reads:
  // enough that no worker waits for the last norm item), unless the leaf and
  // that work would not fit in the cache together: then right after them. The
  // updates run from the leaf's end back to its start, so they first meet the
  // chunks the norm pass read last, which are the likeliest still cached.
  struct Pending {
    int32_t leaf;
    int32_t group;
    int64_t limit;  // bytes of work after the norm items before the updates
    int64_t seen;
  };
  std::vector<Pending> pending;  // in leaf order
  const int64_t budget = cache_bytes - cache_bytes / 4;  // room for other data
  const int64_t lookahead = 2 * threads * kChunk * 8;  // two float32 w, g chunks a thread
  auto emit_updates = [&](int32_t leaf, int32_t wait, bool backwards) {
    const int64_t n = job.leaves[leaf].n;
    const int64_t chunks = NumChunks(n);
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t c = backwards ? chunks - 1 - k : k;
      job.items.push_back(
          Item{kUpd, leaf, c * kChunk, std::min(n, (c + 1) * kChunk), -1, wait, -1});
    }
  };
  auto flush = [&](bool all) {
    size_t done = 0;
    while (done < pending.size() && (all || pending[done].seen >= pending[done].limit)) {
      emit_updates(pending[done].leaf, pending[done].group, !next_leaf);
      ++done;
    }
    pending.erase(pending.begin(), pending.begin() + done);
  };
  auto count = [&](int64_t bytes) {
    for (Pending& p : pending) p.seen += bytes;
    flush(false);
  };

  int32_t sum_slots = 0;
  for (int32_t i = 0; i < num_leaves; ++i) {
    const LeafView& lv = job.leaves[i];
    if (lv.n == 0) {
      SetRatio(job, i, LeafRatio(job, i, 0.0, 0.0));  // 1, or trust_clip when below 1
      continue;
    }
    if (lv.n <= kSmallLeaf) {
      job.items.push_back(Item{kSmall, i, 0, lv.n, -1, global, -1});
      count(lv.n * (NormBytes(lv) + MomentumBytes(lv)));
      continue;
    }
    if (!lv.trust) {
      SetRatio(job, i, 1.0);
      emit_updates(i, global, false);
      count(lv.n * (NormBytes(lv) + MomentumBytes(lv)));
      continue;
    }
    const int32_t g = next_group++;
    Group& grp = job.groups[g];
    grp.leaf = i;
    grp.first_slot = sum_slots;
    grp.num_slots = static_cast<int32_t>(NumChunks(lv.n));
    grp.remaining.store(grp.num_slots, std::memory_order_relaxed);
    if (shares) {
      grp.share_chunks =
          static_cast<int32_t>(std::min<int64_t>(tuning.share_chunks, grp.num_slots));
      grp.num_shares = (grp.num_slots + grp.share_chunks - 1) / grp.share_chunks;
      for (int64_t t = 0; t < std::min<int64_t>(threads, grp.num_shares); ++t) {
        job.items.push_back(Item{kShare, i, 0, lv.n, g, global, -1});
      }
      sum_slots += grp.num_slots;
      count(lv.n * (NormBytes(lv) + MomentumBytes(lv)));
      continue;
    }
    for (int64_t c = 0; c < NumChunks(lv.n); ++c) {
      const int64_t end = std::min(lv.n, (c + 1) * kChunk);
      job.items.push_back(Item{kSum, i, c * kChunk, end, sum_slots++, global, g});
      count((end - c * kChunk) * NormBytes(lv));
    }
    if (next_leaf) {
      flush(true);
      pending.push_back(Pending{i, g, INT64_MAX, 0});
      continue;
    }
    const int64_t room = budget - lv.n * (NormBytes(lv) + MomentumBytes(lv));
    pending.push_back(Pending{i, g, std::max<int64_t>(0, std::min(lookahead, room)), 0});
    flush(false);
  }
  flush(true);
  job.sum_slots.assign(2 * static_cast<size_t>(sum_slots), 0.0);
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

// Builds the work list when the caller gives the trust ratios and the global
// gradient norm (sharded params: the sums are taken over every shard): update
// items only, no sums.
void BuildUpdateItems(Job& job, const std::vector<double>& given) {
  const int32_t num_leaves = static_cast<int32_t>(job.leaves.size());
  for (int32_t i = 0; i < num_leaves; ++i) {
    const LeafView& lv = job.leaves[i];
    // The ratio as a value of the leaf's compute dtype, as LeafRatio gives it.
    SetRatio(job, i, lv.p == kF64 ? given[i] : static_cast<double>(static_cast<float>(given[i])));
    const int64_t n = lv.n;
    for (int64_t c = 0; c < NumChunks(n); ++c) {
      job.items.push_back(Item{kUpd, i, c * kChunk, std::min(n, (c + 1) * kChunk), -1, -1, -1});
    }
  }
}

ffi::Error StepCpu(ffi::ThreadPool pool, ffi::AnyBuffer lr, ffi::RemainingArgs args,
                   ffi::RemainingRets rets, double momentum, double weight_decay,
                   double trust_coefficient, double eps, double trust_clip,
                   double grad_clip_norm, double grad_clip_value, bool nesterov,
                   bool lr_inside_momentum, int32_t mode, ffi::Span<const uint8_t> decay_mask,
                   ffi::Span<const uint8_t> trust_mask, int64_t num_threads) {
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
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
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
