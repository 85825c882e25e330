#pragma once
// Order statistics of one row of scores on the CPU, in one SIMD read of the row, shared by the
// confusion-matrix / top-k kernels and the fused evaluation pass.
//
// Both follow the order of common/order.h (torch.sort(descending=True, stable=True): larger scores
// first, NaN above every number, ties in index order), a vector at a time:
//   row_argmax(x)  == order::ArgMax over the row == torch.argmax(x)
//   row_rank(x, t) == order::RankParts over the row, counted as C - #{x_j <= x_t} + #{j < t : x_j == x_t}
//                     (x_t not NaN: "not <=" is "larger or NaN"), #{j < t : isnan(x_j)} (x_t NaN)
// Values are compared after exact conversion to float (bfloat16 / float16 inputs) or as float.
#include "common/cpu_vec.h"
#include "common/order.h"

#include <cstdint>

namespace fasteval {
namespace cpu {

// Bit i of the result is set where lane i of the chunk's mask vector is set (all-ones).
FASTEVAL_ALWAYS_INLINE uint32_t chunk_mask_bits(const Chunk& m) {
  // zero_mask(): bit i set where lane i == 0.0; a set mask lane is all-ones (a NaN pattern), never 0.
  const uint32_t lo = ~static_cast<uint32_t>(m.lo.zero_mask()) & ((1u << kVecWidth) - 1);
  const uint32_t hi = ~static_cast<uint32_t>(m.hi.zero_mask()) & ((1u << kVecWidth) - 1);
  return lo | (hi << kVecWidth);
}

// Index of the first element equal to v (first NaN when v is NaN) in row[0, C); C if none.
template <typename T>
inline int64_t row_find_first(const T* row, int64_t C, float v) {
  using L = ChunkLoader<T>;
  const bool nan = std::isnan(v);
  const fVec vv(v);
  int64_t j = 0;
  for (; j + kChunk <= C; j += kChunk) {
    const Chunk c = L::load(row + j);
    const Chunk m = nan ? Chunk{c.lo != c.lo, c.hi != c.hi} : Chunk{c.lo == vv, c.hi == vv};
    const uint32_t bits = chunk_mask_bits(m);
    if (bits) return j + __builtin_ctz(bits);
  }
  for (; j < C; ++j) {
    const float x = static_cast<float>(row[j]);
    if (nan ? std::isnan(x) : x == v) return j;
  }
  return C;
}

// Row maximum (NaN if any element is NaN), vectorized, NaN-propagating.
template <typename T>
inline float row_max(const T* row, int64_t C) {
  using L = ChunkLoader<T>;
  const fVec ninf = neg_inf_vec();
  fVec m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 2 * kChunk <= C; j += 2 * kChunk) {
    const Chunk a = L::load(row + j);
    const Chunk b = L::load(row + j + kChunk);
    m0 = at::vec::maximum(m0, a.lo);
    m1 = at::vec::maximum(m1, a.hi);
    m2 = at::vec::maximum(m2, b.lo);
    m3 = at::vec::maximum(m3, b.hi);
  }
  float m = hmax(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
  for (; j < C; ++j) {
    const float x = static_cast<float>(row[j]);
    if (std::isnan(x) || x > m) m = x;
    if (std::isnan(m)) break;
  }
  return m;
}

// torch.argmax of a row: a vectorized max, then the first index holding it (L1-resident re-read,
// stops at the first hit).
template <typename T>
inline int64_t row_argmax(const T* row, int64_t C) {
  return row_find_first(row, C, row_max(row, C));
}

// Rank of element t of the row in the order above. Counts are accumulated in float lanes (exact below
// 2^24 per lane) and flushed to int64 every kRankBlock elements.
constexpr int64_t kRankBlock = int64_t(1) << 20;

template <typename T>
inline int64_t row_rank(const T* row, int64_t C, int64_t t) {
  using L = ChunkLoader<T>;
  const float xt = static_cast<float>(row[t]);
  if (std::isnan(xt)) {
    int64_t r = 0;
    for (int64_t j = 0; j < t; ++j) r += std::isnan(static_cast<float>(row[j]));
    return r;
  }
  const fVec vt(xt), one(1.f);
  // rank = #{x_j > x_t or NaN} + #{j < t : x_j == x_t} = C - #{x_j <= x_t} + #{j < t : x_j == x_t}
  int64_t le = 0, eq_before = 0;
  int64_t j = 0;
  while (j + kChunk <= C) {
    const int64_t stop = std::min(C - C % kChunk, j + kRankBlock);
    fVec a_lo(0.f), a_hi(0.f), e_lo(0.f), e_hi(0.f);
    const int64_t before_end = std::max(j, std::min(stop, t - t % kChunk));  // chunks before t's chunk
    for (; j < before_end; j += kChunk) {
      const Chunk c = L::load(row + j);
      a_lo = a_lo + ((c.lo <= vt) & one);
      a_hi = a_hi + ((c.hi <= vt) & one);
      e_lo = e_lo + ((c.lo == vt) & one);
      e_hi = e_hi + ((c.hi == vt) & one);
    }
    for (; j < stop; j += kChunk) {
      const Chunk c = L::load(row + j);
      a_lo = a_lo + ((c.lo <= vt) & one);
      a_hi = a_hi + ((c.hi <= vt) & one);
    }
    le += static_cast<int64_t>(hsum(a_lo + a_hi));
    eq_before += static_cast<int64_t>(hsum(e_lo + e_hi));
  }
  for (; j < C; ++j) le += static_cast<float>(row[j]) <= xt;
  // Elements of t's own chunk before t (whole chunks before it were counted above, including the case
  // where t lies in the scalar tail).
  for (int64_t k = t - t % kChunk; k < t; ++k) eq_before += static_cast<float>(row[k]) == xt;
  return C - le + eq_before;
}

}  // namespace cpu
}  // namespace fasteval
