// The linear cross-entropy's own CPU matmuls of its vocabulary chunks: C (rows, len) = X (rows, H) @ W_chunk
// (len, H)^T (+ bias) in float32, a few rows at a time, so that each thread hands its rows to the row pass while
// they are in its cache (linear_ce_cpu.cpp, for_chunk_rows). Two kernels, for x86-64 CPUs with AVX-512:
//
// * float32 (namespace f32): products and sums by fused multiply-adds, as a BLAS does them (in another order);
//   the weights of any dtype are converted to float32 as they are packed. About 215 GFLOPS on two Zen 4 cores
//   (the FMA peak: 234) against 140-165 for torch's matmul on the chunks of (8192, 256, 32000). The backward's
//   gradient matmuls use it too: grad_input += dL @ W_chunk (W_chunk packed by pack_rows: row copies) and
//   grad_linear_weight = dL^T @ input (gemm_tn: the columns of dL broadcast, the input read in place).
// * bfloat16 (namespace bf16), on CPUs with AVX512_BF16: VDPBF16PS (16 float32 lanes, each += a[2j] * b[2j] +
//   a[2j + 1] * b[2j + 1]) on bfloat16 input and weight, 350-400 GFLOPS there. torch has no public CPU matmul
//   that multiplies bfloat16 into float32 at the bfloat16 speed: its bfloat16 matmul rounds the logits to
//   bfloat16. Every product of two bfloat16 is exact in float32 and the sums are float32, as in the float32
//   kernel; but VDPBF16PS treats subnormal inputs as zero, flushes subnormal results to zero and cannot
//   overflow a product where a fused multiply-add would not, so it is only used where none of that can happen.
//   Every nonzero operand must lie in [2^-56, 2^63): a bfloat16 there is a multiple of 2^-63, so every product
//   is a multiple of 2^-126 below 2^126 and every partial sum is 0 or a normal float (a multiple of 2^-126
//   rounds to one). Operands outside (NaN, inf, subnormal, huge) send the chunk (pack) or the call (in_range)
//   to the float32 kernel instead.
//
// Layout: W_chunk is packed into panels of kNR columns. float32: each panel (H, kNR). bfloat16: each panel
// (KP, kNR, 2) with KP = ceil(H / 2): the pair (w[c][2k], w[c][2k + 1]) of column c at [k][c], zero-padded past
// H. Both zero-padded past len. X is read in place (bfloat16: as pairs of one row, the row stride an even number
// of bfloat16: H rounded up, zero-padded by the caller). A micro-kernel keeps an (MR, kNR) tile of float32 sums
// in 24 zmm registers: per k (bfloat16: per pair of k), kNR / 16 panel loads, MR broadcasts of the row's
// element (pair), MR * kNR / 16 multiply-adds. A panel of at most 16 or 32 columns (the last of a chunk or of
// the gradient's H columns) takes a micro-kernel of one or two vectors (detail::by_panel_width): 256 columns,
// five panels and 16 columns, take the multiply-adds of 256 columns, not of 288.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTEVAL_OWN_MATMUL 1
#define FASTEVAL_F32_TARGET __attribute__((target("avx512f")))
#define FASTEVAL_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define FASTEVAL_OWN_MATMUL 0
#endif

namespace fasteval {
namespace linear_ce {
namespace own {

constexpr int kNR = 48;  // panel width: 3 zmm of float32 sums per row
constexpr int kMR = 8;   // rows per micro-kernel tile

// Whether the own kernels may run: compiled for x86-64, the CPU has AVX-512 (and the OS saves its state:
// __builtin_cpu_supports checks both), and FASTEVAL_LCE_OWN_MATMUL is not "0" (read at each call, so that
// torch's matmul can be forced, e.g. to compare the two).
inline bool available() {
#if FASTEVAL_OWN_MATMUL
  static const bool cpu = __builtin_cpu_supports("avx512f");
  if (!cpu) return false;
  const char* e = std::getenv("FASTEVAL_LCE_OWN_MATMUL");
  return !(e && e[0] == '0' && e[1] == '\0');
#else
  return false;
#endif
}

// Whether the bfloat16 kernel may run as well (AVX512_BF16).
inline bool bf16_available() {
#if FASTEVAL_OWN_MATMUL
  static const bool cpu = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return cpu && available();
#else
  return false;
#endif
}

#if FASTEVAL_OWN_MATMUL
namespace detail {

// The bias of the tile's columns (masked past ncols) and the masked stores of its MR x (16 NV) sums (ACC: added
// to the tile's values in c, bias null).
template <int MR, int NV, bool ACC = false>
FASTEVAL_F32_TARGET inline void store_tile(__m512 (&acc)[MR][NV], const float* bias, float* c, int64_t ldc,
                                           int ncols) {
#pragma GCC unroll 3
  for (int j = 0; j < NV; ++j) {
    const int n = std::min(16, std::max(0, ncols - j * 16));
    if (n == 0) break;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    if constexpr (ACC) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        float* o = c + r * ldc + j * 16;
        _mm512_mask_storeu_ps(o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), acc[r][j]));
      }
    } else {
      const __m512 bj = bias ? _mm512_maskz_loadu_ps(m, bias + j * 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(c + r * ldc + j * 16, m, _mm512_add_ps(acc[r][j], bj));
    }
  }
}

// Transposes 16 rows of 16 32-bit elements in place (r[j][i] = r[i][j] before).
FASTEVAL_F32_TARGET inline void transpose16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[g + q] (g = 0, 4, 8, 12), 128-bit lane L: the rows g to g + 3 of the column 4L + q.
#pragma GCC unroll 4
  for (int g = 0; g < 16; g += 4) {
    b[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
    b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
    b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  // The column 4L + q: the lanes L of b[q], b[4 + q], b[8 + q], b[12 + q].
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x44), c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xee);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xee);
    r[q] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
    r[8 + q] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
  }
}

// The n (1 to 16) elements of T at p as float32 bits, zero past n.
template <typename T>
FASTEVAL_F32_TARGET inline __m512i load16_as_f32(const T* p, int n) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_castps_si512(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
    __m256i h;
    if (n == 16) {
      h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    } else {
      alignas(32) uint16_t tail[16] = {};
      std::memcpy(tail, p, sizeof(T) * static_cast<size_t>(n));
      h = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    } else {
      return _mm512_castps_si512(_mm512_cvtph_ps(h));
    }
  }
}

// Rows [r0, r1) as tiles of kMR rows, then one tile of the 1 to 7 rows left: tile(MR, i) for the MR rows from
// row i on (MR as a std::integral_constant, so that the tile's size is known at compile time).
template <class Tile>
inline void rows_by_tiles(int64_t r0, int64_t r1, const Tile& tile) {
  int64_t i = r0;
  for (; i + kMR <= r1; i += kMR) tile(std::integral_constant<int, kMR>(), i);
  switch (r1 - i) {
    case 7: tile(std::integral_constant<int, 7>(), i); break;
    case 6: tile(std::integral_constant<int, 6>(), i); break;
    case 5: tile(std::integral_constant<int, 5>(), i); break;
    case 4: tile(std::integral_constant<int, 4>(), i); break;
    case 3: tile(std::integral_constant<int, 3>(), i); break;
    case 2: tile(std::integral_constant<int, 2>(), i); break;
    case 1: tile(std::integral_constant<int, 1>(), i); break;
    default: break;
  }
}

// The panel [p0, p0 + ncols) of a chunk with the micro-kernel of as many 16-column vectors as it needs:
// micro(NV) for NV = ceil(ncols / 16) (a std::integral_constant), so that the last panel of a chunk whose width is
// not a multiple of kNR (256 columns: five panels and 16 columns) does not multiply zeros.
template <class Micro>
inline void by_panel_width(int ncols, const Micro& micro) {
  if (ncols > 32) {
    micro(std::integral_constant<int, 3>());
  } else if (ncols > 16) {
    micro(std::integral_constant<int, 2>());
  } else {
    micro(std::integral_constant<int, 1>());
  }
}

}  // namespace detail
#endif

namespace f32 {

// float32 elements of a packed chunk of len columns.
inline int64_t packed_size(int64_t len, int64_t H) { return (len + kNR - 1) / kNR * kNR * H; }

#if FASTEVAL_OWN_MATMUL

// Packs the panels [p0, p1) of w[0:len] (rows of H elements of T, stride H) into out (packed_size(len, H)
// floats in all) as float32, 16 columns by 16 elements at a time (detail::transpose16).
template <typename T>
FASTEVAL_F32_TARGET void pack(const T* w, int64_t len, int64_t H, float* out, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int cb = 0; cb < kNR; cb += 16) {
      const int64_t col0 = p * kNR + cb;
      for (int64_t k0 = 0; k0 < H; k0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, H - k0));
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          r[i] = col0 + i < len ? detail::load16_as_f32(w + (col0 + i) * H + k0, n) : _mm512_setzero_si512();
        }
        detail::transpose16(r);
        float* o = out + p * H * kNR + k0 * kNR + cb;
        for (int j = 0; j < n; ++j) _mm512_storeu_si512(o + j * kNR, r[j]);
      }
    }
  }
}

// c[r][0:ncols] = sum_k a_r[k] b[k][0:ncols] (+ bias) for the MR rows a_r, ncols <= 16 NV, k < K: a_r[k] = a[r * lda
// + k] (TA: a[k * lda + r], the columns of a row-major a), b[k] = b + k * ldb (MASKB: only its ncols elements are
// read; otherwise 16 NV, the packed panels' zero padding). ACC: c[r] += the sums (bias null).
template <int MR, int NV, bool ACC = false, bool TA = false, bool MASKB = false>
FASTEVAL_F32_TARGET void micro(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias,
                               float* c, int64_t ldc, int ncols) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  const int tail = ncols - 16 * (NV - 1);
  const __mmask16 last = static_cast<__mmask16>(tail >= 16 ? 0xffffu : (1u << tail) - 1u);
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) {
      bv[j] = MASKB && j == NV - 1 ? _mm512_maskz_loadu_ps(last, b + k * ldb + j * 16)
                                   : _mm512_loadu_ps(b + k * ldb + j * 16);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(TA ? a[k * lda + r] : a[r * lda + k]);
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
  detail::store_tile<MR, NV, ACC>(acc, bias, c, ldc, ncols);
}

// c[i - r0][0:len] = x[i] @ W_chunk^T (+ bias) for rows i in [r0, r1) (ACC: c[i - r0][0:len] += x[i] @ W_chunk^T,
// bias null): x rows of ldx floats, packed = pack(W_chunk) or pack_rows, c with row stride ldc.
template <bool ACC = false>
inline void gemm_rows(const float* x, int64_t ldx, int64_t H, const float* packed, int64_t len, const float* bias,
                      int64_t r0, int64_t r1, float* c, int64_t ldc) {
  detail::rows_by_tiles(r0, r1, [&](auto mr, int64_t i) {
    constexpr int MR = decltype(mr)::value;
    for (int64_t p0 = 0; p0 < len; p0 += kNR) {
      const int ncols = static_cast<int>(std::min<int64_t>(kNR, len - p0));
      detail::by_panel_width(ncols, [&](auto nv) {
        micro<MR, decltype(nv)::value, ACC>(x + i * ldx, ldx, packed + p0 * H, kNR, H, bias ? bias + p0 : nullptr,
                                            c + (i - r0) * ldc + p0, ldc, ncols);
      });
    }
  });
}

// Packs the panels [p0, p1) of the (K, n) row-major matrix w (row stride n, elements of T) as gemm_rows' weights
// with K = K and n columns: panel p holds w[k][p kNR : p kNR + kNR] for each k, zero past n. The backward's
// W_chunk (len, H) packs this way for grad_input += dL @ W_chunk: row copies, no transpose.
template <typename T>
FASTEVAL_F32_TARGET void pack_rows(const T* w, int64_t K, int64_t n, float* out, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* o = out + p * kNR * K;
    for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 3
      for (int j = 0; j < kNR; j += 16) {
        const int64_t col = p * kNR + j;
        const int m = static_cast<int>(std::min<int64_t>(16, n - col));
        const __m512i v = m > 0 ? detail::load16_as_f32(w + k * n + col, m) : _mm512_setzero_si512();
        _mm512_storeu_si512(o + k * kNR + j, v);
      }
    }
  }
}

// c[r - r0][0:n] = sum_{k < K} a[k][r] b[k][0:n] (acc: +=) for the columns r in [r0, r1) of the row-major a (row
// stride lda) and the row-major b (row stride ldb, n columns read): a^T b without packing, e.g. the backward's
// grad_linear_weight[chunk] = dL^T @ input over a block of K rows, with c of row stride ldc.
inline void gemm_tn(const float* a, int64_t lda, int64_t r0, int64_t r1, const float* b, int64_t ldb, int64_t n,
                    int64_t K, bool acc, float* c, int64_t ldc) {
  detail::rows_by_tiles(r0, r1, [&](auto mr, int64_t i) {
    constexpr int MR = decltype(mr)::value;
    for (int64_t p0 = 0; p0 < n; p0 += kNR) {
      const int ncols = static_cast<int>(std::min<int64_t>(kNR, n - p0));
      float* ct = c + (i - r0) * ldc + p0;
      detail::by_panel_width(ncols, [&](auto nv) {
        constexpr int NV = decltype(nv)::value;
        if (acc) {
          micro<MR, NV, true, true, true>(a + i, lda, b + p0, ldb, K, nullptr, ct, ldc, ncols);
        } else {
          micro<MR, NV, false, true, true>(a + i, lda, b + p0, ldb, K, nullptr, ct, ldc, ncols);
        }
      });
    }
  });
}

#else

template <typename T>
inline void pack(const T*, int64_t, int64_t, float*, int64_t, int64_t) {}
template <bool ACC = false>
inline void gemm_rows(const float*, int64_t, int64_t, const float*, int64_t, const float*, int64_t, int64_t, float*,
                      int64_t) {}
template <typename T>
inline void pack_rows(const T*, int64_t, int64_t, float*, int64_t, int64_t) {}
inline void gemm_tn(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, bool, float*,
                    int64_t) {}

#endif

}  // namespace f32

namespace bf16 {

// A bfloat16 (its bits) the kernel multiplies exactly: zero, or a magnitude in [2^-56, 2^63) (biased
// exponent 71 to 189; NaN and inf have 255, subnormals 0).
inline bool exact_operand(uint16_t b) {
  const unsigned e = (b >> 7) & 0xffu;
  return (b & 0x7fffu) == 0 || (e >= 71u && e <= 189u);
}

inline bool in_range(const uint16_t* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= exact_operand(v[i]);
  return ok;
}

// Whether one of n bfloat16 (bits) is subnormal, which VDPBF16PS (and torch's bfloat16 matmul with it) reads as
// zero.
inline bool any_subnormal(const uint16_t* v, int64_t n) {
  bool any = false;
  for (int64_t i = 0; i < n; ++i) any |= (v[i] & 0x7f80u) == 0 && (v[i] & 0x7fu) != 0;
  return any;
}

inline int64_t pairs(int64_t H) { return (H + 1) / 2; }

// bfloat16 elements of the packed chunk of len columns.
inline int64_t packed_size(int64_t len, int64_t H) { return (len + kNR - 1) / kNR * kNR * pairs(H) * 2; }

#if FASTEVAL_OWN_MATMUL

// The lanes of 32 bfloat16 (bits) that exact_operand refuses.
FASTEVAL_BF16_TARGET inline __mmask32 inexact_lanes(__m512i v) {
  const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7fff));
  const __m512i e = _mm512_srli_epi16(mag, 7);
  const __mmask32 outside = _mm512_cmp_epu16_mask(e, _mm512_set1_epi16(71), _MM_CMPINT_LT) |
                            _mm512_cmp_epu16_mask(e, _mm512_set1_epi16(189), _MM_CMPINT_NLE);
  return _mm512_test_epi16_mask(mag, mag) & outside;
}

// Packs the panels [p0, p1) of w[0:len] (rows of H bfloat16, stride H) into out (packed_size(len, H) elements
// in all), 16 columns by 16 pairs at a time (detail::transpose16 of the pairs as 32-bit elements); false if an
// operand is outside the exact range (out is then incomplete and must not be used).
FASTEVAL_BF16_TARGET inline bool pack(const uint16_t* w, int64_t len, int64_t H, uint16_t* out, int64_t p0,
                                      int64_t p1) {
  const int64_t KP = pairs(H);
  __mmask32 bad = 0;
  for (int64_t p = p0; p < p1; ++p) {
    for (int cb = 0; cb < kNR; cb += 16) {
      const int64_t col0 = p * kNR + cb;
      for (int64_t k0 = 0; k0 < KP; k0 += 16) {
        const int64_t e = std::min<int64_t>(32, H - 2 * k0);  // elements of the block in a row (odd H: the last
        const __mmask32 m = e == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << e) - 1u);  // pair's 2nd is 0)
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          r[i] = col0 + i < len ? _mm512_maskz_loadu_epi16(m, w + (col0 + i) * H + 2 * k0) : _mm512_setzero_si512();
          bad |= inexact_lanes(r[i]);
        }
        detail::transpose16(r);
        const int n = static_cast<int>(std::min<int64_t>(16, KP - k0));
        uint16_t* o = out + (p * KP * kNR + k0 * kNR + cb) * 2;
        for (int j = 0; j < n; ++j) _mm512_storeu_si512(o + j * kNR * 2, r[j]);
      }
    }
  }
  return bad == 0;
}

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// c[r][0:ncols] = sum_k a_r[k] b[k][0:ncols] (+ bias) for the MR rows a_r = a + r * lda (ACC: c[r] += the sums),
// ncols <= 16 NV.
template <int MR, int NV, bool ACC = false>
FASTEVAL_BF16_TARGET void micro(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t KP, const float* bias,
                                float* c, int64_t ldc, int ncols) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < KP; ++k) {
    __m512bh bv[NV];
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + (k * kNR + j * 16) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(a + r * lda + 2 * k)));
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
  detail::store_tile<MR, NV, ACC>(acc, bias, c, ldc, ncols);
}

// c[i - r0][0:len] = x[i] @ W_chunk^T (+ bias) for rows i in [r0, r1) (ACC: c[i - r0][0:len] += x[i] @
// W_chunk^T, bias null): x rows of ldx bfloat16 (even, the pairs past H zero), packed = pack(W_chunk), c with
// row stride ldc.
template <bool ACC = false>
inline void gemm_rows(const uint16_t* x, int64_t ldx, int64_t H, const uint16_t* packed, int64_t len,
                      const float* bias, int64_t r0, int64_t r1, float* c, int64_t ldc) {
  const int64_t KP = pairs(H);
  detail::rows_by_tiles(r0, r1, [&](auto mr, int64_t i) {
    constexpr int MR = decltype(mr)::value;
    for (int64_t p0 = 0; p0 < len; p0 += kNR) {
      const int ncols = static_cast<int>(std::min<int64_t>(kNR, len - p0));
      detail::by_panel_width(ncols, [&](auto nv) {
        micro<MR, decltype(nv)::value, ACC>(x + i * ldx, ldx, packed + p0 * KP * 2, KP, bias ? bias + p0 : nullptr,
                                            c + (i - r0) * ldc + p0, ldc, ncols);
      });
    }
  });
}

// Rounds the n floats of row to bfloat16 (to nearest, ties to even, as c10::BFloat16; a NaN stays a NaN):
// row[j] becomes the rounded value and out[j] its bits. True if a rounded value is subnormal (see any_subnormal).
FASTEVAL_BF16_TARGET inline bool round_row(float* row, int64_t n, uint16_t* out) {
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), qnan = _mm512_set1_epi32(0x7fc00000);
  const __m512i exp_bits = _mm512_set1_epi32(0x7f800000), frac_bits = _mm512_set1_epi32(0x007f0000);
  __mmask16 sub = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, row + j);
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
    __m512i r = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(bias, lsb)), _mm512_set1_epi32(-65536));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
    _mm512_mask_storeu_ps(row + j, m, _mm512_castsi512_ps(r));
    _mm256_mask_storeu_epi16(out + j, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    sub |= _mm512_mask_testn_epi32_mask(_mm512_mask_test_epi32_mask(m, r, frac_bits), r, exp_bits);
  }
  return sub != 0;
}

// Few rows: out[i][c] = x[i] . w[c] (+ bias[c]) for the M rows x + i * ldx and the columns [c0, c1) of w (rows
// of H bfloat16, stride H), one column at a time straight from w (no packing: the weights are read once).
// Checks the weights as it goes: false if one is outside the exact range (out is then not to be used).
template <int M>
FASTEVAL_BF16_TARGET bool dot_columns(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t H, int64_t c0,
                                      int64_t c1, const float* bias, float* out, int64_t ldo) {
  const int64_t full = H - H % 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (H - full)) - 1u);
  __mmask32 bad = 0;
  for (int64_t c = c0; c < c1; ++c) {
    const uint16_t* wc = w + c * H;
    __m512 acc[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t h = 0; h < full; h += 32) {
      const __m512i wv = _mm512_loadu_si512(wc + h);
      bad |= inexact_lanes(wv);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + h), (__m512bh)wv);
      }
    }
    if (full < H) {
      const __m512i wv = _mm512_maskz_loadu_epi16(tail, wc + full);
      bad |= inexact_lanes(wv);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + i * ldx + full), (__m512bh)wv);
      }
    }
    const float b = bias ? bias[c] : 0.f;
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) out[i * ldo + c] = _mm512_reduce_add_ps(acc[i]) + b;
  }
  return bad == 0;
}

// dot_columns for rows [0, n), 8 at a time, over blocks of columns that stay in the cache meanwhile; false if a
// weight is outside the exact range.
inline bool dot_rows(const uint16_t* x, int64_t ldx, int64_t n, const uint16_t* w, int64_t H, int64_t c0, int64_t c1,
                     const float* bias, float* out, int64_t ldo) {
  const int64_t block = std::max<int64_t>(1, (int64_t(128) << 10) / (2 * std::max<int64_t>(H, 1)));
  bool exact = true;
  for (int64_t b0 = c0; b0 < c1; b0 += block) {
    const int64_t b1 = std::min(c1, b0 + block);
    detail::rows_by_tiles(0, n, [&](auto mr, int64_t i) {
      exact &= dot_columns<decltype(mr)::value>(x + i * ldx, ldx, w, H, b0, b1, bias, out + i * ldo, ldo);
    });
  }
  return exact;
}

#else

inline bool pack(const uint16_t*, int64_t, int64_t, uint16_t*, int64_t, int64_t) { return false; }
template <bool ACC = false>
inline void gemm_rows(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, const float*, int64_t, int64_t,
                      float*, int64_t) {}
inline bool round_row(float*, int64_t, uint16_t*) { return false; }
inline bool dot_rows(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, const float*,
                     float*, int64_t) {
  return false;
}

#endif

}  // namespace bf16
}  // namespace own
}  // namespace linear_ce
}  // namespace fasteval
