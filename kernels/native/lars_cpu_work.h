// The CPU handler's work list (lars_cpu_schedule.cc builds it, lars_cpu.cc
// runs it): items that any worker takes in list order from a shared counter,
// and the groups whose sums an item waits for.
#ifndef LARS_NATIVE_CPU_WORK_H_
#define LARS_NATIVE_CPU_WORK_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "lars_common.h"
#include "lars_cpu_kernels.h"
#include "lars_cpu_settings.h"

namespace lars_native {

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

// Chunk c (kChunk elements, the last one shorter) of a leaf of n elements as
// an item.
inline Item ChunkItem(Kind kind, int32_t leaf, int64_t n, int64_t c, int32_t slot, int32_t wait,
                      int32_t signal) {
  return Item{kind, leaf, c * kChunk, std::min(n, (c + 1) * kChunk), slot, wait, signal};
}

// The trust ratio of a leaf from its sums, as a value of its compute dtype.
double LeafRatio(const Job& job, int32_t leaf, double sum_w2, double sum_g2);

// Records a leaf's ratio for its update items and in its float32 result.
void SetRatio(Job& job, int32_t leaf, double r);

// The work list of a step (lars_cpu_schedule.cc): with `threads` workers, in
// the order tuning.schedule says; or, with the trust ratios given, update
// items only.
void BuildItems(Job& job, const CpuTuning& tuning, int64_t threads);
void BuildUpdateItems(Job& job, const std::vector<double>& given);

}  // namespace lars_native

#endif  // LARS_NATIVE_CPU_WORK_H_
