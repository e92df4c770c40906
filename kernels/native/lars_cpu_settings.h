// Process-wide settings of the CPU handler (lars_cpu_settings.cc): the cache
// size its schedule counts on and the tuning knobs used to time variants of the
// step. None of them changes a bit of the results, except "phases" (one pass
// alone, for timing only).
#ifndef LARS_NATIVE_CPU_SETTINGS_H_
#define LARS_NATIVE_CPU_SETTINGS_H_

#include <cstdint>

namespace lars_native {

struct CpuTuning {
  static constexpr int64_t kNormPass = 1;
  static constexpr int64_t kUpdatePass = 2;
  static constexpr int64_t kBothPasses = 3;
  int64_t phases = kBothPasses;  // which passes run
  int64_t cache_bytes = 0;       // the cache the schedule counts on (set or detected)
  int64_t schedule = 1;          // 1: cache-aware; 0: the earlier next-leaf order
};

// The settings for a step about to run.
CpuTuning CurrentTuning();

}  // namespace lars_native

#endif  // LARS_NATIVE_CPU_SETTINGS_H_
