// Checks csrc/common/row_lanes_cpu.h against plain scalar code (built and run by
// tests/test_cross_entropy_paths.py, with -I for csrc/ and torch's c10 headers).
//
// Every C in 1..32 and every block size 1..8, contiguous / strided / repeated rows, float32, bfloat16 and
// float16, rows that end at an inaccessible page (any read past the tensor faults), values with ties,
// signed zeros, infinities and NaNs. Exit status 0 when everything matches; the first mismatch is printed.
#include "common/row_lanes_cpu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

namespace L = fasteval::cpu::lanes;

static int failures = 0;
#define CHECK(cond, ...)                     \
  do {                                       \
    if (!(cond)) {                           \
      std::printf("FAIL %s: ", #cond);       \
      std::printf(__VA_ARGS__);              \
      std::printf("\n");                     \
      if (++failures > 20) std::exit(1);     \
    }                                        \
  } while (0)

// Memory whose end is followed by an inaccessible page: a read past `end()` faults.
template <typename T>
struct Guarded {
  char* base = nullptr;
  size_t total = 0;
  T* data = nullptr;
  explicit Guarded(size_t n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = n * sizeof(T);
    const size_t pages = (bytes + page - 1) / page + 1;
    total = (pages + 1) * page;
    base = static_cast<char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) std::exit(2);
    if (mprotect(base + pages * page, page, PROT_NONE) != 0) std::exit(2);
    data = reinterpret_cast<T*>(base + pages * page - bytes);
  }
  ~Guarded() { munmap(base, total); }
};

static float as_float(float v) { return v; }
static float as_float(c10::BFloat16 v) { return static_cast<float>(v); }
static float as_float(c10::Half v) { return static_cast<float>(v); }

static float special(std::mt19937& g, bool specials) {
  std::uniform_int_distribution<int> pick(0, 19);
  const int k = pick(g);
  if (specials) {
    switch (k) {
      case 0: return std::numeric_limits<float>::quiet_NaN();
      case 1: return std::numeric_limits<float>::infinity();
      case 2: return -std::numeric_limits<float>::infinity();
      case 3: return 0.f;
      case 4: return -0.f;
      case 5: return 1.f;  // ties
      default: break;
    }
  }
  if (k < 9) return static_cast<float>(k - 6);  // small integers: many ties
  return std::normal_distribution<float>(0.f, 3.f)(g);
}

// Scalar order of row_rank_cpu.h.
static int ref_argmax(const std::vector<float>& x) {
  int best = 0;
  for (int c = 1; c < static_cast<int>(x.size()); ++c) {
    if (std::isnan(x[best])) break;
    if (std::isnan(x[c]) || x[c] > x[best]) best = c;
  }
  return best;
}
static int ref_rank(const std::vector<float>& x, int t) {
  int r = 0;
  if (std::isnan(x[t])) {
    for (int c = 0; c < t; ++c) r += std::isnan(x[c]);
    return r;
  }
  for (int c = 0; c < static_cast<int>(x.size()); ++c) {
    r += std::isnan(x[c]) || x[c] > x[t];
    if (c < t) r += x[c] == x[t];
  }
  return r;
}

template <typename T>
static void check_blocks(const char* name) {
  std::mt19937 g(1234);
  for (int C = 1; C <= static_cast<int>(L::kMaxC); ++C) {
    for (int nrows = 1; nrows <= 8; ++nrows) {
      for (int layout = 0; layout < 3; ++layout) {  // contiguous, strided (C + 3), stride 0
        const int64_t stride = layout == 0 ? C : layout == 1 ? C + 3 : 0;
        const int64_t n = (nrows - 1) * stride + C;  // elements up to the end of the last row
        Guarded<T> mem(static_cast<size_t>(n));
        for (int trial = 0; trial < 4; ++trial) {
          const bool specials = trial >= 2;
          for (int64_t k = 0; k < n; ++k) mem.data[k] = static_cast<T>(special(g, specials));
          std::vector<std::vector<float>> rows(8);
          for (int r = 0; r < nrows; ++r) {
            for (int c = 0; c < C; ++c) rows[r].push_back(as_float(mem.data[r * stride + c]));
          }
          __m256 col[L::kMaxC];
          L::load_block(mem.data, stride, nrows, C, mem.data + n, col);
          alignas(32) float lane[8];
          for (int c = 0; c < C; ++c) {
            _mm256_store_ps(lane, col[c]);
            for (int r = 0; r < 8; ++r) {
              const float want = r < nrows ? rows[r][c] : 0.f;
              CHECK(std::memcmp(&lane[r], &want, 4) == 0 || (std::isnan(lane[r]) && std::isnan(want)),
                    "%s load_block C=%d nrows=%d stride=%ld col %d row %d: %a vs %a", name, C, nrows,
                    static_cast<long>(stride), c, r, lane[r], want);
            }
          }
          // Targets, then max / sum / pick, sum of exp, argmax and rank against the scalar order.
          alignas(32) int32_t tv[8];
          for (int r = 0; r < 8; ++r) tv[r] = static_cast<int32_t>(g() % C);
          const __m256i t = _mm256_load_si256(reinterpret_cast<const __m256i*>(tv));
          __m256 m, s, xt, se, sd;
          L::block_max_sum_pick<1>(col, C, &t, &m, &s, &xt);
          L::block_sumexp<1, L::Shifted::kPlain>(col, C, &m, nullptr, &se, &sd);
          alignas(32) float mv[8], sv[8], xv[8], ev[8], dv[8];
          alignas(32) int32_t am[8], rk[8];
          _mm256_store_ps(mv, m);
          _mm256_store_ps(sv, s);
          _mm256_store_ps(xv, xt);
          _mm256_store_ps(ev, se);
          _mm256_store_ps(dv, sd);
          _mm256_store_si256(reinterpret_cast<__m256i*>(am), L::block_argmax(col, C));
          _mm256_store_si256(reinterpret_cast<__m256i*>(rk), L::block_rank(col, C, t, xt));
          const int redo = _mm256_movemask_ps(L::rows_need_row_pass(m, s));
          for (int r = 0; r < nrows; ++r) {
            const auto& x = rows[r];
            CHECK(std::memcmp(&xv[r], &x[tv[r]], 4) == 0 || (std::isnan(xv[r]) && std::isnan(x[tv[r]])),
                  "%s pick C=%d row %d", name, C, r);
            CHECK(am[r] == ref_argmax(x), "%s argmax C=%d row %d: %d vs %d", name, C, r, am[r], ref_argmax(x));
            CHECK(rk[r] == ref_rank(x, tv[r]), "%s rank C=%d row %d t=%d: %d vs %d", name, C, r, tv[r], rk[r],
                  ref_rank(x, tv[r]));
            bool nan = false;
            float mx = -std::numeric_limits<float>::infinity();
            for (float v : x) {
              nan |= std::isnan(v);
              mx = std::max(mx, v);
            }
            const bool needs = nan || !std::isfinite(mx);
            CHECK(((redo >> r) & 1) == needs, "%s row pass C=%d row %d: %d vs %d", name, C, r, (redo >> r) & 1,
                  needs);
            if (needs) continue;
            CHECK(mv[r] == mx, "%s max C=%d row %d", name, C, r);
            double se_ref = 0, sd_ref = 0;
            for (float v : x) {
              se_ref += std::exp(static_cast<double>(v) - mx);
              sd_ref += static_cast<double>(v) - mx;
            }
            CHECK(std::fabs(ev[r] - se_ref) <= 2e-6 * se_ref, "%s sumexp C=%d row %d: %g vs %g", name, C, r, ev[r],
                  se_ref);
            CHECK(std::isinf(sd_ref) ? dv[r] == sd_ref : std::fabs(dv[r] - sd_ref) <= 1e-5 * (1 + std::fabs(sd_ref)),
                  "%s shifted sum C=%d row %d: %g vs %g", name, C, r, dv[r], sd_ref);
          }
          // store_block writes back exactly the C elements of each row (a copy with guard values between).
          std::vector<T> out(static_cast<size_t>(8 * (C + 3)), static_cast<T>(-1024.f));
          L::store_block(col, C, out.data(), C + 3, nrows);
          for (int r = 0; r < 8; ++r) {
            for (int c = 0; c < C + 3; ++c) {
              const float got = as_float(out[r * (C + 3) + c]);
              const float want = (r < nrows && c < C) ? as_float(static_cast<T>(rows[r][c])) : -1024.f;
              CHECK(std::memcmp(&got, &want, 4) == 0 || (std::isnan(got) && std::isnan(want)),
                    "%s store_block C=%d nrows=%d row %d col %d: %a vs %a", name, C, nrows, r, c, got, want);
            }
          }
        }
      }
    }
  }
}

template <typename T>
static void check_rows_stats(const char* name) {
  std::mt19937 g(99);
  for (int C : {1, 7, 8, 9, 15, 16, 17, 24, 31, 33, 100, 257}) {
    for (int nrows = 1; nrows <= 8; ++nrows) {
      const int64_t stride = C + (nrows % 2) * 5;
      const int64_t n = (nrows - 1) * stride + C;
      Guarded<T> mem(static_cast<size_t>(n));
      std::vector<float> w(C);
      for (auto& v : w) v = std::uniform_real_distribution<float>(0.5f, 2.f)(g);
      for (int trial = 0; trial < 3; ++trial) {
        for (int64_t k = 0; k < n; ++k) mem.data[k] = static_cast<T>(special(g, trial == 2));
        __m256 m, s, se, sd;
        L::rows_stats<T, L::Shifted::kWeighted>(mem.data, stride, nrows, C, w.data(), m, s, se, sd);
        alignas(32) float mv[8], ev[8], dv[8];
        _mm256_store_ps(mv, m);
        _mm256_store_ps(ev, se);
        _mm256_store_ps(dv, sd);
        const int redo = _mm256_movemask_ps(L::rows_need_row_pass(m, s));
        for (int r = 0; r < nrows; ++r) {
          bool nan = false;
          float mx = -std::numeric_limits<float>::infinity();
          for (int c = 0; c < C; ++c) {
            const float v = as_float(mem.data[r * stride + c]);
            nan |= std::isnan(v);
            mx = std::max(mx, v);
          }
          const bool needs = nan || !std::isfinite(mx);
          CHECK(((redo >> r) & 1) == needs, "%s rows_stats row pass C=%d row %d", name, C, r);
          if (needs) continue;
          double se_ref = 0, sd_ref = 0;
          for (int c = 0; c < C; ++c) {
            const double v = as_float(mem.data[r * stride + c]);
            se_ref += std::exp(v - mx);
            sd_ref += w[c] * (v - mx);
          }
          CHECK(mv[r] == mx, "%s rows_stats max C=%d row %d", name, C, r);
          CHECK(std::fabs(ev[r] - se_ref) <= 2e-6 * se_ref, "%s rows_stats sumexp C=%d row %d: %g vs %g", name, C, r,
                ev[r], se_ref);
          CHECK(std::isinf(sd_ref) ? dv[r] == sd_ref : std::fabs(dv[r] - sd_ref) <= 1e-5 * (1 + std::fabs(sd_ref)),
                "%s rows_stats shifted C=%d row %d: %g vs %g", name, C, r, dv[r], sd_ref);
        }
      }
    }
  }
}

template <typename I>
static void check_targets(const char* name) {
  for (int nrows = 1; nrows <= 8; ++nrows) {
    for (int64_t ignore : {int64_t(-100), int64_t(0), int64_t(1) << 40}) {
      Guarded<I> mem(8);
      I* t = mem.data + (8 - nrows);  // the last target ends at the guard page
      const int64_t C = 5;
      const int64_t vals[8] = {0, 4, -1, 5, ignore, 3, int64_t(1) << 33, -100};
      for (int r = 0; r < nrows; ++r) t[r] = static_cast<I>(vals[r]);
      const L::Targets tg = L::load_targets(t, nrows, C, ignore);
      alignas(32) int32_t tv[8];
      alignas(32) float ig[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tv), tg.t);
      _mm256_store_ps(ig, tg.ignored);
      for (int r = 0; r < 8; ++r) {
        const bool ignored_lane = std::isnan(ig[r]);  // all-ones
        if (r >= nrows) {
          CHECK(ignored_lane, "%s targets lane %d beyond nrows=%d must count as ignored", name, r, nrows);
          CHECK(!((tg.bad >> r) & 1), "%s targets lane %d beyond nrows", name, r);
          continue;
        }
        const int64_t v = static_cast<int64_t>(t[r]);
        const bool want_ignored = v == ignore;
        const bool want_bad = !want_ignored && (v < 0 || v >= C);
        CHECK(ignored_lane == want_ignored, "%s targets ignored nrows=%d lane %d value %ld", name, nrows, r,
              static_cast<long>(v));
        CHECK(((tg.bad >> r) & 1) == want_bad, "%s targets bad nrows=%d lane %d value %ld", name, nrows, r,
              static_cast<long>(v));
        if (!want_ignored && !want_bad) CHECK(tv[r] == v, "%s targets value lane %d", name, r);
      }
    }
  }
}

int main() {
  check_blocks<float>("float32");
  check_blocks<c10::BFloat16>("bfloat16");
  check_blocks<c10::Half>("float16");
  check_rows_stats<float>("float32");
  check_rows_stats<c10::BFloat16>("bfloat16");
  check_rows_stats<c10::Half>("float16");
  check_targets<int64_t>("int64");
  check_targets<int32_t>("int32");
  if (failures) return 1;
  std::printf("row_lanes: all checks passed\n");
  return 0;
}
