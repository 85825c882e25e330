#pragma once
// Vector math on 8 float lanes (AVX2 + FMA), with nothing but <immintrin.h>: log and a sum-of-exp term.
// Used by the rows-in-lanes kernels (common/row_lanes_cpu.h); standalone so that it can be tested in
// isolation against the C library over the whole float range (tests/csrc/simd_math_check.cpp, run by
// tests/test_cross_entropy_paths.py).
//
// Only compiled for the AVX2 and AVX512 builds (an AVX512 CPU runs AVX2 code).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <cstdint>

#define FASTEVAL_LANES_INLINE inline __attribute__((always_inline))

namespace fasteval {
namespace cpu {
namespace lanes {

// Natural logarithm of each lane, for every float input:
//   log(x) for x > 0 (denormals included), -inf for +-0, +inf for +inf, NaN for x < 0 and NaN.
// Error: at most 1 ulp against the exact result (0.945 ulp measured over all 2^31 positive floats;
// tests/csrc/simd_math_check.cpp checks a dense sweep of every binade and every special value).
//
// Method: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f / (2 + f), z = s^2;
// log(1 + f) = 2 atanh(s) = 2s + s R(z) = f - s (f - R(z)), where R(z) = z (c1 + c2 z + c3 z^2) fits
// 2 atanh(s) / s - 2 on [0, (3 - 2 sqrt 2)^2] to 3e-7 relative (Chebyshev fit; R is a small correction,
// |s R| < 0.0035 |f|, so its error vanishes in the result's rounding). e ln2 is added as
// e * ln2_hi (exact: ln2_hi has 16 significant bits) + e * ln2_lo.
//
// log_normal_ps is the core alone, for inputs known to be positive normal numbers (a sum of exp >= 1);
// other inputs give unspecified finite or NaN values, without faults.
FASTEVAL_LANES_INLINE __m256 log_core(__m256 xs, __m256 ebias) {
  // i = bits(x) - bits(sqrt(1/2)): its arithmetic top bits are e, its low 23 bits the offset of m.
  const __m256i i = _mm256_sub_epi32(_mm256_castps_si256(xs), _mm256_set1_epi32(0x3f3504f3));
  const __m256 e = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(i, 23)), ebias);
  const __m256i mbits = _mm256_add_epi32(_mm256_and_si256(i, _mm256_set1_epi32(0x007fffff)),
                                         _mm256_set1_epi32(0x3f3504f3));
  const __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(mbits), _mm256_set1_ps(1.f));  // exact
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.f), f));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 r = _mm256_fmadd_ps(z, _mm256_set1_ps(0.2957995f), _mm256_set1_ps(0.3998878f));
  r = _mm256_fmadd_ps(z, r, _mm256_set1_ps(0.66666687f));
  r = _mm256_mul_ps(z, r);
  const __m256 log1pf = _mm256_fnmadd_ps(s, _mm256_sub_ps(f, r), f);
  const __m256 y = _mm256_fmadd_ps(e, _mm256_set1_ps(1.4286068203094173e-06f), log1pf);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693145751953125f), y);
}

FASTEVAL_LANES_INLINE __m256 log_normal_ps(__m256 x) { return log_core(x, _mm256_setzero_ps()); }

FASTEVAL_LANES_INLINE __m256 log_ps(__m256 x) {
  const __m256 zero = _mm256_setzero_ps();
  // Denormals: scale into the normal range first (exact), and take 23 off the exponent.
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);  // x < FLT_MIN
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.f)), tiny);  // 2^23
  __m256 y = log_core(xs, _mm256_and_ps(tiny, _mm256_set1_ps(23.f)));
  // Special values: +-0 -> -inf, +inf -> +inf, x < 0 or NaN -> NaN.
  y = _mm256_blendv_ps(y, _mm256_set1_ps(-__builtin_inff()), _mm256_cmp_ps(x, zero, _CMP_EQ_OQ));
  y = _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, _mm256_set1_ps(__builtin_inff()), _CMP_EQ_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_nanf("")), _mm256_cmp_ps(x, zero, _CMP_NGE_UQ));
  return y;
}

// exp(d) for d <= 0, as a term of a sum of exponentials whose largest term is exp(0) = 1 (exactly 1).
// Inputs below -86.5 (-inf included) give a tiny positive number (about 2.7e-38) instead of exp(d):
// added to a sum >= 1 it changes nothing. A NaN input gives a finite number: callers detect NaN rows
// separately. Relative error about 1e-6 (the polynomial of cpu::fast_exp).
//
// 2^n is applied by adding n to the exponent field: n = round(d / ln2) is read from the low bits of
// d / ln2 + 1.5 * 2^23 (round to nearest), with n >= -125 so the result stays a normal number.
FASTEVAL_LANES_INLINE __m256 exp_le0(__m256 d) {
  const __m256 magic = _mm256_set1_ps(12582912.f);  // 1.5 * 2^23
  d = _mm256_max_ps(d, _mm256_set1_ps(-86.5f));      // NaN -> -86.5 (max returns the second operand)
  const __m256 t = _mm256_fmadd_ps(d, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945309f), d);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.166676521f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.499991506f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.999999701f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.f));
  // bits(t) << 23 == n << 23 (mod 2^32) for |n| < 2^22: the magic's own bits are shifted out.
  const __m256i scale = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
}

// exp(d) for d <= 0 with 0 (exactly) for d < -86.5, -inf and NaN: exp_le0 with its tiny floor masked off,
// for values used one by one (probabilities) rather than summed.
FASTEVAL_LANES_INLINE __m256 exp_le0_flush(__m256 d) {
  return _mm256_and_ps(exp_le0(d), _mm256_cmp_ps(d, _mm256_set1_ps(-86.5f), _CMP_GE_OQ));
}

}  // namespace lanes
}  // namespace cpu
}  // namespace fasteval

#endif  // CPU_CAPABILITY_AVX2 || CPU_CAPABILITY_AVX512
