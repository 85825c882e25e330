#pragma once
// Race-free, deterministic int64 histograms over a range of work units on the CPU, shared by the
// confusion-matrix kernels and the fused evaluation pass.
//
//   parallel_histogram(n, bins, grain, out, body)
//
// splits [0, n) into at most at::get_num_threads() contiguous chunks and calls
// body(begin, end, acc) once per chunk, where acc.add(bin) / acc.add(bin, k) counts into a histogram of
// `bins` int64 counters; `out` (bins counters, zeroed by the caller) receives the total.
//
// Two schemes, chosen per call from n, bins and the thread count (both give the same, exact counts):
//  - private histograms: every chunk counts into its own zeroed histogram, merged into `out` at the end
//    (in parallel over bins). Counters are 8-bit for large histograms (a wrap carries 256 into `out`
//    atomically), 32-bit when no bin can overflow them, else 64-bit. Plain increments, no sharing.
//  - shared atomic histogram: when the private copies would cost more to zero and merge than the
//    counting itself (bins large against n / chunks) or exceed the memory budget, every chunk adds into
//    `out` with relaxed integer atomics. Integer addition commutes, so the result is still exact and
//    identical from run to run.
// A body may throw (TORCH_CHECK on a bad label); at::parallel_for rethrows the first exception.
// Note: with ATen's OpenMP backend, at::parallel_for is header-inline `#pragma omp parallel`, so the
// chunks only run concurrently when this translation unit is compiled (and linked) with -fopenmp;
// without it they run one after the other on the calling thread (same counts, one core).
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

namespace fasteval {
namespace cpu {

// Accumulator of one chunk: a histogram only this chunk writes. 32-bit counters when no bin of the
// chunk can reach 2^32 (half the cache footprint of large histograms), else 64-bit.
template <typename Count>
struct PrivateHistT {
  Count* h;
  inline void add(int64_t bin) const { ++h[bin]; }
  inline void add(int64_t bin, int64_t k) const { h[bin] += static_cast<Count>(k); }
};
using PrivateHist = PrivateHistT<int64_t>;
using PrivateHist32 = PrivateHistT<uint32_t>;

// Accumulator of one chunk with 8-bit counters, for histograms too large for the caches at 32 bits
// (a (1000, 1000) confusion matrix is 1 MB instead of 4 MB per thread): when a counter wraps, the
// 256 it carries is added to the shared total with an atomic (at most once per 256 increments of a bin).
struct PrivateHist8 {
  uint8_t* h;
  int64_t* carry;  // the shared output histogram
  inline void add(int64_t bin) const {
    if (C10_UNLIKELY(++h[bin] == 0)) __atomic_fetch_add(carry + bin, int64_t(256), __ATOMIC_RELAXED);
  }
  inline void add(int64_t bin, int64_t k) const {
    const int64_t v = int64_t(h[bin]) + k;
    h[bin] = static_cast<uint8_t>(v & 255);
    if (v > 255) __atomic_fetch_add(carry + bin, v & ~int64_t(255), __ATOMIC_RELAXED);
  }
};

// Histograms with more bins than this use 8-bit private counters.
constexpr int64_t kNarrowHistBins = int64_t(1) << 16;

// Accumulator of the shared histogram: relaxed integer atomics (exact, order-independent).
struct AtomicHist {
  int64_t* h;
  inline void add(int64_t bin) const { __atomic_fetch_add(h + bin, int64_t(1), __ATOMIC_RELAXED); }
  inline void add(int64_t bin, int64_t k) const { __atomic_fetch_add(h + bin, k, __ATOMIC_RELAXED); }
};

// Total size of the private histograms, beyond which the shared atomic histogram is used.
constexpr int64_t kPrivateHistBudgetBytes = int64_t(256) << 20;

struct HistogramPlan {
  int64_t chunks;  // number of chunks [0, n) is split into
  bool atomic;     // shared atomic histogram instead of private ones
};

// grain: the smallest number of units worth a chunk of its own.
inline HistogramPlan plan_histogram(int64_t n, int64_t bins, int64_t grain) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = std::min<int64_t>(threads, (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1));
  chunks = std::max<int64_t>(chunks, 1);
  if (chunks == 1 || at::in_parallel_region()) return {1, false};
  const bool too_big = (chunks - 1) * bins * int64_t(sizeof(int64_t)) > kPrivateHistBudgetBytes;
  // Zeroing + merging a private copy touches `bins` counters; counting a chunk touches n / chunks.
  const bool too_sparse = bins > 4 * (n / chunks);
  return {chunks, too_big || too_sparse};
}

// The sum of the private histograms `priv` (count x bins, row-major) is added into out.
inline void merge_histograms(int64_t* out, const int64_t* priv, int64_t count, int64_t bins) {
  if (count == 0) return;
  at::parallel_for(0, bins, 16384, [&](int64_t b0, int64_t b1) {
    for (int64_t k = 0; k < count; ++k) {
      const int64_t* src = priv + k * bins;
      for (int64_t b = b0; b < b1; ++b) out[b] += src[b];
    }
  });
}

// max_per_unit: the most one unit of work adds to a single bin (1 when each sample counts once).
template <typename Body>
void parallel_histogram(int64_t n, int64_t bins, int64_t grain, int64_t* out, const Body& body,
                        int64_t max_per_unit = 1) {
  if (n <= 0) return;
  const HistogramPlan plan = plan_histogram(n, bins, grain);
  if (plan.chunks == 1) {
    body(int64_t(0), n, PrivateHist{out});
    return;
  }
  const int64_t chunks = plan.chunks;
  auto bounds = [&](int64_t c) { return n / chunks * c + std::min(c, n % chunks); };
  if (plan.atomic) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) body(bounds(c), bounds(c + 1), AtomicHist{out});
    });
    return;
  }
  if (bins > kNarrowHistBins) {
    std::unique_ptr<uint8_t[]> priv(new uint8_t[chunks * bins]);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        uint8_t* h = priv.get() + c * bins;
        std::memset(h, 0, bins);
        body(bounds(c), bounds(c + 1), PrivateHist8{h, out});
      }
    });
    at::parallel_for(0, bins, 16384, [&](int64_t b0, int64_t b1) {
      for (int64_t k = 0; k < chunks; ++k) {
        const uint8_t* src = priv.get() + k * bins;
        for (int64_t b = b0; b < b1; ++b) out[b] += src[b];
      }
    });
    return;
  }
  const bool narrow = (n / chunks + 1) * max_per_unit < (int64_t(1) << 32);
  if (narrow) {
    std::unique_ptr<uint32_t[]> priv(new uint32_t[chunks * bins]);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        uint32_t* h = priv.get() + c * bins;
        std::memset(h, 0, sizeof(uint32_t) * bins);  // zeroed by the thread that uses it (first touch)
        body(bounds(c), bounds(c + 1), PrivateHist32{h});
      }
    });
    at::parallel_for(0, bins, 16384, [&](int64_t b0, int64_t b1) {
      for (int64_t k = 0; k < chunks; ++k) {
        const uint32_t* src = priv.get() + k * bins;
        for (int64_t b = b0; b < b1; ++b) out[b] += src[b];
      }
    });
    return;
  }
  std::unique_ptr<int64_t[]> priv(new int64_t[(chunks - 1) * bins]);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = out;
      if (c > 0) {
        h = priv.get() + (c - 1) * bins;
        std::memset(h, 0, sizeof(int64_t) * bins);
      }
      body(bounds(c), bounds(c + 1), PrivateHist{h});
    }
  });
  merge_histograms(out, priv.get(), chunks - 1, bins);
}

}  // namespace cpu
}  // namespace fasteval
