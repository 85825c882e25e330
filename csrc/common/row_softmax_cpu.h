#pragma once
// One-read softmax statistics of a row of logits on the CPU, shared by the cross-entropy kernels and
// the fused evaluation pass.
//
// The row is processed in blocks of kBlock elements. For each block a first sweep (from memory) finds
// the block max (and, when asked, sum_c w_c x_c); a second sweep over the same block, now in L1,
// accumulates exp(x - m) while prefetching the next block. The running sum is rescaled once per block when the max grows, so the row is
// read from memory once and exp is evaluated once per element.
#include "common/cpu_vec.h"

namespace fasteval {
namespace cpu {

constexpr int64_t kBlock = 4096;  // elements per block: 16 KiB of float32, L1-resident

struct RowStats {
  float max;      // row max (NaN if any element is NaN)
  float sumexp;   // sum_c exp(x_c - max)
  float sum_wx;   // sum_c w_c x_c (or sum_c x_c without weights); only when WITH_SUM
  // log-sum-exp; NaN when the max is not finite (NaN, +inf, or an all -inf row), as torch's
  // log_softmax produces NaN there.
  inline float lse() const { return std::isfinite(max) ? max + std::log(sumexp) : std::numeric_limits<float>::quiet_NaN(); }
};

// WITH_SUM: also compute sum_wx; w (may be null) are per-class weights for it.
template <typename T, bool WITH_SUM>
inline RowStats row_softmax_stats(const T* row, int64_t C, const float* w) {
  using L = ChunkLoader<T>;
  const fVec ninf = neg_inf_vec();
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.f;
  fVec sx_lo(0.f), sx_hi(0.f);
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t len = std::min(kBlock, C - b0);
    const T* p = row + b0;
    const int64_t full = len - len % kChunk;
    // Sweep 1: block max (and weighted sum).
    fVec mx_lo = ninf, mx_hi = ninf;
    int64_t j = 0;
    for (; j < full; j += kChunk) {
      Chunk c = L::load(p + j);
      mx_lo = at::vec::maximum(mx_lo, c.lo);
      mx_hi = at::vec::maximum(mx_hi, c.hi);
      if constexpr (WITH_SUM) {
        if (w) {
          Chunk cw = ChunkLoader<float>::load(w + b0 + j);
          sx_lo = at::vec::fmadd(c.lo, cw.lo, sx_lo);
          sx_hi = at::vec::fmadd(c.hi, cw.hi, sx_hi);
        } else {
          sx_lo = sx_lo + c.lo;
          sx_hi = sx_hi + c.hi;
        }
      }
    }
    if (j < len) {
      const int64_t n = len - j;
      Chunk c = L::load(p + j, n);  // zero-filled beyond n
      if constexpr (WITH_SUM) {
        if (w) {
          Chunk cw = ChunkLoader<float>::load(w + b0 + j, n);
          sx_lo = at::vec::fmadd(c.lo, cw.lo, sx_lo);
          sx_hi = at::vec::fmadd(c.hi, cw.hi, sx_hi);
        } else {
          sx_lo = sx_lo + c.lo;
          sx_hi = sx_hi + c.hi;
        }
      }
      Chunk cm = mask_tail(c, n, ninf);
      mx_lo = at::vec::maximum(mx_lo, cm.lo);
      mx_hi = at::vec::maximum(mx_hi, cm.hi);
    }
    const float bm = hmax(at::vec::maximum(mx_lo, mx_hi));
    if (std::isnan(bm)) {
      m = bm;  // sticky: the result is NaN
      s = std::numeric_limits<float>::quiet_NaN();
    } else if (bm > m) {
      if (b0 > 0) s *= std::exp(m - bm);  // rescale the running sum (it is still 0 on the first block)
      m = bm;
    }
    if (!std::isfinite(m)) continue;  // NaN / +inf / all -inf so far: lse() reports NaN or keeps going
    // Sweep 2 (L1-resident): sum of exp(x - m).
    const fVec vm(m);
    fVec se_lo(0.f), se_hi(0.f);
    for (j = 0; j < full; j += kChunk) {
      // Pull the next block towards L1 while this one is busy with exp: memory traffic overlaps the
      // arithmetic instead of alternating with it (prefetches never fault past the end).
      __builtin_prefetch(p + kBlock + j, 0, 3);
      Chunk c = L::load(p + j);
      se_lo = se_lo + fast_exp(c.lo - vm);
      se_hi = se_hi + fast_exp(c.hi - vm);
    }
    if (j < len) {
      const int64_t n = len - j;
      Chunk c = mask_tail(L::load(p + j, n), n, ninf);
      se_lo = se_lo + fast_exp(c.lo - vm);
      se_hi = se_hi + fast_exp(c.hi - vm);
    }
    s += hsum(se_lo + se_hi);
  }
  RowStats r;
  r.max = m;
  r.sumexp = s;
  r.sum_wx = WITH_SUM ? hsum(sx_lo + sx_hi) : 0.f;
  return r;
}

}  // namespace cpu
}  // namespace fasteval
