#pragma once
// One-read softmax statistics of a row of logits on the CPU, shared by the cross-entropy kernels and
// the fused evaluation pass.
//
// The row is processed in blocks of kBlock elements. For each block a first sweep (from memory) finds
// the block max (and, when asked, sum_c w_c x_c); a second sweep over the same block, now in L1,
// accumulates exp(x - m) while prefetching the next block. The running sum is rescaled once per block when the max grows, so the row is
// read from memory once and exp is evaluated once per element.
#include "common/cpu_vec.h"
#include "common/row_rank_cpu.h"
#include "common/simd_math_avx2.h"

namespace fasteval {
namespace cpu {

constexpr int64_t kBlock = 4096;  // elements per block: 16 KiB of float32, L1-resident

// exp(d) for d = x - max <= 0 as a term of the row's sum of exp. On AVX2 the leaner lanes::exp_le0 (terms
// below exp(-86.5), -inf included, count as ~2.7e-38 instead of 0: nothing next to the sum's exp(0) = 1);
// elsewhere fast_exp.
FASTEVAL_ALWAYS_INLINE fVec exp_term(const fVec& d) {
#if defined(CPU_CAPABILITY_AVX2)
  return lanes::exp_le0(d);
#else
  return fast_exp(d);
#endif
}

// sum_c w_c x_c (sum_c x_c when w is null), a chunk at a time: add(x, w, n) takes the n <= kChunk classes
// of x (zero beyond them), w pointing at their weights.
struct WeightedSum {
  fVec lo = fVec(0.f), hi = fVec(0.f);
  FASTEVAL_ALWAYS_INLINE void add(const Chunk& x, const float* w, int64_t n) {
    if (w) {
      const Chunk cw = n == kChunk ? ChunkLoader<float>::load(w) : ChunkLoader<float>::load(w, n);
      lo = at::vec::fmadd(x.lo, cw.lo, lo);
      hi = at::vec::fmadd(x.hi, cw.hi, hi);
    } else {
      lo = lo + x.lo;
      hi = hi + x.hi;
    }
  }
  FASTEVAL_ALWAYS_INLINE float total() const { return hsum(lo + hi); }
};

struct RowStats {
  float max;      // row max (NaN if any element is NaN)
  float sumexp;   // sum_c exp(x_c - max)
  float sum_wx;   // sum_c w_c x_c (or sum_c x_c without weights); only when WITH_SUM
  // log-sum-exp; NaN when the max is not finite (NaN, +inf, or an all -inf row), as torch's
  // log_softmax produces NaN there.
  inline float lse() const { return std::isfinite(max) ? max + std::log(sumexp) : std::numeric_limits<float>::quiet_NaN(); }
};

// Rank and argmax of a row, filled by row_eval_stats (only when the row max is finite; for rows with a
// NaN, +inf or only -inf values use row_argmax / row_rank of row_rank_cpu.h, which follow the same order).
struct RowEval {
  int64_t argmax;  // first index of the maximum
  int64_t rank;    // #{c : x_c > x_t} + #{c < t : x_c == x_t}
};

// The shared one-read row pass. WITH_SUM: also compute sum_wx (w, may be null, are per-class weights
// for it). WITH_EVAL: also find the argmax and the rank of x_t = row[t] (ev must be non-null); both
// are valid only when the returned max is finite.
template <typename T, bool WITH_SUM, bool WITH_EVAL>
FASTEVAL_ALWAYS_INLINE RowStats row_stats_impl(const T* row, int64_t C, const float* w, int64_t t, RowEval* ev) {
  using L = ChunkLoader<T>;
  const fVec ninf = neg_inf_vec();
  const fVec vnan(std::numeric_limits<float>::quiet_NaN());
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.f;
  WeightedSum sx;
  float xt = 0.f;
  int64_t gt = 0, eq = 0, first = 0;
  if constexpr (WITH_EVAL) xt = static_cast<float>(row[t]);
  const fVec vxt(xt), one(1.f);
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t len = std::min(kBlock, C - b0);
    const T* p = row + b0;
    const int64_t full = len - len % kChunk;
    // Sweep 1: block max (and weighted sum, and the counts of values above / equal to x_t).
    fVec mx_lo = ninf, mx_hi = ninf;
    fVec gt_lo(0.f), gt_hi(0.f), eq_lo(0.f), eq_hi(0.f);  // per-lane counts, exact below 2^24
    auto count = [&](const Chunk& c) {
      if constexpr (WITH_EVAL) {
        gt_lo = gt_lo + ((c.lo > vxt) & one);
        gt_hi = gt_hi + ((c.hi > vxt) & one);
        eq_lo = eq_lo + ((c.lo == vxt) & one);
        eq_hi = eq_hi + ((c.hi == vxt) & one);
      }
    };
    // sum_c w_c x_c over the n (<= kChunk) classes at offset j of the block; x is zero beyond n.
    auto add_sum = [&](const Chunk& c, int64_t j, int64_t n) {
      if constexpr (WITH_SUM) sx.add(c, w ? w + b0 + j : nullptr, n);
    };
    // The partial chunk first: its dependency chain then overlaps the main loop instead of trailing it
    // (for rows of about a thousand classes the row's end-of-sweep latency is a large part of the time).
    if (full < len) {
      const int64_t n = len - full;
      Chunk c = L::load(p + full, n);  // zero-filled beyond n
      add_sum(c, full, n);
      count(mask_tail(c, n, vnan));  // NaN compares false: the padding counts nowhere
      Chunk cm = mask_tail(c, n, ninf);
      mx_lo = at::vec::maximum(mx_lo, cm.lo);
      mx_hi = at::vec::maximum(mx_hi, cm.hi);
    }
    for (int64_t j = 0; j < full; j += kChunk) {
      Chunk c = L::load(p + j);
      mx_lo = at::vec::maximum(mx_lo, c.lo);
      mx_hi = at::vec::maximum(mx_hi, c.hi);
      count(c);
      add_sum(c, j, kChunk);
    }
    if constexpr (WITH_EVAL) {
      gt += static_cast<int64_t>(hsum(gt_lo + gt_hi));
      eq += static_cast<int64_t>(hsum(eq_lo + eq_hi));
    }
    const float bm = hmax(at::vec::maximum(mx_lo, mx_hi));
    bool new_max = false;
    if (std::isnan(bm)) {
      m = bm;  // sticky: the result is NaN
      s = std::numeric_limits<float>::quiet_NaN();
    } else if (bm > m) {
      if (b0 > 0) s *= std::exp(m - bm);  // rescale the running sum (it is still 0 on the first block)
      m = bm;
      new_max = true;
    }
    if (!std::isfinite(m)) continue;  // NaN / +inf / all -inf so far: lse() reports NaN or keeps going
    const fVec vm(m);
    if constexpr (WITH_EVAL) {
      // The maximum moved into this block (now in L1): its first occurrence is the argmax so far.
      if (new_max) first = b0 + row_find_first(p, len, m);
    }
    // Sweep 2 (L1-resident): sum of exp(x - m).
    fVec se_lo(0.f), se_hi(0.f);
    if (full < len) {  // the partial chunk first, as in sweep 1
      const int64_t n = len - full;
      Chunk c = mask_tail(L::load(p + full, n), n, ninf);
      se_lo = exp_term(c.lo - vm);
      se_hi = exp_term(c.hi - vm);
    }
    for (int64_t j = 0; j < full; j += kChunk) {
      // Pull the next block towards L1 while this one is busy with exp: memory traffic overlaps the
      // arithmetic instead of alternating with it (prefetches never fault past the end).
      __builtin_prefetch(p + kBlock + j, 0, 3);
      Chunk c = L::load(p + j);
      se_lo = se_lo + exp_term(c.lo - vm);
      se_hi = se_hi + exp_term(c.hi - vm);
    }
    s += hsum(se_lo + se_hi);
  }
  RowStats r;
  r.max = m;
  r.sumexp = s;
  r.sum_wx = WITH_SUM ? sx.total() : 0.f;
  if constexpr (WITH_EVAL) {
    ev->argmax = first;
    int64_t rank = gt;
    if (eq > 1) {  // ties with x_t: those before t rank above it (rare; a scalar count)
      for (int64_t c = 0; c < t; ++c) rank += static_cast<float>(row[c]) == xt;
    }
    ev->rank = rank;
  }
  return r;
}

// One-read softmax statistics (WITH_SUM: also sum_c w_c x_c).
template <typename T, bool WITH_SUM>
inline RowStats row_softmax_stats(const T* row, int64_t C, const float* w) {
  return row_stats_impl<T, WITH_SUM, false>(row, C, w, 0, nullptr);
}

// Softmax statistics plus argmax and the rank of row[t], in the same single read (WITH_SUM: also
// sum_c x_c for label smoothing). ev is meaningful only when the returned max is finite.
template <typename T, bool WITH_SUM>
inline RowStats row_eval_stats(const T* row, int64_t C, int64_t t, RowEval* ev) {
  return row_stats_impl<T, WITH_SUM, true>(row, C, nullptr, t, ev);
}

}  // namespace cpu
}  // namespace fasteval
