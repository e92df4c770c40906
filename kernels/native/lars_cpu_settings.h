// Process-wide settings of the CPU handler (lars_cpu_settings.cc): the tuning
// knobs used to time variants of the step (the schedule among them) and the
// cache size the earlier lookahead schedule counts on. None of them changes a
// bit of the results, except "phases" (one pass alone) and "sum_streams" (the
// order of the norms' sums), for timing only.
#ifndef LARS_NATIVE_CPU_SETTINGS_H_
#define LARS_NATIVE_CPU_SETTINGS_H_

#include <cstdint>

namespace lars_native {

struct CpuTuning {
  static constexpr int64_t kNormPass = 1;
  static constexpr int64_t kUpdatePass = 2;
  static constexpr int64_t kBothPasses = 3;
  int64_t phases = kBothPasses;  // which passes run
  // The order of the work (lars_cpu_schedule.cc): shares (the default), or one of the
  // earlier orders kept for timing comparisons.
  static constexpr int64_t kNextLeaf = 0;
  static constexpr int64_t kLookahead = 1;
  static constexpr int64_t kShares = 2;
  int64_t schedule = kShares;
  int64_t cache_bytes = 0;  // the cache kLookahead counts on (set or detected)
  // How many parts of a work item the loops read side by side (more streams
  // in flight: on a core whose outstanding misses, not the memory, are the
  // limit, 4 streams read faster than 2). The norms' number is part of the
  // numerics; the update's is not.
  int64_t sum_streams = 2;     // 1, 2 or 4
  int64_t update_streams = 4;  // 1, 2, 4 or 8
  // kShares: a leaf of several chunks is claimed in shares of this many
  // chunks; a worker sums the shares it claims, then updates them.
  int64_t share_chunks = 1;
};

// The settings for a step about to run.
CpuTuning CurrentTuning();

}  // namespace lars_native

#endif  // LARS_NATIVE_CPU_SETTINGS_H_
