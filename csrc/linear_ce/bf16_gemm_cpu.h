// bfloat16 x bfloat16 -> float32 matmul of the linear cross-entropy's vocabulary chunks on CPUs with AVX512_BF16
// (VDPBF16PS: 16 float32 lanes, each += a[2j] * b[2j] + a[2j + 1] * b[2j + 1]).
//
// torch has no public CPU matmul that multiplies bfloat16 into float32 at the bfloat16 speed: its bfloat16
// matmul rounds the logits to bfloat16, and the float32 matmul of the converted operands runs at half the
// speed. This kernel computes C (rows, len) = X (rows, H) @ W_chunk (len, H)^T (+ bias) with every product
// exact and accumulated in float32, as the float32 matmul does (in another order).
//
// VDPBF16PS treats subnormal inputs as zero, flushes subnormal results to zero and cannot overflow a product
// where a fused multiply-add would not: it is only used where none of that can happen. Every nonzero operand
// must lie in [2^-56, 2^63): a bfloat16 there is a multiple of 2^-63, so every product is a multiple of
// 2^-126 below 2^126 and every partial sum is 0 or a normal float (a multiple of 2^-126 rounds to one).
// Operands outside (NaN, inf, subnormal, huge) send the chunk (pack) or the call (in_range) to the float32
// matmul instead.
//
// Layout: W_chunk is packed into panels of kNR columns, each panel (KP, kNR, 2) with KP = ceil(H / 2): the
// pair (w[c][2k], w[c][2k + 1]) of column c at [k][c], zero-padded past H and past len. X is read in place as
// pairs of one row (row stride an even number of bfloat16: H rounded up, zero-padded by the caller). A
// micro-kernel keeps an (MR, kNR) tile of float32 sums in 24 zmm registers: per pair of k, kNR / 16 panel
// loads, MR broadcasts of the row's pair, MR * kNR / 16 VDPBF16PS.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTEVAL_BF16_GEMM 1
#define FASTEVAL_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define FASTEVAL_BF16_GEMM 0
#endif

namespace fasteval {
namespace linear_ce {
namespace bf16 {

constexpr int kNR = 48;  // panel width: 3 zmm of float32 sums per row
constexpr int kMR = 8;   // rows per micro-kernel tile
constexpr int kNV = kNR / 16;

// Whether the bfloat16 kernel may run: compiled for x86-64, the CPU has AVX512_BF16 (and the OS saves the
// AVX-512 state: __builtin_cpu_supports checks both), and FASTEVAL_CPU_BF16_DOT is not "0" (read at each
// call, so that the float32 route can be forced, e.g. to compare the two).
inline bool available() {
#if FASTEVAL_BF16_GEMM
  static const bool cpu = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  if (!cpu) return false;
  const char* e = std::getenv("FASTEVAL_CPU_BF16_DOT");
  return !(e && e[0] == '0' && e[1] == '\0');
#else
  return false;
#endif
}

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

inline int64_t pairs(int64_t H) { return (H + 1) / 2; }

// bfloat16 elements of the packed chunk of len columns.
inline int64_t packed_size(int64_t len, int64_t H) { return (len + kNR - 1) / kNR * kNR * pairs(H) * 2; }

// Packs w[0:len] (rows of H bfloat16, stride H) into out (packed_size(len, H) elements); false if an operand
// is outside the exact range (out is then incomplete and must not be used).
inline bool pack(const uint16_t* w, int64_t len, int64_t H, uint16_t* out) {
  const int64_t KP = pairs(H), P = (len + kNR - 1) / kNR;
  bool ok = true;
  for (int64_t p = 0; p < P; ++p) {
    for (int c = 0; c < kNR; ++c) {
      const int64_t col = p * kNR + c;
      uint16_t* o = out + (p * KP * kNR + c) * 2;
      if (col >= len) {
        for (int64_t k = 0; k < KP; ++k) o[k * kNR * 2] = o[k * kNR * 2 + 1] = 0;
        continue;
      }
      const uint16_t* r = w + col * H;
      for (int64_t k = 0; k < KP; ++k) {
        const uint16_t lo = r[2 * k], hi = 2 * k + 1 < H ? r[2 * k + 1] : uint16_t(0);
        ok &= exact_operand(lo) & exact_operand(hi);
        o[k * kNR * 2] = lo;
        o[k * kNR * 2 + 1] = hi;
      }
    }
  }
  return ok;
}

#if FASTEVAL_BF16_GEMM

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// c[r][0:ncols] = sum_k a_r[k] b[k][0:ncols] (+ bias) for the MR rows a_r = a + r * lda.
template <int MR>
FASTEVAL_BF16_TARGET void micro(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t KP, const float* bias,
                                float* c, int64_t ldc, int ncols) {
  __m512 acc[MR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < kNV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < KP; ++k) {
    __m512bh bv[kNV];
#pragma GCC unroll 3
    for (int j = 0; j < kNV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + (k * kNR + j * 16) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(a + r * lda + 2 * k)));
#pragma GCC unroll 3
      for (int j = 0; j < kNV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
#pragma GCC unroll 3
  for (int j = 0; j < kNV; ++j) {
    const int n = std::min(16, std::max(0, ncols - j * 16));
    if (n == 0) break;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 bj = bias ? _mm512_maskz_loadu_ps(m, bias + j * 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(c + r * ldc + j * 16, m, _mm512_add_ps(acc[r][j], bj));
  }
}

template <int MR>
FASTEVAL_BF16_TARGET void rows_tile(const uint16_t* x, int64_t ldx, const uint16_t* packed, int64_t KP, int64_t len,
                                    const float* bias, float* c, int64_t ldc) {
  for (int64_t p0 = 0; p0 < len; p0 += kNR) {
    micro<MR>(x, ldx, packed + p0 * KP * 2, KP, bias ? bias + p0 : nullptr, c + p0, ldc,
              static_cast<int>(std::min<int64_t>(kNR, len - p0)));
  }
}

// c[i - r0][0:len] = x[i] @ W_chunk^T (+ bias) for rows i in [r0, r1): x rows of ldx bfloat16 (even, the
// pairs past H zero), packed = pack(W_chunk), c with row stride ldc.
FASTEVAL_BF16_TARGET inline void gemm_rows(const uint16_t* x, int64_t ldx, int64_t H, const uint16_t* packed,
                                           int64_t len, const float* bias, int64_t r0, int64_t r1, float* c,
                                           int64_t ldc) {
  const int64_t KP = pairs(H);
  int64_t i = r0;
  for (; i + kMR <= r1; i += kMR) rows_tile<kMR>(x + i * ldx, ldx, packed, KP, len, bias, c + (i - r0) * ldc, ldc);
  const uint16_t* xi = x + i * ldx;
  float* ci = c + (i - r0) * ldc;
  switch (r1 - i) {
    case 7: rows_tile<7>(xi, ldx, packed, KP, len, bias, ci, ldc); break;
    case 6: rows_tile<6>(xi, ldx, packed, KP, len, bias, ci, ldc); break;
    case 5: rows_tile<5>(xi, ldx, packed, KP, len, bias, ci, ldc); break;
    case 4: rows_tile<4>(xi, ldx, packed, KP, len, bias, ci, ldc); break;
    case 3: rows_tile<3>(xi, ldx, packed, KP, len, bias, ci, ldc); break;
    case 2: rows_tile<2>(xi, ldx, packed, KP, len, bias, ci, ldc); break;
    case 1: rows_tile<1>(xi, ldx, packed, KP, len, bias, ci, ldc); break;
    default: break;
  }
}

#else

inline void gemm_rows(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, const float*, int64_t, int64_t,
                      float*, int64_t) {}

#endif

}  // namespace bf16
}  // namespace linear_ce
}  // namespace fasteval
