#pragma once
// SIMD helpers for the CPU kernels, built on at::vec::Vectorized.
//
// at::vec is only vectorized when the translation unit is compiled with the CPU_CAPABILITY macros
// (setup.py passes -DCPU_CAPABILITY=AVX512 ... or -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -mavx2 -mfma,
// the best level of the build machine); otherwise Vectorized<float> is a portable 8-lane array and the
// same code runs as scalar loops.
//
// Everything works on "chunks" of kChunk logits converted to two float vectors, so that float32,
// bfloat16 and float16 rows go through the same code with fp32 arithmetic.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

namespace fasteval {
namespace cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVecWidth = fVec::size();
constexpr int64_t kChunk = 2 * kVecWidth;

inline const char* simd_level() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

struct Chunk {
  fVec lo, hi;
};

// Loads kChunk elements (or the first n, zero-filled beyond) of any supported dtype as floats.
template <typename T>
struct ChunkLoader;

template <>
struct ChunkLoader<float> {
  static inline Chunk load(const float* p) { return {fVec::loadu(p), fVec::loadu(p + kVecWidth)}; }
  static inline Chunk load(const float* p, int64_t n) {
    if (n > kVecWidth) return {fVec::loadu(p), fVec::loadu(p + kVecWidth, n - kVecWidth)};
    return {fVec::loadu(p, n), fVec(0.f)};
  }
  static inline void store(float* p, const Chunk& c) {
    c.lo.store(p);
    c.hi.store(p + kVecWidth);
  }
  static inline void store(float* p, const Chunk& c, int64_t n) {
    if (n > kVecWidth) {
      c.lo.store(p);
      c.hi.store(p + kVecWidth, n - kVecWidth);
    } else {
      c.lo.store(p, n);
    }
  }
};

template <typename T>
struct ChunkLoader16 {
  using bVec = at::vec::Vectorized<T>;
  static_assert(bVec::size() == kChunk, "16-bit vector must hold exactly one chunk");
  static inline Chunk load(const T* p) {
    auto [lo, hi] = at::vec::convert_to_float<T>(bVec::loadu(p));
    return {lo, hi};
  }
  static inline Chunk load(const T* p, int64_t n) {
    auto [lo, hi] = at::vec::convert_to_float<T>(bVec::loadu(p, n));
    return {lo, hi};
  }
  static inline void store(T* p, const Chunk& c) { at::vec::convert_from_float<T>(c.lo, c.hi).store(p); }
  static inline void store(T* p, const Chunk& c, int64_t n) {
    at::vec::convert_from_float<T>(c.lo, c.hi).store(p, n);
  }
};
template <>
struct ChunkLoader<c10::BFloat16> : ChunkLoader16<c10::BFloat16> {};
template <>
struct ChunkLoader<c10::Half> : ChunkLoader16<c10::Half> {};

#define FASTEVAL_ALWAYS_INLINE inline __attribute__((always_inline))

// exp(x) for a float vector, ~1e-6 relative error (the polynomial of Vectorized<float>::exp_u20),
// forced inline: the at::vec member is too large for GCC to inline on its own and would be called
// through the PLT once per vector. At every SIMD level: exp(NaN) = NaN, exp(-inf) = 0, exp(+inf) = +inf
// (and +inf wherever exp overflows float32); the AVX512 / AVX2 paths give 0 for results below about
// 2e-38 (x < -87) instead of denormals.
//
// The argument is clamped to [ln(FLT_MIN), kExpClampHi] with NaN passed through: x86 min / max return
// their SECOND operand when either is NaN, so min(hi, max(lo, x)) is NaN for a NaN x (min(x, hi) would
// be hi). kExpClampHi lies a little above ln(FLT_MAX) = 88.7228: a clamped input still overflows to +inf
// (p * 2^128 with p = exp(0.077) > 1), and round(x / ln2) stays at most 128, which the AVX2 exponent
// construction below needs.
constexpr float kExpClampLo = -87.3365478515625f;  // ln(FLT_MIN)
constexpr float kExpClampHi = 88.8f;

FASTEVAL_ALWAYS_INLINE fVec fast_exp(const fVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // Inputs below ln(FLT_MIN) give exactly 0 through the mask rather than a denormal: denormal results
  // cost microcode assists (measured 5x slower on rows padded with -inf).
  const __m512 v = x;
  const __m512 lo = _mm512_set1_ps(kExpClampLo);
  const __mmask16 keep = _mm512_cmp_ps_mask(v, lo, _CMP_NLT_UQ);  // x >= lo, or NaN
  const __m512 s = _mm512_min_ps(_mm512_set1_ps(kExpClampHi), _mm512_max_ps(lo, v));  // NaN stays NaN
  // n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2] (r < 0.08 above ln(FLT_MAX))
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(s, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), s);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676521f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499991506f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999701f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);  // p * 2^n; 0 below ln(FLT_MIN); +inf above ln(FLT_MAX)
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2 = _mm256_set1_ps(0.693147180559945309f);
  const __m256 lo = _mm256_set1_ps(kExpClampLo);
  const __m256 v = x;
  const __m256 underflow = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);  // false for NaN
  const __m256 s = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(kExpClampHi), v));  // NaN stays NaN
  // n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2] (r < 0.08 above ln(FLT_MAX))
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(s, log2e, _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fnmadd_ps(n, ln2, s);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.166676521f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.499991506f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.999999701f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.f));
  // 2^(n-1) * 2 keeps the exponent field in range at the top end (n = 128), where p * 2^128 overflows to
  // +inf. A NaN x gives a NaN p (whatever the scale).
  __m256i e = _mm256_cvtps_epi32(_mm256_sub_ps(n, _mm256_set1_ps(1.f)));
  e = _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23);
  __m256 scale = _mm256_blendv_ps(_mm256_castsi256_ps(e), _mm256_setzero_ps(), underflow);
  return _mm256_mul_ps(_mm256_mul_ps(p, scale), _mm256_set1_ps(2.f));
#else
  return x.exp_u20();  // std::exp per lane
#endif
}

inline fVec neg_inf_vec() { return fVec(-std::numeric_limits<float>::infinity()); }

// Replaces the lanes at and beyond n (of a chunk) with `fill`.
inline Chunk mask_tail(const Chunk& c, int64_t n, const fVec& fill) {
  if (n > kVecWidth) return {c.lo, fVec::set(fill, c.hi, n - kVecWidth)};
  return {fVec::set(fill, c.lo, n), fill};
}

inline float hmax(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, v);
}
inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

}  // namespace cpu
}  // namespace fasteval
