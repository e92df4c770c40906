// What one x86-64 core with AVX-512 can stream, on ResNet-50's parameter count
// (25,557,032 float32 values per array): the raw loops behind the native CPU
// step's two passes, beside the copy floors, without XLA or the handler.
//
//   g++ -O2 -mavx512f -pthread -o /tmp/cpu_stream_probe bench/cpu_stream_probe.cc
//   taskset -c 1 /tmp/cpu_stream_probe [rounds]    (the tables up to the last)
//   /tmp/cpu_stream_probe [rounds]                 (the last table's 2 threads)
//
// Variants, one thread, interleaved round after round (median and min in ms):
//   * update, regular or streaming (non-temporal) stores: the in-place update
//     pass (read w, g, v; write w, v: 20 B/param) with a precomputed ratio;
//   * norm pass: sums of w^2 and g^2 (read w, g: 8 B/param);
//   * memcpy, and in-place x * c with regular or streaming stores, each over
//     10 B/param (20 B/param moved): the copy floors;
//   * per layer, over ResNet-50's 161 arrays (the same parameter count, each
//     array allocated on its own): the update alone, the norm pass alone, and
//     both as the native step orders them for a large leaf (the whole leaf's
//     norms in 65,536-element chunks, then its update, last chunk first, so
//     that the second read of w and g can hit the cache);
// then, per array size from 1 to 64 MiB, the read bandwidth of a sum over the
// array right after a 255 MB stream has pushed it out of every cache (first
// read) and of the same sum run again at once (second read): where the second
// read is no faster, the cache level that would hold the array does not help a
// re-read on this core (e.g. a large shared L3 on some virtual machines);
// last, the norm pass and the update over the whole arrays in 65,536-element
// chunks taken in turn by 1 or 2 threads (as the native handler's workers take
// its items), each chunk read as 1, 2 or 4 parts side by side: where more
// parts (more streams in flight) read faster, a core's own outstanding misses,
// not the memory, are its limit.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
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

// ResNet-50's parameter arrays in the order of bench.workloads.resnet50_shapes:
// the stem, then per bottleneck block three convolutions with their batch-norm
// scale and bias (and a projection shortcut in each stage's first block), the
// classifier last.
std::vector<long> ResNet50Sizes() {
  std::vector<long> sizes = {7 * 7 * 3 * 64, 64, 64};
  long cin = 64;
  const long widths[4] = {64, 128, 256, 512}, blocks[4] = {3, 4, 6, 3};
  for (int stage = 0; stage < 4; ++stage) {
    const long w = widths[stage];
    for (long b = 0; b < blocks[stage]; ++b) {
      sizes.insert(sizes.end(), {cin * w, w, w, 9 * w * w, w, w, w * 4 * w, 4 * w, 4 * w});
      if (b == 0) sizes.insert(sizes.end(), {cin * 4 * w, 4 * w, 4 * w});
      cin = 4 * w;
    }
  }
  sizes.insert(sizes.end(), {2048 * 1000, 1000});
  return sizes;
}

struct Layer {
  float* w;
  float* g;
  float* v;
  long n;
};

void UpdateRange(const Layer& l, long begin, long end) {
  const __m512 r = _mm512_set1_ps(0.5f), mu = _mm512_set1_ps(0.9f);
  const __m512 lr = _mm512_set1_ps(0.1f), wd = _mm512_set1_ps(1e-4f);
  long i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 wi = _mm512_loadu_ps(l.w + i), gi = _mm512_loadu_ps(l.g + i);
    __m512 vi = _mm512_loadu_ps(l.v + i);
    gi = _mm512_add_ps(gi, _mm512_mul_ps(wd, wi));
    vi = _mm512_add_ps(_mm512_mul_ps(lr, _mm512_mul_ps(gi, r)), _mm512_mul_ps(mu, vi));
    _mm512_storeu_ps(l.v + i, vi);
    _mm512_storeu_ps(l.w + i, _mm512_sub_ps(wi, vi));
  }
  for (; i < end; ++i) {
    l.v[i] = 0.9f * l.v[i] + 0.05f * (l.g[i] + 1e-4f * l.w[i]);
    l.w[i] -= l.v[i];
  }
}

float NormRange(const Layer& l, long begin, long end) {
  __m512 a = _mm512_setzero_ps(), b = a;
  long i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 wi = _mm512_loadu_ps(l.w + i), gi = _mm512_loadu_ps(l.g + i);
    a = _mm512_add_ps(a, _mm512_mul_ps(wi, wi));
    b = _mm512_add_ps(b, _mm512_mul_ps(gi, gi));
  }
  float s = _mm512_reduce_add_ps(a) + _mm512_reduce_add_ps(b);
  for (; i < end; ++i) s += l.w[i] * l.w[i] + l.g[i] * l.g[i];
  return s;
}

// One pass over every layer: kind 0 update, 1 norms, 2 both (see the top).
float PerLayer(const std::vector<Layer>& layers, int kind) {
  constexpr long kChunk = 65536;
  float sink = 0.0f;
  for (const Layer& l : layers) {
    const long chunks = (l.n + kChunk - 1) / kChunk;
    if (kind != 0) {
      for (long c = 0; c < chunks; ++c) sink += NormRange(l, c * kChunk, std::min(l.n, (c + 1) * kChunk));
    }
    if (kind != 1) {
      for (long c = chunks - 1; c >= 0; --c) UpdateRange(l, c * kChunk, std::min(l.n, (c + 1) * kChunk));
    }
  }
  return sink;
}

float SumRange(const float* p, long n) {
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  long i = 0;
  for (; i + 64 <= n; i += 64) {
    a = _mm512_add_ps(a, _mm512_load_ps(p + i));
    b = _mm512_add_ps(b, _mm512_load_ps(p + i + 16));
    c = _mm512_add_ps(c, _mm512_load_ps(p + i + 32));
    d = _mm512_add_ps(d, _mm512_load_ps(p + i + 48));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
  for (; i < n; ++i) s += p[i];
  return s;
}

// The re-read table (see the top): `flush` is read in between to evict.
void Reread(const float* flush, long flush_n, int rounds) {
  volatile float sink = 0.0f;
  std::printf("%-10s %18s %18s\n", "array", "first read GB/s", "second read GB/s");
  for (long mib : {1L, 2L, 3L, 4L, 8L, 16L, 32L, 64L}) {
    const long n = mib << 18;  // float32 values in mib MiB
    float* p = Alloc(n, 1.0f);
    std::vector<double> first, second;
    for (int round = 0; round < rounds; ++round) {
      sink = sink + SumRange(flush, flush_n);
      const double t0 = Now();
      sink = sink + SumRange(p, n);
      const double t1 = Now();
      sink = sink + SumRange(p, n);
      const double t2 = Now();
      first.push_back(t1 - t0);
      second.push_back(t2 - t1);
    }
    std::sort(first.begin(), first.end());
    std::sort(second.begin(), second.end());
    const double bytes = 4.0 * n;
    std::printf("%4ld MiB %18.1f %18.1f\n", mib, bytes / first[first.size() / 2] * 1e-9,
                bytes / second[second.size() / 2] * 1e-9);
    std::free(p);
  }
}

// Norms (update = false) or update of [begin, end) as `parts` parts side by
// side: part j is [begin + j * q, begin + (j + 1) * q), the rest one at a time.
float PartsRange(const Layer& l, long begin, long end, int parts, bool update) {
  const long q = (end - begin) / parts / 16 * 16;
  const __m512 r = _mm512_set1_ps(0.05f), mu = _mm512_set1_ps(0.9f);
  const __m512 wd = _mm512_set1_ps(1e-4f);
  __m512 acc[8];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  for (long i = begin; i < begin + q; i += 16) {
    for (int j = 0; j < parts; ++j) {
      const long k = i + j * q;
      const __m512 wi = _mm512_loadu_ps(l.w + k), gi = _mm512_loadu_ps(l.g + k);
      if (update) {
        __m512 vi = _mm512_loadu_ps(l.v + k);
        vi = _mm512_add_ps(_mm512_mul_ps(r, _mm512_add_ps(gi, _mm512_mul_ps(wd, wi))),
                           _mm512_mul_ps(mu, vi));
        _mm512_storeu_ps(l.v + k, vi);
        _mm512_storeu_ps(l.w + k, _mm512_sub_ps(wi, vi));
      } else {
        acc[2 * j] = _mm512_add_ps(acc[2 * j], _mm512_mul_ps(wi, wi));
        acc[2 * j + 1] = _mm512_add_ps(acc[2 * j + 1], _mm512_mul_ps(gi, gi));
      }
    }
  }
  float s = 0.0f;
  for (const __m512& a : acc) s += _mm512_reduce_add_ps(a);
  const long rest = begin + parts * q;
  if (update) {
    UpdateRange(l, rest, end);
  } else {
    s += NormRange(l, rest, end);
  }
  return s;
}

// The parts table (see the top): `threads` threads take the chunks in turn.
void PartsTable(const Layer& whole, int rounds) {
  constexpr long kChunk = 65536;
  std::printf("%-8s %-6s %14s %14s\n", "threads", "parts", "norms GB/s", "update GB/s");
  for (int threads : {1, 2}) {
    std::vector<double> t[3][2];
    for (int round = 0; round < rounds; ++round) {
      for (int parts : {1, 2, 4}) {
        for (int update = 0; update < 2; ++update) {
          const double start = Now();
          std::vector<std::thread> pool;
          for (int k = 0; k < threads; ++k) {
            pool.emplace_back([&, k] {
              volatile float sink = 0.0f;
              for (long c = k * kChunk; c < whole.n; c += threads * kChunk) {
                sink = sink + PartsRange(whole, c, std::min(whole.n, c + kChunk), parts, update);
              }
            });
          }
          for (std::thread& th : pool) th.join();
          t[parts / 2][update].push_back(Now() - start);
        }
      }
    }
    for (int parts : {1, 2, 4}) {
      double gbs[2];
      for (int update = 0; update < 2; ++update) {
        std::vector<double>& v = t[parts / 2][update];
        std::sort(v.begin(), v.end());
        gbs[update] = (update ? 12.0 : 8.0) * whole.n / v[v.size() / 2] * 1e-9;  // reads
      }
      std::printf("%-8d %-6d %14.1f %14.1f\n", threads, parts, gbs[0], gbs[1]);
    }
  }
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
  std::vector<Layer> layers;
  long total = 0;
  for (long size : ResNet50Sizes()) {
    layers.push_back(Layer{Alloc(size, 0.01f), Alloc(size, 0.001f), Alloc(size, 0.0f), size});
    total += size;
  }
  if (total != n || layers.size() != 161) {
    std::fprintf(stderr, "ResNet-50 sizes: %ld params in %zu arrays\n", total, layers.size());
    return 1;
  }
  volatile float layer_sink = 0.0f;
  const char* names[] = {"update, regular stores",    "update, streaming stores",
                         "norm pass (read w, g)",     "memcpy 10 B/param",
                         "in-place x*c 10 B/param",   "in-place x*c, streaming",
                         "per layer: update",         "per layer: norms",
                         "per layer: norms, update"};
  constexpr int kVariants = 9;
  std::vector<double> t[kVariants];
  for (int round = 0; round < rounds; ++round) {
    for (int k = 0; k < kVariants; ++k) {
      const double start = Now();
      switch (k) {
        case 0: update(false); break;
        case 1: update(true); break;
        case 2: norms(); break;
        case 3: std::memcpy(dst, src, nc * 4); break;
        case 4: scale(false); break;
        case 5: scale(true); break;
        default: layer_sink = layer_sink + PerLayer(layers, k - 6); break;
      }
      t[k].push_back(Now() - start);
    }
  }
  for (int k = 0; k < kVariants; ++k) {
    std::sort(t[k].begin(), t[k].end());
    std::printf("%-26s median %7.2f ms  min %7.2f ms\n", names[k], 1e3 * t[k][t[k].size() / 2],
                1e3 * t[k][0]);
  }
  Reread(src, nc, rounds);
  PartsTable(Layer{w, g, v, n}, rounds);
  return 0;
}
