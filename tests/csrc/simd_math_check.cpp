// Checks csrc/common/simd_math_avx2.h against the C library (built and run by
// tests/test_cross_entropy_paths.py).
//   simd_math_check log [step]   log_ps over the float range: every step-th bit pattern of every binade
//                                (step 1 = all 2^32 patterns), specials; prints the largest error in ulps
//   simd_math_check exp          exp_le0 over [-87.5, 0] and its special inputs
// Exit status 0 when every check holds, 1 otherwise (the failing input is printed).
#include "common/simd_math_avx2.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>

using fasteval::cpu::lanes::exp_le0;
using fasteval::cpu::lanes::log_ps;

static float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Error of y against the exact value ref (double), in units of the float ulp at ref.
static double ulp_error(float y, double ref) {
  const double a = std::fabs(ref);
  int e;
  std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  double ulp = std::ldexp(1.0, e - 24);
  if (ulp < std::ldexp(1.0, -149)) ulp = std::ldexp(1.0, -149);
  return std::fabs(static_cast<double>(y) - ref) / ulp;
}

static int check_log(uint64_t step) {
  double worst = 0;
  float worst_x = 0;
  uint64_t n = 0;
  alignas(32) float in[8], out[8];
  int k = 0;
  auto flush = [&](int cnt) -> bool {
    _mm256_store_ps(out, log_ps(_mm256_load_ps(in)));
    for (int j = 0; j < cnt; ++j) {
      const float x = in[j];
      const float y = out[j];
      const float lib = std::log(x);
      if (std::isnan(lib) || std::isinf(lib)) {
        const bool same = std::isnan(lib) ? std::isnan(y) : (y == lib);
        if (!same) {
          std::printf("FAIL log(%a) = %a, expected %a\n", x, y, lib);
          return false;
        }
        continue;
      }
      const double err = ulp_error(y, std::log(static_cast<double>(x)));
      if (err > worst) {
        worst = err;
        worst_x = x;
      }
      ++n;
    }
    return true;
  };
  // Every step-th pattern of all 2^32 (both signs, NaNs, infinities, denormals, zeros), plus the
  // neighbourhood of 1 (where log's relative error is hardest) densely.
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += step) {
    in[k++] = from_bits(static_cast<uint32_t>(b));
    if (k == 8) {
      if (!flush(8)) return 1;
      k = 0;
    }
  }
  for (uint32_t b = 0x3f700000u; b < 0x3f880000u; ++b) {
    in[k++] = from_bits(b);
    if (k == 8) {
      if (!flush(8)) return 1;
      k = 0;
    }
  }
  const float specials[] = {0.f, -0.f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(), 1.f, -1.f, 2.f, 0.5f, std::sqrt(2.f), std::sqrt(.5f),
                            -std::numeric_limits<float>::denorm_min()};
  for (float s : specials) {
    in[k++] = s;
    if (k == 8) {
      if (!flush(8)) return 1;
      k = 0;
    }
  }
  if (k && !flush(k)) return 1;
  std::printf("log: %llu finite results, max error %.3f ulp at %a\n", static_cast<unsigned long long>(n), worst,
              worst_x);
  if (!(worst <= 1.0)) {
    std::printf("FAIL log error above 1 ulp\n");
    return 1;
  }
  // log_normal_ps: the same values as log_ps on positive normal inputs.
  for (uint32_t b = 0x00800000u; b + 997 * 8 < 0x7f800000u; b += 997 * 8) {
    for (int j = 0; j < 8; ++j) in[j] = from_bits(b + 997 * j);
    alignas(32) float a[8], c[8];
    _mm256_store_ps(a, log_ps(_mm256_load_ps(in)));
    _mm256_store_ps(c, fasteval::cpu::lanes::log_normal_ps(_mm256_load_ps(in)));
    for (int j = 0; j < 8; ++j) {
      if (a[j] != c[j]) {
        std::printf("FAIL log_normal_ps(%a) = %a, log_ps gives %a\n", in[j], c[j], a[j]);
        return 1;
      }
    }
  }
  return 0;
}

static int check_exp() {
  double worst = 0;
  alignas(32) float in[8], out[8];
  for (uint32_t b = 0; b <= 0x42af0000u; b += 263) {  // [-87.5, -0.0] in steps of 263 ulps
    for (int j = 0; j < 8; ++j) in[j] = -from_bits(b + j * 2);
    _mm256_store_ps(out, exp_le0(_mm256_load_ps(in)));
    for (int j = 0; j < 8; ++j) {
      const double ref = std::exp(static_cast<double>(in[j]));
      if (in[j] >= -86.5f) {
        const double rel = std::fabs(out[j] - ref) / ref;
        if (rel > worst) worst = rel;
        if (!(rel < 2e-6)) {
          std::printf("FAIL exp_le0(%a) = %a, expected %a\n", in[j], out[j], ref);
          return 1;
        }
      } else if (!(out[j] > 0.f && out[j] < 3e-38f && std::isnormal(out[j]))) {
        std::printf("FAIL exp_le0(%a) = %a, expected a tiny normal number\n", in[j], out[j]);
        return 1;
      }
    }
  }
  // exp(0) is exactly 1 (the largest term of a sum); -inf and NaN give tiny / finite numbers.
  const float sp[8] = {0.f, -0.f, -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                       -1e30f, -86.5f, -1e-30f, -std::numeric_limits<float>::denorm_min()};
  std::memcpy(in, sp, sizeof(sp));
  _mm256_store_ps(out, exp_le0(_mm256_load_ps(in)));
  if (out[0] != 1.f || out[1] != 1.f || out[6] != 1.f || out[7] != 1.f) {
    std::printf("FAIL exp_le0 of 0 / tiny negatives is not exactly 1: %a %a %a %a\n", out[0], out[1], out[6], out[7]);
    return 1;
  }
  for (int j : {2, 3, 4}) {
    if (!(std::isfinite(out[j]) && out[j] >= 0.f && out[j] < 3e-38f)) {
      std::printf("FAIL exp_le0(%a) = %a, expected a tiny finite number\n", in[j], out[j]);
      return 1;
    }
  }
  // exp_le0_flush: exactly 0 below -86.5, for -inf and NaN; exp_le0 elsewhere.
  const float fl[8] = {-86.6f, -1e30f, -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                       -86.5f, -1.f, 0.f, -0.f};
  std::memcpy(in, fl, sizeof(fl));
  _mm256_store_ps(out, fasteval::cpu::lanes::exp_le0_flush(_mm256_load_ps(in)));
  alignas(32) float ref[8];
  _mm256_store_ps(ref, exp_le0(_mm256_load_ps(in)));
  for (int j = 0; j < 8; ++j) {
    const float want = j < 4 ? 0.f : ref[j];
    if (!(out[j] == want)) {
      std::printf("FAIL exp_le0_flush(%a) = %a, expected %a\n", in[j], out[j], want);
      return 1;
    }
  }
  std::printf("exp_le0: max relative error %.3g\n", worst);
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (!std::strcmp(argv[1], "log")) return check_log(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1);
  if (!std::strcmp(argv[1], "exp")) return check_exp();
  return 2;
}
