// The CPU handler's work list (lars_cpu_work.h): which items a step has, and
// in which order the workers take them.
//
//   * small leaves (<= kSmallLeaf elements): one item computes the sums, the
//     trust ratio and the update, so the update pass reads the leaf from cache;
//   * large leaves (several kChunk-element chunks), with the default schedule
//     (kShares): one kShare item a thread; a worker that takes one claims
//     chunks of the leaf one share at a time and sums them until the leaf's
//     ratio is ready, then updates the chunks it summed, the last first, while
//     they are in its own cache (lars_cpu.cc runs it). The earlier orders, where
//     a large leaf's update items come later in the list than its norm items
//     (kLookahead: after a short lookahead when the leaf fits in the cache;
//     kNextLeaf: after the next large leaf's norm items), stay for timing
//     comparisons;
//   * with grad_clip_norm, a first round of items sums g^2 for the global norm,
//     and every item of the main round waits for it.
// The order decides only which worker runs which range when, never which
// elements a sum adds or in which order: every schedule gives the same bits.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "lars_common.h"
#include "lars_cpu_kernels.h"
#include "lars_cpu_settings.h"
#include "lars_cpu_work.h"

namespace lars_native {

double LeafRatio(const Job& job, int32_t leaf, double sum_w2, double sum_g2) {
  const LeafView& lv = job.leaves[leaf];
  if (lv.p == kF64) return trust_ratio<double>(sum_w2, sum_g2, lv.trust, job.hyper);
  return static_cast<double>(trust_ratio<float>(sum_w2, sum_g2, lv.trust, job.hyper));
}

void SetRatio(Job& job, int32_t leaf, double r) {
  job.ratio[leaf] = r;
  *job.ratio_out[leaf] = static_cast<float>(r);
}

namespace {

int64_t NumChunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

int64_t ElementBytes(Dtype d) { return d == kF64 ? 8 : d == kF32 ? 4 : 2; }

// Bytes the norm pass reads per element of a leaf (w and g), and the bytes
// its update pass touches besides (v read; w and v written in place).
int64_t NormBytes(const LeafView& lv) { return ElementBytes(lv.p) + ElementBytes(lv.gt); }
int64_t MomentumBytes(const LeafView& lv) { return lv.p == kF64 ? 8 : 4; }

}  // namespace

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
        job.items.push_back(ChunkItem(kSq, i, n, c, slots++, -1, global));
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
      job.items.push_back(ChunkItem(kUpd, leaf, n, c, -1, wait, -1));
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
      continue;
    }
    for (int64_t c = 0; c < NumChunks(lv.n); ++c) {
      const Item& item =
          job.items.emplace_back(ChunkItem(kSum, i, lv.n, c, sum_slots++, global, g));
      count((item.end - item.begin) * NormBytes(lv));
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
      job.items.push_back(ChunkItem(kUpd, i, n, c, -1, -1, -1));
    }
  }
}

}  // namespace lars_native
