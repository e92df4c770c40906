// Process-wide settings of the CPU handler, read at the start of every step
// (see lars_cpu_settings.h), and their C entry points for Python (ctypes).
//
// The cache size (what the earlier lookahead schedule counts on; the default
// schedule needs none) is the largest data or unified cache of the first core as
// Linux's sysfs describes it (/sys/devices/system/cpu/cpu0/cache), else
// sysconf's level 3 or level 2 size, else 8 MiB. sysfs comes first because on
// some virtual machines sysconf reports the whole host's last-level cache
// (e.g. 384 MiB where the guest shares a 32 MiB one).
#include "lars_cpu_settings.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace lars_native {
namespace {

std::atomic<int64_t> g_phases{CpuTuning::kBothPasses};
std::atomic<int64_t> g_cache_bytes{-1};  // -1: the detected size
std::atomic<int64_t> g_schedule{CpuTuning().schedule};
std::atomic<int64_t> g_sum_streams{CpuTuning().sum_streams};
std::atomic<int64_t> g_update_streams{CpuTuning().update_streams};
std::atomic<int64_t> g_share_chunks{CpuTuning().share_chunks};

int64_t DetectCacheBytes() {
  int64_t best = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream type_file(dir + "/type"), size_file(dir + "/size");
    std::string type, size;
    if (!(type_file >> type) || !(size_file >> size)) continue;
    if (type == "Instruction") continue;
    char* rest = nullptr;
    int64_t bytes = std::strtoll(size.c_str(), &rest, 10);
    if (rest != nullptr && (*rest == 'K' || *rest == 'k')) bytes <<= 10;
    if (rest != nullptr && (*rest == 'M' || *rest == 'm')) bytes <<= 20;
    if (rest != nullptr && (*rest == 'G' || *rest == 'g')) bytes <<= 30;
    best = std::max(best, bytes);
  }
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  if (best <= 0) best = std::max<int64_t>(sysconf(_SC_LEVEL3_CACHE_SIZE), 0);
  if (best <= 0) best = std::max<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE), 0);
#endif
  return best > 0 ? best : int64_t{8} << 20;
}

int64_t CacheBytes() {
  static const int64_t detected = DetectCacheBytes();
  const int64_t forced = g_cache_bytes.load(std::memory_order_relaxed);
  return forced >= 0 ? forced : detected;
}

}  // namespace

CpuTuning CurrentTuning() {
  CpuTuning t;
  t.phases = g_phases.load(std::memory_order_relaxed);
  t.cache_bytes = CacheBytes();
  t.schedule = g_schedule.load(std::memory_order_relaxed);
  t.sum_streams = g_sum_streams.load(std::memory_order_relaxed);
  t.update_streams = g_update_streams.load(std::memory_order_relaxed);
  t.share_chunks = g_share_chunks.load(std::memory_order_relaxed);
  return t;
}

}  // namespace lars_native

// Sets a setting for the following steps; -1 restores its default. Returns 0,
// or -1 for an unknown name or a bad value. Names: "schedule" (2: shares, the
// default; 1: the earlier cache-aware lookahead; 0: the earliest order, a large
// leaf's updates after the next large leaf's norms), "share_chunks" (chunks a
// share, >= 1; default 1), "cache_bytes" (the cache schedule 1 counts on),
// "phases" (1: the norm pass alone, 2: the update pass alone with ratios of 1,
// 3: both, the default; one alone is for timing), "sum_streams" (1, 2 or 4;
// default 2) and "update_streams" (1, 2, 4 or 8; default 4): how many parts of
// a work item the norm and update loops read side by side. Only "phases" and
// "sum_streams" change results.
extern "C" int LarsNativeCpuTune(const char* name, int64_t value) {
  using lars_native::CpuTuning;
  const std::string key(name);
  const CpuTuning defaults;
  std::atomic<int64_t>* target = nullptr;
  int64_t fallback = 0;
  bool ok = false;
  if (key == "cache_bytes") {
    target = &lars_native::g_cache_bytes, fallback = -1, ok = value >= 0;
  } else if (key == "schedule") {
    target = &lars_native::g_schedule, fallback = defaults.schedule;
    ok = value >= CpuTuning::kNextLeaf && value <= CpuTuning::kShares;
  } else if (key == "phases") {
    target = &lars_native::g_phases, fallback = CpuTuning::kBothPasses;
    ok = value >= 1 && value <= 3;
  } else if (key == "sum_streams") {
    target = &lars_native::g_sum_streams, fallback = defaults.sum_streams;
    ok = value == 1 || value == 2 || value == 4;
  } else if (key == "update_streams") {
    target = &lars_native::g_update_streams, fallback = defaults.update_streams;
    ok = value == 1 || value == 2 || value == 4 || value == 8;
  } else if (key == "share_chunks") {
    target = &lars_native::g_share_chunks, fallback = defaults.share_chunks, ok = value >= 1;
  } else {
    return -1;
  }
  if (value == -1) value = fallback, ok = true;
  if (!ok) return -1;
  target->store(value, std::memory_order_relaxed);
  return 0;
}

// The cache size, in bytes, the schedule counts on (detected, or set).
extern "C" int64_t LarsNativeCpuCacheBytes() { return lars_native::CacheBytes(); }
