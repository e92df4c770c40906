// What one x86-64 core with AVX-512 can stream, on ResNet-50's parameter count
// (25,557,032 float32 values per array): the raw loops behind the native CPU
// step's two passes, beside the copy floors, without XLA or the handler.
//
//   g++ -O2 -mavx512f -o /tmp/cpu_stream_probe bench/cpu_stream_probe.cc
//   taskset -c 1 /tmp/cpu_stream_probe [rounds]
//
// Variants, one thread, interleaved round after round (median and min in ms):
//   * update, regular or streaming (non-temporal) stores: the in-place update
//     pass (read w, g, v; write w, v: 20 B/param) with a precomputed ratio;
//   * norm pass: sums of w^2 and g^2 (read w, g: 8 B/param);
//   * memcpy, and in-place x * c with regular or streaming stores, each over
//     10 B/param (20 B/param moved): the copy floors.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

float* Alloc(long n, float value) {
  float* p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
  for (long i = 0; i < n; ++i) p[i] = value;
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  const long n = 25557032;
  const long nc = n * 10 / 4;  // float32 values in 10 B/param
  float* w = Alloc(n, 0.01f);
  float* g = Alloc(n, 0.001f);
  float* v = Alloc(n, 0.0f);
  float* src = Alloc(nc, 1.0f);
  float* dst = Alloc(nc, 0.0f);
  volatile float one = 1.0f;  // keeps x * c from being folded away
  auto update = [&](bool stream) {
    const __m512 r = _mm512_set1_ps(0.5f), mu = _mm512_set1_ps(0.9f);
    const __m512 lr = _mm512_set1_ps(0.1f), wd = _mm512_set1_ps(1e-4f);
    for (long i = 0; i + 16 <= n; i += 16) {
      __m512 wi = _mm512_load_ps(w + i), gi = _mm512_load_ps(g + i), vi = _mm512_load_ps(v + i);
      gi = _mm512_add_ps(gi, _mm512_mul_ps(wd, wi));
      vi = _mm512_add_ps(_mm512_mul_ps(lr, _mm512_mul_ps(gi, r)), _mm512_mul_ps(mu, vi));
      wi = _mm512_sub_ps(wi, vi);
      if (stream) {
        _mm512_stream_ps(v + i, vi);
        _mm512_stream_ps(w + i, wi);
      } else {
        _mm512_store_ps(v + i, vi);
        _mm512_store_ps(w + i, wi);
      }
    }
    _mm_sfence();
  };
  auto norms = [&]() {
    __m512 a = _mm512_setzero_ps(), b = a;
    for (long i = 0; i + 16 <= n; i += 16) {
      const __m512 wi = _mm512_load_ps(w + i), gi = _mm512_load_ps(g + i);
      a = _mm512_add_ps(a, _mm512_mul_ps(wi, wi));
      b = _mm512_add_ps(b, _mm512_mul_ps(gi, gi));
    }
    volatile float sink = _mm512_reduce_add_ps(a) + _mm512_reduce_add_ps(b);
    (void)sink;
  };
  auto scale = [&](bool stream) {
    const __m512 c = _mm512_set1_ps(one);
    for (long i = 0; i + 16 <= nc; i += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_load_ps(dst + i), c);
      if (stream) {
        _mm512_stream_ps(dst + i, x);
      } else {
        _mm512_store_ps(dst + i, x);
      }
    }
    _mm_sfence();
  };
  const char* names[] = {"update, regular stores",    "update, streaming stores",
                         "norm pass (read w, g)",     "memcpy 10 B/param",
                         "in-place x*c 10 B/param",   "in-place x*c, streaming"};
  std::vector<double> t[6];
  for (int round = 0; round < rounds; ++round) {
    for (int k = 0; k < 6; ++k) {
      const double start = Now();
      switch (k) {
        case 0: update(false); break;
        case 1: update(true); break;
        case 2: norms(); break;
        case 3: std::memcpy(dst, src, nc * 4); break;
        case 4: scale(false); break;
        default: scale(true); break;
      }
      t[k].push_back(Now() - start);
    }
  }
  for (int k = 0; k < 6; ++k) {
    std::sort(t[k].begin(), t[k].end());
    std::printf("%-26s median %7.2f ms  min %7.2f ms\n", names[k], 1e3 * t[k][t[k].size() / 2],
                1e3 * t[k][0]);
  }
  return 0;
}
