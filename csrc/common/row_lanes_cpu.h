#pragma once
// Rows in the lanes: row reductions for short rows (C up to kMaxC classes), 8 rows at a time.
//
// For C of the order of 10, a row is a few dozen bytes and the horizontal reductions of a per-row pass
// (max, sum, their shuffles and scalar tails) cost more than the data. Here a block of 8 rows is
// loaded and transposed in registers so that vector col[c] holds column c of the 8 rows, lane r = row r;
// the max, the sum of exp, the log, the target's logit, the argmax and the rank then come out for the 8
// rows at once as plain vertical vector operations, with no horizontal step at all.
//
// Loading: each row is read in pieces of 4 elements; the pieces of rows r and r + 4 fill the two
// 128-bit halves of one register, so that one in-lane 4 x 4 transpose (4 unpacks and 4 shuffles per 4
// columns) turns 4 such registers into 4 columns. A piece is read whole (it may then run into the next
// row: those lanes land in columns >= C, which nothing reads) unless it would reach past `limit` (the
// end of the tensor's last row): there it is a masked load, which reads nothing beyond the row.
// bfloat16 / float16 pieces are converted to float32 on the way in.
//
// Everything is AVX2 (8 float lanes; AVX512 CPUs run it too). Builds without AVX2 do not define
// FASTEVAL_ROW_LANES and keep the per-row passes (common/row_softmax_cpu.h, common/row_rank_cpu.h).
//
// Order conventions (those of common/order.h, torch.argmax and torch.sort(stable=True)):
//   argmax: first index of the maximum, a NaN counting as the maximum (the first NaN);
//   rank of x_t: #{c : x_c > x_t or isnan(x_c)} + #{c < t : x_c == x_t}; #{c < t : isnan(x_c)} if x_t
//   is NaN.
#include "common/simd_math_avx2.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define FASTEVAL_ROW_LANES 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fasteval {
namespace cpu {
namespace lanes {

constexpr int kLanes = 8;      // rows per block
constexpr int64_t kMaxC = 32;  // columns a block holds (the column buffer is kMaxC vectors, 1 KiB)

// ---- Loading 4-element pieces of two rows as the two halves of one 8-float vector --------------------

template <typename T>
struct Pieces;

template <>
struct Pieces<float> {
  // [p0[0..3] | p1[0..3]]; all 8 elements readable.
  static FASTEVAL_LANES_INLINE __m256 pair(const float* p0, const float* p1) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p0)), _mm_loadu_ps(p1), 1);
  }
  // The first n0 (n1) elements of p0 (p1), n in [0, 4], zeros beyond; nothing else is read.
  static FASTEVAL_LANES_INLINE __m256 pair(const float* p0, int n0, const float* p1, int n1) {
    const __m128i idx = _mm_setr_epi32(0, 1, 2, 3);
    const __m128 lo = _mm_maskload_ps(p0, _mm_cmpgt_epi32(_mm_set1_epi32(n0), idx));
    const __m128 hi = _mm_maskload_ps(p1, _mm_cmpgt_epi32(_mm_set1_epi32(n1), idx));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  }
};

// 16-bit floats: two 64-bit pieces into one 128-bit register, then widened to 8 floats.
template <typename T>
struct Pieces16 {
  static FASTEVAL_LANES_INLINE __m256 widen(__m128i v);
  static FASTEVAL_LANES_INLINE __m256 pair(const T* p0, const T* p1) {
    __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p0));
    v = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(v), reinterpret_cast<const double*>(p1)));
    return widen(v);
  }
  static FASTEVAL_LANES_INLINE __m256 pair(const T* p0, int n0, const T* p1, int n1) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p0, sizeof(uint16_t) * n0);
    std::memcpy(buf + 4, p1, sizeof(uint16_t) * n1);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
};
template <>
FASTEVAL_LANES_INLINE __m256 Pieces16<c10::BFloat16>::widen(__m128i v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));  // exact
}
template <>
FASTEVAL_LANES_INLINE __m256 Pieces16<c10::Half>::widen(__m128i v) {
  return _mm256_cvtph_ps(v);  // exact
}
template <>
struct Pieces<c10::BFloat16> : Pieces16<c10::BFloat16> {};
template <>
struct Pieces<c10::Half> : Pieces16<c10::Half> {};

// In-lane 4 x 4 transpose: a_r = [row r, columns 0..3 | row r + 4, columns 0..3] (r < 4) becomes
// out[k] = column k of rows 0..7.
FASTEVAL_LANES_INLINE void transpose4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256* out) {
  const __m256 t0 = _mm256_unpacklo_ps(a0, a1);  // r0c0 r1c0 r0c1 r1c1 | r4c0 r5c0 r4c1 r5c1
  const __m256 t1 = _mm256_unpackhi_ps(a0, a1);  // r0c2 r1c2 r0c3 r1c3 | ...
  const __m256 t2 = _mm256_unpacklo_ps(a2, a3);
  const __m256 t3 = _mm256_unpackhi_ps(a2, a3);
  out[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  out[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  out[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  out[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// Columns [0, C) (1 <= C <= kMaxC) of the rows base + r * stride, r < nrows (1 <= nrows <= 8), into
// col[c] (lane r = row r; lanes r >= nrows are 0). col must have room for C rounded up to a multiple of
// 4; the columns from C to there hold unspecified values. Nothing at or beyond `limit` (one past the
// last element of the tensor) is read. stride >= 0.
template <typename T>
FASTEVAL_LANES_INLINE void load_block(const T* base, int64_t stride, int nrows, int64_t C, const T* limit,
                                      __m256* col) {
  using P = Pieces<T>;
  const int64_t nq = (C + 3) / 4;
  const int64_t room = limit - base;  // elements readable from base
  if (nrows == kLanes && 7 * stride + 4 * nq <= room) {
    const T* p0 = base;
    const T* p1 = base + stride;
    const T* p2 = base + 2 * stride;
    const T* p3 = base + 3 * stride;
    const T* p4 = base + 4 * stride;
    const T* p5 = base + 5 * stride;
    const T* p6 = base + 6 * stride;
    const T* p7 = base + 7 * stride;
    for (int64_t o = 0; o < 4 * nq; o += 4) {
      transpose4(P::pair(p0 + o, p4 + o), P::pair(p1 + o, p5 + o), P::pair(p2 + o, p6 + o),
                 P::pair(p3 + o, p7 + o), col + o);
    }
    return;
  }
  // Rows missing from the block read nothing; the last row's pieces are masked at limit.
  const T* p[kLanes];
  int64_t left[kLanes];  // elements readable from p[r]
  for (int r = 0; r < kLanes; ++r) {
    p[r] = r < nrows ? base + r * stride : base;
    left[r] = r < nrows ? room - r * stride : 0;
  }
  for (int64_t o = 0; o < 4 * nq; o += 4) {
    const int cnt = static_cast<int>(std::min<int64_t>(4, C - o));
    int n[kLanes];
    for (int r = 0; r < kLanes; ++r) n[r] = left[r] - o >= 4 ? 4 : (left[r] > o ? std::min<int>(cnt, left[r] - o) : 0);
    transpose4(P::pair(p[0] + (n[0] ? o : 0), n[0], p[4] + (n[4] ? o : 0), n[4]),
               P::pair(p[1] + (n[1] ? o : 0), n[1], p[5] + (n[5] ? o : 0), n[5]),
               P::pair(p[2] + (n[2] ? o : 0), n[2], p[6] + (n[6] ? o : 0), n[6]),
               P::pair(p[3] + (n[3] ? o : 0), n[3], p[7] + (n[7] ? o : 0), n[7]), col + o);
  }
}

// Prefetches (into L1) the rows base + r * stride, r < nrows, C elements each: the rows a few blocks
// ahead of the one being reduced, so that their loads overlap the arithmetic. Never faults.
template <typename T>
FASTEVAL_LANES_INLINE void prefetch_rows(const T* base, int64_t stride, int nrows, int64_t C) {
  const char* p = reinterpret_cast<const char*>(base);
  if (stride == C) {  // one contiguous range
    for (int64_t o = 0; o < nrows * C * static_cast<int64_t>(sizeof(T)); o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
    return;
  }
  for (int r = 0; r < nrows; ++r) {
    const char* q = reinterpret_cast<const char*>(base + r * stride);
    for (int64_t o = 0; o < C * static_cast<int64_t>(sizeof(T)); o += 64) _mm_prefetch(q + o, _MM_HINT_T0);
  }
}

// ---- Storing a block back to rows (the inverse of load_block) ---------------------------------------

// 4 floats to 4 elements of T at p; the counted form writes only the first n (1..4).
template <typename T>
struct Store4;
template <>
struct Store4<float> {
  static FASTEVAL_LANES_INLINE void store(float* p, __m128 v) { _mm_storeu_ps(p, v); }
  static FASTEVAL_LANES_INLINE void store(float* p, __m128 v, int n) {
    _mm_maskstore_ps(p, _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)), v);
  }
};
template <typename T>
struct Store4_16 {
  static FASTEVAL_LANES_INLINE __m128i narrow(__m128 v);  // 4 values in the low 64 bits, rounded to nearest even
  static FASTEVAL_LANES_INLINE void store(T* p, __m128 v) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), narrow(v));
  }
  static FASTEVAL_LANES_INLINE void store(T* p, __m128 v, int n) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), narrow(v));
    std::memcpy(p, buf, sizeof(uint16_t) * n);
  }
};
template <>
FASTEVAL_LANES_INLINE __m128i Store4_16<c10::Half>::narrow(__m128 v) {
  return _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
}
template <>
FASTEVAL_LANES_INLINE __m128i Store4_16<c10::BFloat16>::narrow(__m128 v) {
  // Round to nearest even on the upper 16 bits (as c10::BFloat16); NaN stays a (quiet) NaN.
  const __m128i b = _mm_castps_si128(v);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(b, 16), _mm_set1_epi32(1));
  __m128i r = _mm_srli_epi32(_mm_add_epi32(b, _mm_add_epi32(lsb, _mm_set1_epi32(0x7fff))), 16);
  r = _mm_blendv_epi8(r, _mm_set1_epi32(0x7fc0), _mm_castps_si128(_mm_cmpunord_ps(v, v)));
  return _mm_packus_epi32(r, r);  // every value is below 2^16: no saturation
}
template <>
struct Store4<c10::BFloat16> : Store4_16<c10::BFloat16> {};
template <>
struct Store4<c10::Half> : Store4_16<c10::Half> {};

// Writes columns [0, C) of col (lane r = row r) to the rows base + r * stride, r < nrows, converted to T;
// exactly the C elements of each row are written (rows may be adjacent). col holds C rounded up to a
// multiple of 4 vectors; it is overwritten.
template <typename T>
FASTEVAL_LANES_INLINE void store_block(__m256* col, int64_t C, T* base, int64_t stride, int nrows) {
  using S = Store4<T>;
  for (int64_t o = 0; o < C; o += 4) {
    const int cnt = static_cast<int>(std::min<int64_t>(4, C - o));
    __m256 a[4];
    transpose4(col[o], col[o + 1], col[o + 2], col[o + 3], a);  // a[r] = [row r | row r + 4], 4 columns
    for (int r = 0; r < 4; ++r) {
      const __m128 lo = _mm256_castps256_ps128(a[r]), hi = _mm256_extractf128_ps(a[r], 1);
      if (cnt == 4) {
        if (r < nrows) S::store(base + r * stride + o, lo);
        if (r + 4 < nrows) S::store(base + (r + 4) * stride + o, hi);
      } else {
        if (r < nrows) S::store(base + r * stride + o, lo, cnt);
        if (r + 4 < nrows) S::store(base + (r + 4) * stride + o, hi, cnt);
      }
    }
  }
}

// ---- Targets ---------------------------------------------------------------------------------------

struct Targets {
  __m256i t;        // lane r: target[r] where it is a class in [0, C); unspecified elsewhere
  __m256 ignored;   // lane r all-ones where target[r] == ignore_index, or r >= nrows
  uint32_t bad;     // bit r set where target[r] is neither ignore_index nor in [0, C) (r < nrows)
};

// The targets of a block of nrows (<= 8) rows, int64 or int32. The caller raises on `bad`.
template <typename I>
FASTEVAL_LANES_INLINE Targets load_targets(const I* target, int nrows, int64_t C, int64_t ignore_index) {
  Targets out;
  if (nrows == kLanes) {
    if constexpr (sizeof(I) == 8) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(target));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(target + 4));
      const __m256i ign = _mm256_set1_epi64x(ignore_index);
      const __m256i cv = _mm256_set1_epi64x(C);
      const __m256i zero = _mm256_setzero_si256();
      const __m256i ia = _mm256_cmpeq_epi64(a, ign), ib = _mm256_cmpeq_epi64(b, ign);
      // valid: 0 <= t < C, i.e. not (0 > t) and (C > t)
      const __m256i va = _mm256_andnot_si256(_mm256_cmpgt_epi64(zero, a), _mm256_cmpgt_epi64(cv, a));
      const __m256i vb = _mm256_andnot_si256(_mm256_cmpgt_epi64(zero, b), _mm256_cmpgt_epi64(cv, b));
      // Low 32 bits of each 64-bit lane, a's four then b's four: [a0 a1 b0 b1 | a2 a3 b2 b3], then the
      // middle 64-bit quarters swapped.
      auto pack = [&](__m256i x, __m256i y) {
        const __m256 q = _mm256_shuffle_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(y), 0x88);
        return _mm256_permute4x64_epi64(_mm256_castps_si256(q), 0xD8);
      };
      out.t = pack(a, b);
      const __m256i ig = pack(ia, ib);
      out.ignored = _mm256_castsi256_ps(ig);
      // movemask of the 64-bit masks: bit k of each is lane k of a (b)
      const uint32_t ok = static_cast<uint32_t>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_or_si256(va, ia)))) |
                          static_cast<uint32_t>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_or_si256(vb, ib)))) << 4;
      out.bad = ~ok & 0xFFu;
    } else {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(target));
      const bool ign_fits = ignore_index >= INT32_MIN && ignore_index <= INT32_MAX;
      const __m256i ig = ign_fits ? _mm256_cmpeq_epi32(a, _mm256_set1_epi32(static_cast<int32_t>(ignore_index)))
                                  : _mm256_setzero_si256();
      const __m256i cv = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(C, INT32_MAX)));
      const __m256i va = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), a), _mm256_cmpgt_epi32(cv, a));
      out.t = a;
      out.ignored = _mm256_castsi256_ps(ig);
      const __m256i ok = _mm256_or_si256(va, ig);
      out.bad = ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(ok))) & 0xFFu;
    }
    // C > INT32_MAX with int64 targets >= 2^31 would not survive the packing: the callers have C <= kMaxC.
    return out;
  }
  alignas(32) int32_t tv[kLanes];
  alignas(32) int32_t ig[kLanes];
  out.bad = 0;
  for (int r = 0; r < kLanes; ++r) {
    tv[r] = 0;
    ig[r] = -1;
    if (r >= nrows) continue;
    const int64_t t = static_cast<int64_t>(target[r]);
    if (t == ignore_index) continue;
    ig[r] = 0;
    if (t < 0 || t >= C) {
      out.bad |= 1u << r;
    } else {
      tv[r] = static_cast<int32_t>(t);
    }
  }
  out.t = _mm256_load_si256(reinterpret_cast<const __m256i*>(tv));
  out.ignored = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(ig)));
  return out;
}

// Lane mask of the first n lanes.
FASTEVAL_LANES_INLINE __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// ---- Reductions over the columns of a block ------------------------------------------------------

// The reductions below work on NB blocks at once (col: NB column buffers of kMaxC vectors each, block b's
// column c at col[b * kMaxC + c]; per-block values in arrays of NB): the column loop then interleaves
// the blocks' independent dependency chains. NB = 1 is the plain single-block form.

// What the exp pass also sums: nothing, sum_c (x_c - max) or sum_c w_c (x_c - max). Shifted by the max, the
// sum stays accurate for rows of huge logits (where sum_c x_c - C max would cancel) and finite for logits
// near the top of the float range; label smoothing needs it.
enum class Shifted { kNone, kPlain, kWeighted };

// One pass: per-lane max, sum_c x_c and x_t (t per lane; 0 where t is not in [0, C)). The sum only
// detects NaN: a lane with a NaN has a NaN sum and an unspecified max (rows_need_row_pass tests both).
template <int NB>
FASTEVAL_LANES_INLINE void block_max_sum_pick(const __m256* col, int64_t C, const __m256i* t, __m256* max,
                                              __m256* sum, __m256* picked) {
  __m256 m[NB], s[NB], xt[NB];
  for (int b = 0; b < NB; ++b) {
    const __m256 v = col[b * kMaxC];
    m[b] = v;
    s[b] = v;
    xt[b] = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(t[b], _mm256_setzero_si256())));
  }
  __m256i cidx = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi32(1);
  for (int64_t c = 1; c < C; ++c) {
    cidx = _mm256_add_epi32(cidx, one);
    for (int b = 0; b < NB; ++b) {
      const __m256 v = col[b * kMaxC + c];
      m[b] = _mm256_max_ps(m[b], v);
      s[b] = _mm256_add_ps(s[b], v);
      xt[b] = _mm256_blendv_ps(xt[b], v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(t[b], cidx)));
    }
  }
  for (int b = 0; b < NB; ++b) {
    max[b] = m[b];
    sum[b] = s[b];
    picked[b] = xt[b];
  }
}

// Per-lane sumexp = sum_c exp(x_c - m) for m >= every x_c of the lane (the lane's max), and the shifted sum
// SH (w: per-class weights for Shifted::kWeighted). Exact 0 is not needed in sumexp: terms below
// exp(-86.5) (-inf logits included) count as about 2.7e-38, which vanishes next to the term exp(0) = 1.
template <int NB, Shifted SH>
FASTEVAL_LANES_INLINE void block_sumexp(const __m256* col, int64_t C, const __m256* m, const float* w,
                                        __m256* sumexp, __m256* shifted) {
  __m256 e[NB], d[NB];
  for (int b = 0; b < NB; ++b) {
    const __m256 x = _mm256_sub_ps(col[b * kMaxC], m[b]);
    e[b] = exp_le0(x);
    d[b] = SH == Shifted::kWeighted ? _mm256_mul_ps(x, _mm256_set1_ps(w[0])) : x;
  }
  for (int64_t c = 1; c < C; ++c) {
    for (int b = 0; b < NB; ++b) {
      const __m256 x = _mm256_sub_ps(col[b * kMaxC + c], m[b]);
      e[b] = _mm256_add_ps(e[b], exp_le0(x));
      if constexpr (SH == Shifted::kPlain) d[b] = _mm256_add_ps(d[b], x);
      if constexpr (SH == Shifted::kWeighted) d[b] = _mm256_fmadd_ps(x, _mm256_set1_ps(w[c]), d[b]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    sumexp[b] = e[b];
    shifted[b] = SH == Shifted::kNone ? _mm256_setzero_ps() : d[b];
  }
}

// Lanes whose row needs the exact per-row pass rather than max + log(sumexp): a NaN in the row (its sum
// is NaN) or a max that is not finite (+inf, or a row of -inf only), where RowStats::lse() defines the
// result as NaN.
FASTEVAL_LANES_INLINE __m256 rows_need_row_pass(__m256 max, __m256 sum) {
  const __m256 abs_max = _mm256_andnot_ps(_mm256_set1_ps(-0.f), max);
  return _mm256_or_ps(_mm256_cmp_ps(abs_max, _mm256_set1_ps(__builtin_inff()), _CMP_NLT_UQ),
                      _mm256_cmp_ps(sum, sum, _CMP_UNORD_Q));
}

// First index of each lane's maximum, a NaN counting as the maximum (torch.argmax).
FASTEVAL_LANES_INLINE __m256i block_argmax(const __m256* col, int64_t C) {
  __m256 best = col[0];
  __m256 best_nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
  __m256i arg = _mm256_setzero_si256();
  __m256i cidx = _mm256_set1_epi32(1);
  const __m256i one = _mm256_set1_epi32(1);
  for (int64_t c = 1; c < C; ++c) {
    const __m256 v = col[c];
    const __m256 v_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    // strictly greater (ties keep the first), or the first NaN
    const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_andnot_ps(best_nan, v_nan));
    best = _mm256_blendv_ps(best, v, take);
    arg = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg), _mm256_castsi256_ps(cidx), take));
    best_nan = _mm256_or_ps(best_nan, v_nan);
    cidx = _mm256_add_epi32(cidx, one);
  }
  return arg;
}

// Rank of x_t = col[t] in each lane (t in [0, C) per lane):
//   #{c : x_c > x_t or isnan(x_c)} + #{c < t : x_c == x_t}   (x_t not NaN)
//   #{c < t : isnan(x_c)}                                    (x_t NaN)
// so rank 0 <=> block_argmax == t. xt is block_max_sum_pick's `picked`.
FASTEVAL_LANES_INLINE __m256i block_rank(const __m256* col, int64_t C, __m256i t, __m256 xt) {
  const __m256 xt_nan = _mm256_cmp_ps(xt, xt, _CMP_UNORD_Q);
  __m256i rank = _mm256_setzero_si256();
  __m256i cidx = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi32(1);
  for (int64_t c = 0; c < C; ++c) {
    const __m256 v = col[c];
    const __m256 before = _mm256_castsi256_ps(_mm256_cmpgt_epi32(t, cidx));  // c < t
    // above: v > x_t or v NaN (NLE_UQ is also true when x_t is NaN: masked off there)
    const __m256 above = _mm256_andnot_ps(xt_nan, _mm256_cmp_ps(v, xt, _CMP_NLE_UQ));
    // tie: v == x_t, or both NaN
    const __m256 tie = _mm256_or_ps(_mm256_cmp_ps(v, xt, _CMP_EQ_OQ),
                                    _mm256_and_ps(xt_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256 hit = _mm256_or_ps(above, _mm256_and_ps(before, tie));
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(hit));  // all-ones = -1
    cidx = _mm256_add_epi32(cidx, one);
  }
  return rank;
}

// ---- Medium C: rows swept one by one, their reductions transposed into the lanes -------------------
//
// For rows longer than a block holds, each of 8 rows is swept with full vectors (two sweeps: max and
// sum, then the sum of exp, the second one from cache), and the 8 per-row accumulator vectors are
// reduced together by one transposing reduction: lane r of the result belongs to row r, and the
// epilogue (log, loss) is again one vector operation for 8 rows, with no horizontal step per row.

// 8 consecutive elements of a row as floats; the masked form reads only the first n (1..7), zeros beyond.
template <typename T>
struct Vec8;
template <>
struct Vec8<float> {
  static FASTEVAL_LANES_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static FASTEVAL_LANES_INLINE __m256 load(const float* p, __m256i mask) { return _mm256_maskload_ps(p, mask); }
};
template <typename T>
struct Vec8_16 {
  static FASTEVAL_LANES_INLINE __m256 load(const T* p) {
    return Pieces16<T>::widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static FASTEVAL_LANES_INLINE __m256 load(const T* p, int n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, sizeof(uint16_t) * n);
    return Pieces16<T>::widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
};
template <>
struct Vec8<c10::BFloat16> : Vec8_16<c10::BFloat16> {};
template <>
struct Vec8<c10::Half> : Vec8_16<c10::Half> {};

// Transposing reduction: lane r of the result is op over the 8 lanes of a[r] (op: max or add; the
// order of the pairwise steps is fixed).
template <typename Op>
FASTEVAL_LANES_INLINE __m256 reduce8(const __m256* a, Op op) {
  auto half = [&](__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    // [op over lanes {0,2} / {1,3} of a0, a1 | the same on the upper half]
    const __m256 t0 = op(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
    const __m256 t1 = op(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
    // [a0 a1 a2 a3 over lanes 0..3 | a0 a1 a2 a3 over lanes 4..7]
    return op(_mm256_shuffle_ps(t0, t1, 0x44), _mm256_shuffle_ps(t0, t1, 0xEE));
  };
  const __m256 u0 = half(a[0], a[1], a[2], a[3]);
  const __m256 u1 = half(a[4], a[5], a[6], a[7]);
  return op(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
struct MaxOp {
  FASTEVAL_LANES_INLINE __m256 operator()(__m256 a, __m256 b) const { return _mm256_max_ps(a, b); }
};
struct AddOp {
  FASTEVAL_LANES_INLINE __m256 operator()(__m256 a, __m256 b) const { return _mm256_add_ps(a, b); }
};

// Softmax statistics of rows base + r * stride (r < nrows <= 8), any C >= 1, lane r = row r (lanes
// >= nrows: unspecified): per-lane max, sum_c x_c (which only detects NaN, as in block_max_sum_pick),
// sumexp = sum_c exp(x_c - max) and the shifted sum SH (see block_sumexp). Test rows_need_row_pass(max, sum)
// before using max, sumexp and shifted.
template <typename T, Shifted SH>
FASTEVAL_LANES_INLINE void rows_stats(const T* base, int64_t stride, int nrows, int64_t C, const float* w,
                                      __m256& max, __m256& sum, __m256& sumexp, __m256& shifted) {
  using V = Vec8<T>;
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  const int64_t full = C - C % 8;
  const int tail = static_cast<int>(C % 8);
  const __m256i tmask = first_lanes(tail);
  const __m256 ftmask = _mm256_castsi256_ps(tmask);
  auto load_tail = [&](const T* p) {  // zeros beyond the row
    if constexpr (std::is_same_v<T, float>) {
      return V::load(p, tmask);
    } else {
      return V::load(p, tail);
    }
  };
  // Sweep 1, from memory: max and sum.
  __m256 mv[kLanes], sv[kLanes];
  for (int r = 0; r < kLanes; ++r) {
    if (r >= nrows) {
      mv[r] = _mm256_setzero_ps();
      sv[r] = _mm256_setzero_ps();
      continue;
    }
    const T* p = base + r * stride;
    __m256 m0 = ninf, m1 = ninf, s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {
      const __m256 a = V::load(p + j), b = V::load(p + j + 8);
      m0 = _mm256_max_ps(m0, a);
      m1 = _mm256_max_ps(m1, b);
      s0 = _mm256_add_ps(s0, a);
      s1 = _mm256_add_ps(s1, b);
    }
    if (j < full) {
      const __m256 a = V::load(p + j);
      m0 = _mm256_max_ps(m0, a);
      s0 = _mm256_add_ps(s0, a);
    }
    if (tail) {
      const __m256 a = load_tail(p + full);
      m1 = _mm256_max_ps(m1, _mm256_blendv_ps(ninf, a, ftmask));
      s1 = _mm256_add_ps(s1, a);
    }
    mv[r] = _mm256_max_ps(m0, m1);
    sv[r] = _mm256_add_ps(s0, s1);
  }
  max = reduce8(mv, MaxOp{});
  sum = reduce8(sv, AddOp{});
  // Sweep 2, from cache: sum of exp (and the shifted sum).
  alignas(32) float mr[kLanes];
  _mm256_store_ps(mr, max);
  __m256 dv[kLanes];
  for (int r = 0; r < kLanes; ++r) {
    sv[r] = dv[r] = _mm256_setzero_ps();
    if (r >= nrows) continue;
    const T* p = base + r * stride;
    const char* pf = reinterpret_cast<const char*>(base + (kLanes + r) * stride);  // the same row of the next 8
    const __m256 m = _mm256_set1_ps(mr[r]);
    __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps(), d0 = e0, d1 = e0;
    auto add_shifted = [&](__m256& acc, __m256 x, const float* wj, bool masked) {
      if constexpr (SH == Shifted::kPlain) acc = _mm256_add_ps(acc, x);
      if constexpr (SH == Shifted::kWeighted) {
        acc = _mm256_fmadd_ps(x, masked ? _mm256_maskload_ps(wj, tmask) : _mm256_loadu_ps(wj), acc);
      }
    };
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {
      // The first sweep is bound by memory, this one by arithmetic: pull the next rows in meanwhile
      // (prefetches never fault). 16 elements are 64 bytes of float32, a line.
      _mm_prefetch(pf + j * sizeof(T), _MM_HINT_T0);
      if constexpr (sizeof(T) == 2) _mm_prefetch(pf + j * sizeof(T) + 32, _MM_HINT_T0);
      const __m256 a = _mm256_sub_ps(V::load(p + j), m), b = _mm256_sub_ps(V::load(p + j + 8), m);
      e0 = _mm256_add_ps(e0, exp_le0(a));
      e1 = _mm256_add_ps(e1, exp_le0(b));
      add_shifted(d0, a, w + j, false);
      add_shifted(d1, b, w + j + 8, false);
    }
    if (j < full) {
      const __m256 a = _mm256_sub_ps(V::load(p + j), m);
      e0 = _mm256_add_ps(e0, exp_le0(a));
      add_shifted(d0, a, w + j, false);
    }
    if (tail) {
      // Lanes beyond the row hold 0 - m: their exp and shift are masked off.
      const __m256 a = _mm256_and_ps(_mm256_sub_ps(load_tail(p + full), m), ftmask);
      e1 = _mm256_add_ps(e1, _mm256_and_ps(exp_le0(a), ftmask));
      add_shifted(d1, a, w + full, true);
    }
    sv[r] = _mm256_add_ps(e0, e1);
    dv[r] = _mm256_add_ps(d0, d1);
  }
  sumexp = reduce8(sv, AddOp{});
  shifted = SH == Shifted::kNone ? _mm256_setzero_ps() : reduce8(dv, AddOp{});
}

// ---- Per-lane double accumulation in a fixed order ------------------------------------------------

// Sum of the 8 lanes of many vectors, in double: 8 running sums (one per lane), combined in a fixed order
// at the end, so the result depends only on the sequence of vectors, never on threads.
struct LaneSum {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  FASTEVAL_LANES_INLINE void add(__m256 v) {
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  FASTEVAL_LANES_INLINE double total() const {
    alignas(32) double a[8];
    _mm256_store_pd(a, lo);
    _mm256_store_pd(a + 4, hi);
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  }
};

// Per-lane count of 0 / 1 values (float lanes, exact below 2^24 per lane): LaneSum's interface, cheaper.
struct LaneCount {
  __m256 n = _mm256_setzero_ps();
  FASTEVAL_LANES_INLINE void add(__m256 v) { n = _mm256_add_ps(n, v); }
  FASTEVAL_LANES_INLINE double total() const {
    alignas(32) float a[8];
    _mm256_store_ps(a, n);
    double t = 0;
    for (int k = 0; k < 8; ++k) t += a[k];
    return t;
  }
};

}  // namespace lanes
}  // namespace cpu
}  // namespace fasteval

#endif  // CPU_CAPABILITY_AVX2 || CPU_CAPABILITY_AVX512
