// CPU kernels of fasteval::softmax_cross_entropy and its backward.
//
// Forward: one read of each row from memory, x[target] and the label-smoothing sum from the same data;
// fp32 accumulation for every input dtype; rows split over threads with at::parallel_for (small inputs
// run inline); 64-bit indexing throughout. Three paths by C (AVX2 / AVX512 builds; the portable build
// has the third only):
//   C <= 24           8 rows per vector (common/row_lanes_cpu.h, load_block): a block of rows transposed
//                     in registers, every step a vertical vector operation for 8 rows;
//   24 < C <= 4096    8 rows swept one by one (row_lanes_cpu.h, rows_stats), their reductions transposed
//                     into the lanes, so the epilogue (log, loss) is again one vector operation;
//   C > 4096          the blocked per-row pass (common/row_softmax_cpu.h), which keeps a block of each row
//                     in L1 between its two sweeps.
// Every path gives the same per-row results up to fp32 rounding; rows with a NaN or a max that is not
// finite take the per-row pass in all of them. The reduction sums per-row losses in double, in an order
// fixed by N and C (never by the thread count).
// Backward: one read of the logits and one write of the gradient, from the saved log-sum-exp; C <= 24 by
// transposed blocks of 8 rows, wider rows one by one.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>
#include <torch/library.h>

#include "common/checks.h"
#include "common/row_lanes_cpu.h"
#include "common/row_softmax_cpu.h"
#include "cross_entropy/cross_entropy_common.h"

namespace fasteval {
namespace {

using cpu::Chunk;
using cpu::ChunkLoader;
using cpu::fVec;
using cpu::kChunk;

using cross_entropy::kBackwardOp;
using cross_entropy::kOp;
constexpr int64_t kReductionNone = 0, kReductionMean = 1, kReductionSum = 2;  // at::Reduction

// Rows per parallel task: enough work per task to amortise the scheduling.
inline int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// W = sum_c w_c (C without weights), in double then rounded once.
inline float weight_sum(const float* w, int64_t C) {
  if (!w) return static_cast<float>(C);
  double acc = 0;
  for (int64_t c = 0; c < C; ++c) acc += w[c];
  return static_cast<float>(acc);
}

// The class weights that enter a row's gradient besides its target's: with label smoothing only (the eps / C
// term); without it a weight of a class that is never a target changes nothing, inf or NaN included, as in torch.
inline const float* smoothing_weights(const float* w, float eps) { return eps > 0.f ? w : nullptr; }

[[noreturn]] void bad_target(int64_t t, int64_t C, int64_t ignore_index, const char* op = kOp) {
  throw_target_out_of_bounds(op, t, C, ignore_index);
}

// Rows per partial sum of the reduction: fixed by C alone, so that the sum of the partials (in order,
// in double) does not depend on the number of threads.
inline int64_t rows_per_partial(int64_t C) { return std::clamp<int64_t>(65536 / std::max<int64_t>(C, 1), 1, 256); }

// Below this many logits a kernel runs on the calling thread: at::parallel_for's dispatch costs more.
constexpr int64_t kInlineWork = 32768;

#ifdef FASTEVAL_ROW_LANES
// Widest rows served by the rows-in-lanes forward (wider rows: the blocked per-row pass, which keeps a
// block of each row in L1 between its two sweeps).
constexpr int64_t kLanesMaxC = 4096;
// Up to this C the rows of a block are transposed into the lanes (lanes::load_block); wider rows are swept
// one by one (lanes::rows_stats), which costs less per element but more per row.
constexpr int64_t kBlockMaxC = 24;
static_assert(kBlockMaxC <= cpu::lanes::kMaxC, "a block holds at most lanes::kMaxC columns");
#endif

// Rows per partial sum of the forward's reduction (a multiple of 8 where the rows-in-lanes pass serves C).
inline int64_t forward_rows_per_partial(int64_t C) {
#ifdef FASTEVAL_ROW_LANES
  if (C <= kLanesMaxC) return (rows_per_partial(C) + 7) / 8 * 8;
#endif
  return rows_per_partial(C);
}

// sum_c w_c (x_c - m) (w may be null: ones), vectorized, in fp32.
template <typename T>
float shifted_sum(const T* row, int64_t C, const float* w, float m) {
  using L = ChunkLoader<T>;
  const fVec vm(m);
  fVec acc_lo(0.f), acc_hi(0.f);
  for (int64_t j = 0; j < C; j += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, C - j);
    const Chunk c = n == kChunk ? L::load(row + j) : L::load(row + j, n);
    Chunk d{c.lo - vm, c.hi - vm};
    if (n < kChunk) d = cpu::mask_tail(d, n, fVec(0.f));
    if (w) {
      const Chunk cw = n == kChunk ? ChunkLoader<float>::load(w + j) : ChunkLoader<float>::load(w + j, n);
      acc_lo = at::vec::fmadd(d.lo, cw.lo, acc_lo);
      acc_hi = at::vec::fmadd(d.hi, cw.hi, acc_hi);
    } else {
      acc_lo = acc_lo + d.lo;
      acc_hi = acc_hi + d.hi;
    }
  }
  return cpu::hsum(acc_lo + acc_hi);
}

// Beyond this |row max| the raw sum of the logits loses too many bits to the difference with W max.
constexpr float kHugeLogit = 1024.f;

// The saved log-sum-exp of a row, max + log(sumexp) in double: the backward's exp(x_c - lse) is then as exact
// for logits of any magnitude as for small ones (a float32 lse is off by up to ulp(max) / 2, a relative error
// of the gradient of 0.24 at logits of 1e7). NaN when the max is not finite, as torch's log_softmax.
FASTEVAL_ALWAYS_INLINE double row_lse(float max, float sumexp) {
  return std::isfinite(max) ? static_cast<double>(max) + static_cast<double>(std::log(sumexp))
                            : std::numeric_limits<double>::quiet_NaN();
}

// Loss and log-sum-exp of one counted row (target t in [0, C)) from the per-row pass.
template <typename T, bool SMOOTH>
FASTEVAL_ALWAYS_INLINE void row_loss(const T* row, int64_t C, int64_t t, const float* w, float wsum, float keep,
                                     float eps_over_c, float& loss, double& lse) {
  const cpu::RowStats st = cpu::row_softmax_stats<T, SMOOTH>(row, C, w);
  const float l = st.lse();
  const float wt = w ? w[t] : 1.f;
  // lse - x_t as log(sumexp) - (x_t - max): no cancellation for rows of huge logits (NaN stays NaN).
  const float nll = std::isfinite(st.max) ? std::log(st.sumexp) - (static_cast<float>(row[t]) - st.max) : l;
  float v = keep * (wt * nll);  // torch's order: at eps = 1 an overflowing w_t * nll gives 0 * inf = NaN
  if constexpr (SMOOTH) {
    // W lse - sum_c w_c x_c = W log(sumexp) - sum_c w_c (x_c - max). From the raw sum the difference cancels
    // (or overflows) for rows of huge logits: those get the shifted sum in one more pass over the row.
    const bool huge = std::isfinite(st.max) && (std::fabs(st.max) > kHugeLogit || !std::isfinite(st.sum_wx));
    v += eps_over_c * (huge ? wsum * std::log(st.sumexp) - shifted_sum(row, C, w, st.max) : wsum * l - st.sum_wx);
  }
  loss = v;
  lse = row_lse(st.max, st.sumexp);
}

template <typename T, typename I, bool SMOOTH>
void forward_rows(const T* x, int64_t row_stride, const I* target, const float* w, int64_t N, int64_t C,
                  int64_t ignore_index, float eps, float* loss_rows, double* lse, double* part_loss,
                  double* part_weight) {
  const float wsum = weight_sum(w, C);
  const float keep = 1.f - eps;
  const float eps_over_c = C > 0 ? eps / static_cast<float>(C) : 0.f;  // C = 0: no row is counted
  const int64_t rpp = forward_rows_per_partial(C);
  const int64_t nparts = (N + rpp - 1) / rpp;
  auto run = [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      double sum_loss = 0.0, sum_weight = 0.0;
      const int64_t end = std::min(N, (part + 1) * rpp);
      for (int64_t i = part * rpp; i < end; ++i) {
        const int64_t t = static_cast<int64_t>(target[i]);
        float v = 0.f;
        double l = 0.0;
        if (t != ignore_index) {
          if (t < 0 || t >= C) bad_target(t, C, ignore_index);
          row_loss<T, SMOOTH>(x + i * row_stride, C, t, w, wsum, keep, eps_over_c, v, l);
          sum_loss += v;
          sum_weight += w ? w[t] : 1.f;
        }
        if (loss_rows) loss_rows[i] = v;
        lse[i] = l;
      }
      part_loss[part] = sum_loss;
      part_weight[part] = sum_weight;
    }
  };
  if (N * C <= kInlineWork) {
    run(0, nparts);  // a parallel region costs more than this much work
  } else {
    at::parallel_for(0, nparts, std::max<int64_t>(1, grain_rows(C) / rpp), run);
  }
}

#ifdef FASTEVAL_ROW_LANES
// 8 rows at a time, one row per vector lane (common/row_lanes_cpu.h): for C <= lanes::kMaxC a block of 8
// rows is transposed so that every step is a vertical vector operation (two blocks interleaved); for
// larger C (MEDIUM) the rows are swept one by one and their reductions transposed into the lanes. Both
// give the lanes' max, sum of exp, sum of (weighted) logits and target logit, and one epilogue computes the
// log, the loss and the partial sums for 8 rows. Rows with a NaN or a max that is not finite go through
// row_loss, so every row gets exactly the per-row semantics. The partial sums are accumulated per lane in
// double and combined in a fixed order: they depend on N and C only.
template <typename T, typename I, bool SMOOTH, bool WEIGHTED, bool MEDIUM>
void forward_lanes(const T* x, int64_t row_stride, const I* target, const float* w, int64_t N, int64_t C,
                   int64_t ignore_index, float eps, float* loss_rows, double* lse, double* part_loss,
                   double* part_weight) {
  namespace L = cpu::lanes;
  const float wsum = weight_sum(w, C);
  const float keep = 1.f - eps;
  const float eps_over_c = eps / static_cast<float>(C);
  const int64_t rpp = forward_rows_per_partial(C);
  const int64_t nparts = (N + rpp - 1) / rpp;
  const T* limit = x + (N - 1) * row_stride + C;  // one past the last element read
  const __m256 vkeep = _mm256_set1_ps(keep), veps = _mm256_set1_ps(eps_over_c), vwsum = _mm256_set1_ps(wsum);
  // Without weights the total weight is a count of rows.
  using WeightSum = std::conditional_t<WEIGHTED, L::LaneSum, L::LaneCount>;
  // Label smoothing needs sum_c w_c (x_c - max) (see lanes::Shifted).
  constexpr L::Shifted SH = !SMOOTH ? L::Shifted::kNone : WEIGHTED ? L::Shifted::kWeighted : L::Shifted::kPlain;
  constexpr int64_t kPrefetchRows = 64;

  // Loss, lse, stores and partial sums of the 8 rows from r0 (nr of them) from their lane statistics:
  // max m, sum sx (NaN detection), sumexp s, target logit xt, shifted sum sd (SMOOTH).
  auto finish = [&](int64_t r0, int nr, const L::Targets& tg, __m256 m, __m256 sx, __m256 s, __m256 xt, __m256 sd,
                    L::LaneSum& sum_loss, WeightSum& sum_weight) {
    const __m256 counted = _mm256_xor_ps(tg.ignored, _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
    const __m256 wt = WEIGHTED ? _mm256_mask_i32gather_ps(_mm256_setzero_ps(), w, tg.t, counted, 4)
                               : _mm256_and_ps(counted, _mm256_set1_ps(1.f));
    // lse - x_t = log(s) - (x_t - m) and W lse - sum_c w_c x_c = W log(s) - sd: no cancellation of huge logits.
    const __m256 log_s = L::log_normal_ps(s);  // s >= 1 where it is used (redone and ignored lanes are replaced)
    __m256 v = _mm256_mul_ps(vkeep, _mm256_mul_ps(wt, _mm256_sub_ps(log_s, _mm256_sub_ps(xt, m))));  // as row_loss
    if constexpr (SMOOTH) v = _mm256_fmadd_ps(veps, _mm256_fmsub_ps(vwsum, log_s, sd), v);
    const int redo = _mm256_movemask_ps(_mm256_and_ps(counted, L::rows_need_row_pass(m, sx)));
    alignas(32) double lv[L::kLanes];
    if (redo) {  // NaN / inf / all -inf rows: rare
      alignas(32) float vv[L::kLanes];
      _mm256_store_ps(vv, v);
      for (int r = 0; r < L::kLanes; ++r) {
        if (redo >> r & 1) {
          row_loss<T, SMOOTH>(x + (r0 + r) * row_stride, C, static_cast<int64_t>(target[r0 + r]), w, wsum, keep,
                              eps_over_c, vv[r], lv[r]);
        }
      }
      v = _mm256_load_ps(vv);
    }
    v = _mm256_and_ps(counted, v);  // ignored rows: loss 0, lse 0
    // lse = m + log(s) in double (see row_lse), 4 lanes at a time.
    const __m256 mc = _mm256_and_ps(counted, m), lc = _mm256_and_ps(counted, log_s);
    const __m256d l_lo = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(mc)),
                                       _mm256_cvtps_pd(_mm256_castps256_ps128(lc)));
    const __m256d l_hi = _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(mc, 1)),
                                       _mm256_cvtps_pd(_mm256_extractf128_ps(lc, 1)));
    if (nr == L::kLanes) {
      if (loss_rows) _mm256_storeu_ps(loss_rows + r0, v);
      _mm256_storeu_pd(lse + r0, l_lo);
      _mm256_storeu_pd(lse + r0 + 4, l_hi);
    } else {
      const __m256i mask = L::first_lanes(nr);
      if (loss_rows) _mm256_maskstore_ps(loss_rows + r0, mask, v);
      _mm256_maskstore_pd(lse + r0, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(mask)), l_lo);
      _mm256_maskstore_pd(lse + r0 + 4, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(mask, 1)), l_hi);
    }
    if (redo) {
      for (int r = 0; r < nr; ++r) {
        if (redo >> r & 1) lse[r0 + r] = lv[r];
      }
    }
    sum_loss.add(v);
    sum_weight.add(wt);
  };
  auto targets = [&](int64_t r0, int nr) {
    const L::Targets tg = L::load_targets(target + r0, nr, C, ignore_index);
    if (tg.bad) bad_target(static_cast<int64_t>(target[r0 + __builtin_ctz(tg.bad)]), C, ignore_index);
    return tg;
  };

  // C <= kMaxC: NB transposed blocks of 8 rows from row i (the last one may be partial), phase by phase.
  auto step = [&](auto nb_tag, int64_t i, int64_t end, __m256* col, L::LaneSum& sum_loss, WeightSum& sum_weight) {
    constexpr int NB = decltype(nb_tag)::value;
    int nr[NB];
    L::Targets tg[NB];
    __m256i tv[NB];
    __m256 m[NB], sx[NB], xt[NB], s[NB], sd[NB];
    for (int b = 0; b < NB; ++b) {
      nr[b] = static_cast<int>(std::min<int64_t>(L::kLanes, end - (i + b * L::kLanes)));
      tg[b] = targets(i + b * L::kLanes, nr[b]);
      tv[b] = tg[b].t;
    }
    // The rows kPrefetchRows ahead (inside the tensor), so that their loads overlap this step's arithmetic.
    const int64_t ahead = i + kPrefetchRows;
    if (ahead + NB * L::kLanes <= N) L::prefetch_rows(x + ahead * row_stride, row_stride, NB * L::kLanes, C);
    for (int b = 0; b < NB; ++b) {
      L::load_block(x + (i + b * L::kLanes) * row_stride, row_stride, nr[b], C, limit, col + b * L::kMaxC);
    }
    L::block_max_sum_pick<NB>(col, C, tv, m, sx, xt);
    L::block_sumexp<NB, SH>(col, C, m, w, s, sd);
    for (int b = 0; b < NB; ++b) {
      finish(i + b * L::kLanes, nr[b], tg[b], m[b], sx[b], s[b], xt[b], sd[b], sum_loss, sum_weight);
    }
  };

  // MEDIUM: 8 rows from row i swept one by one.
  auto group = [&](int64_t i, int64_t end, L::LaneSum& sum_loss, WeightSum& sum_weight) {
    const int nr = static_cast<int>(std::min<int64_t>(L::kLanes, end - i));
    const L::Targets tg = targets(i, nr);
    __m256 m, sx, s, sd;
    L::rows_stats<T, SH>(x + i * row_stride, row_stride, nr, C, w, m, sx, s, sd);
    alignas(32) int32_t tr[L::kLanes];
    alignas(32) float xr[L::kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tr), tg.t);
    const int ign = _mm256_movemask_ps(tg.ignored);
    for (int r = 0; r < L::kLanes; ++r) {
      xr[r] = ign >> r & 1 ? 0.f : static_cast<float>(x[(i + r) * row_stride + tr[r]]);
    }
    finish(i, nr, tg, m, sx, s, _mm256_load_ps(xr), sd, sum_loss, sum_weight);
  };

  auto run = [&](int64_t pb, int64_t pe) {
    __m256 col[MEDIUM ? 1 : 2 * L::kMaxC];
    for (int64_t part = pb; part < pe; ++part) {
      L::LaneSum sum_loss;
      WeightSum sum_weight;
      const int64_t end = std::min(N, (part + 1) * rpp);
      int64_t i = part * rpp;
      if constexpr (MEDIUM) {
        for (; i < end; i += L::kLanes) group(i, end, sum_loss, sum_weight);
      } else {
        for (; i + 2 * L::kLanes <= end; i += 2 * L::kLanes) {
          step(std::integral_constant<int, 2>{}, i, end, col, sum_loss, sum_weight);
        }
        for (; i < end; i += L::kLanes) step(std::integral_constant<int, 1>{}, i, end, col, sum_loss, sum_weight);
      }
      part_loss[part] = sum_loss.total();
      part_weight[part] = sum_weight.total();
    }
  };
  // Small inputs run inline: a parallel region costs microseconds.
  if (N * C <= kInlineWork) {
    run(0, nparts);
  } else {
    at::parallel_for(0, nparts, std::max<int64_t>(1, grain_rows(C) / rpp), run);
  }
}
#endif

// grad_c = a * p_c - b * w_c  (w_c = 1 without weights), then grad_t -= g * (1 - eps) * w_t, with
// p_c = exp(x_c - lse), a = g * ((1 - eps) * w_t + eps * W / C), b = g * eps / C.
template <typename T, typename I>
void backward_rows(const float* g, int64_t g_stride, float g_scale, const T* x, int64_t row_stride, const I* target,
                   const float* w, const double* lse, int64_t N, int64_t C, int64_t ignore_index, float eps,
                   T* grad) {
  using L = ChunkLoader<T>;
  const float* w_smooth = smoothing_weights(w, eps);
  const float wsum = weight_sum(w_smooth, C);
  const float keep = 1.f - eps;
  const float eps_over_c = C > 0 ? eps / static_cast<float>(C) : 0.f;  // C = 0: no row is counted
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* out = grad + i * C;
      const int64_t t = static_cast<int64_t>(target[i]);
      if (t == ignore_index) {
        std::fill(out, out + C, T(0));
        continue;
      }
      if (t < 0 || t >= C) bad_target(t, C, ignore_index, kBackwardOp);
      if (std::isnan(lse[i])) {  // the row's max is not finite: NaN throughout, as torch's log_softmax gives
        std::fill(out, out + C, T(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      const T* row = x + i * row_stride;
      const float gi = g[i * g_stride] * g_scale;
      const float wt = w ? w[t] : 1.f;
      const float a = gi * (keep * wt + eps_over_c * wsum);
      const float b = gi * eps_over_c;
      // x_c - lse as (x_c - hi) - lo with lse = hi + lo split into floats: x_c - hi is exact for the logits
      // near the max (the ones whose probabilities matter), whatever their magnitude.
      const float hi = static_cast<float>(lse[i]);
      const float lo = static_cast<float>(lse[i] - static_cast<double>(hi));
      const fVec va(a), vb(b), vhi(hi), vlo(lo);
      auto grad_chunk = [&](const Chunk& c, int64_t j, int64_t n) {  // columns [j, j + n)
        Chunk r;
        r.lo = va * cpu::fast_exp((c.lo - vhi) - vlo);
        r.hi = va * cpu::fast_exp((c.hi - vhi) - vlo);
        if (b != 0.f) {
          if (w_smooth) {
            const float* wc = w_smooth + j;
            Chunk cw = n == kChunk ? ChunkLoader<float>::load(wc) : ChunkLoader<float>::load(wc, n);
            r.lo = at::vec::fnmadd(vb, cw.lo, r.lo);
            r.hi = at::vec::fnmadd(vb, cw.hi, r.hi);
          } else {
            r.lo = r.lo - vb;
            r.hi = r.hi - vb;
          }
        }
        return r;
      };
      int64_t j = 0;
      for (; j + kChunk <= C; j += kChunk) L::store(out + j, grad_chunk(L::load(row + j), j, kChunk));
      if (j < C) L::store(out + j, grad_chunk(L::load(row + j, C - j), j, C - j), C - j);
      // The target column, recomputed in fp32 rather than corrected after rounding.
      const float pt = std::exp((static_cast<float>(row[t]) - hi) - lo);
      out[t] = static_cast<T>(a * pt - b * wt - gi * keep * wt);
    }
  };
  if (N * C <= kInlineWork) {
    run(0, N);  // a parallel region costs more than this much work
  } else {
    at::parallel_for(0, N, grain_rows(C), run);
  }
}

#ifdef FASTEVAL_ROW_LANES
// C <= kBlockMaxC: blocks of 8 rows transposed in (lanes::load_block), the gradient of the 8 rows computed
// column by column, and transposed back out (lanes::store_block). Same formula as backward_rows; rows whose
// lse is NaN get NaN throughout.
template <typename T, typename I, bool WEIGHTED>
void backward_lanes(const float* g, int64_t g_stride, float g_scale, const T* x, int64_t row_stride, const I* target,
                    const float* w, const double* lse, int64_t N, int64_t C, int64_t ignore_index, float eps, T* grad) {
  namespace L = cpu::lanes;
  const float* w_smooth = smoothing_weights(w, eps);
  const float wsum = weight_sum(w_smooth, C);
  const __m256 vkeep = _mm256_set1_ps(1.f - eps), veps = _mm256_set1_ps(eps / static_cast<float>(C));
  const __m256 vwsum = _mm256_set1_ps(wsum);
  const T* limit = x + (N - 1) * row_stride + C;
  const int64_t nblocks = (N + L::kLanes - 1) / L::kLanes;
  auto run = [&](int64_t b0, int64_t b1) {
    __m256 col[L::kMaxC];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i = blk * L::kLanes;
      const int nr = static_cast<int>(std::min<int64_t>(L::kLanes, N - i));
      const L::Targets tg = L::load_targets(target + i, nr, C, ignore_index);
      if (tg.bad) bad_target(static_cast<int64_t>(target[i + __builtin_ctz(tg.bad)]), C, ignore_index, kBackwardOp);
      L::load_block(x + i * row_stride, row_stride, nr, C, limit, col);
      alignas(32) float gv[L::kLanes];
      for (int r = 0; r < L::kLanes; ++r) gv[r] = r < nr ? g[(i + r) * g_stride] : 0.f;
      const __m256 counted = _mm256_xor_ps(tg.ignored, _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
      const __m256 gi = _mm256_and_ps(counted, _mm256_mul_ps(_mm256_load_ps(gv), _mm256_set1_ps(g_scale)));
      const __m256 wt = WEIGHTED ? _mm256_mask_i32gather_ps(_mm256_setzero_ps(), w, tg.t, counted, 4)
                                 : _mm256_set1_ps(1.f);
      const __m256 keep_wt = _mm256_mul_ps(vkeep, wt);
      const __m256 a = _mm256_mul_ps(gi, _mm256_fmadd_ps(veps, vwsum, keep_wt));  // g ((1 - eps) w_t + eps W / C)
      const __m256 b = _mm256_mul_ps(gi, veps);                                   // g eps / C
      const __m256 gk = _mm256_mul_ps(gi, keep_wt);                               // g (1 - eps) w_t
      // lse = hi + lo in floats (see backward_rows)
      __m256d l_lo, l_hi;
      if (nr == L::kLanes) {
        l_lo = _mm256_loadu_pd(lse + i);
        l_hi = _mm256_loadu_pd(lse + i + 4);
      } else {
        const __m256i mask = L::first_lanes(nr);
        l_lo = _mm256_maskload_pd(lse + i, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(mask)));
        l_hi = _mm256_maskload_pd(lse + i + 4, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(mask, 1)));
      }
      const __m128 h_lo = _mm256_cvtpd_ps(l_lo), h_hi = _mm256_cvtpd_ps(l_hi);
      const __m256 vhi = _mm256_set_m128(h_hi, h_lo);
      const __m256 vlo = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(l_hi, _mm256_cvtps_pd(h_hi))),
                                         _mm256_cvtpd_ps(_mm256_sub_pd(l_lo, _mm256_cvtps_pd(h_lo))));
      const __m256 nan_rows = _mm256_and_ps(counted, _mm256_cmp_ps(vhi, vhi, _CMP_UNORD_Q));
      __m256i cidx = _mm256_setzero_si256();
      for (int64_t c = 0; c < C; ++c) {
        // x - lse <= 0 (lse >= the row max); exact 0 for -inf logits (NaN rows are replaced below)
        const __m256 p = L::exp_le0_flush(_mm256_sub_ps(_mm256_sub_ps(col[c], vhi), vlo));
        __m256 gc = WEIGHTED && w_smooth ? _mm256_fnmadd_ps(b, _mm256_set1_ps(w_smooth[c]), _mm256_mul_ps(a, p))
                                         : _mm256_fmsub_ps(a, p, b);
        gc = _mm256_sub_ps(gc, _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(tg.t, cidx)), gk));
        col[c] = _mm256_or_ps(_mm256_and_ps(counted, gc), nan_rows);  // ignored rows 0; NaN rows NaN
        cidx = _mm256_add_epi32(cidx, _mm256_set1_epi32(1));
      }
      L::store_block(col, C, grad + i * C, C, nr);
    }
  };
  if (N * C <= kInlineWork) {
    run(0, nblocks);
  } else {
    at::parallel_for(0, nblocks, std::max<int64_t>(1, grain_rows(C) / L::kLanes), run);
  }
}
#endif

}  // namespace

namespace cross_entropy {

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> Kernels<at::kCPU>::forward(const ForwardArgs& args) {
  const int64_t N = args.logits.size(0), C = args.logits.size(1);
  const at::Tensor& w = args.weight;
  const at::Tensor logits = class_contiguous(args.logits);
  const at::Tensor target = args.target.contiguous();
  // Outputs straight from the CPU allocator (at::empty would go through the dispatcher once more: a
  // visible share of the time of a small call).
  at::Tensor lse = at::detail::empty_cpu({N}, at::kDouble);
  at::Tensor loss = at::detail::empty_cpu(args.reduction == kReductionNone ? at::IntArrayRef{N} : at::IntArrayRef{},
                                          at::kFloat);
  at::Tensor total_weight = at::detail::empty_cpu({}, at::kFloat);
  const int64_t rpp = forward_rows_per_partial(C);
  const int64_t nparts = (N + rpp - 1) / rpp;
  // Partial sums: on the stack for small inputs (no heap allocation per call).
  constexpr int64_t kStackParts = 64;
  double stack_parts[2 * kStackParts];
  std::vector<double> heap_parts(nparts > kStackParts ? 2 * nparts : 0);
  double* part_loss = nparts > kStackParts ? heap_parts.data() : stack_parts;
  double* part_weight = part_loss + nparts;
  const float eps = static_cast<float>(args.label_smoothing);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  float* loss_rows = args.reduction == kReductionNone ? loss.data_ptr<float>() : nullptr;
  if (N > 0) {
    FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "softmax_cross_entropy_cpu", [&] {
      using T = scalar_t;
      AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "softmax_cross_entropy_cpu_target", [&] {
        const T* xp = logits.const_data_ptr<T>();
        const index_t* tp = target.const_data_ptr<index_t>();
        auto kargs = std::make_tuple(xp, logits.stride(0), tp, wp, N, C, args.ignore_index, eps, loss_rows,
                                    lse.data_ptr<double>(), part_loss, part_weight);
#ifdef FASTEVAL_ROW_LANES
        if (C > 0 && C <= kLanesMaxC) {  // C = 0 (every row ignored or raising): the row path
          auto pick = [&](auto medium) {
            constexpr bool M = decltype(medium)::value;
            if (eps > 0.f) {
              std::apply(wp ? forward_lanes<T, index_t, true, true, M> : forward_lanes<T, index_t, true, false, M>,
                         kargs);
            } else {
              std::apply(wp ? forward_lanes<T, index_t, false, true, M> : forward_lanes<T, index_t, false, false, M>,
                         kargs);
            }
          };
          if (C <= kBlockMaxC) {
            pick(std::false_type{});
          } else {
            pick(std::true_type{});
          }
          return;
        }
#endif
        std::apply(eps > 0.f ? forward_rows<T, index_t, true> : forward_rows<T, index_t, false>, kargs);
      });
    });
  }
  double total = 0.0, tw = 0.0;
  for (int64_t k = 0; k < nparts; ++k) {
    total += part_loss[k];
    tw += part_weight[k];
  }
  // Written in place: fill_ would be a dispatcher call each.
  *total_weight.data_ptr<float>() = static_cast<float>(tw);
  if (args.reduction == kReductionSum) *loss.data_ptr<float>() = static_cast<float>(total);
  // 0 / 0 = NaN when every row is ignored, as torch. A zero total weight with smoothing is NaN too (torch adds
  // (1 - eps) * (0 / 0) to the smoothing term's s / 0), not the inf of the fused sum / 0. Sums beyond float32's
  // range divide as torch's float32 sums, inf (class weights near float32's maximum: the mean is NaN, as
  // torch's, where the float64 sums gave a finite mean or inf).
  const float sum32 = static_cast<float>(total), tw32 = static_cast<float>(tw);
  if (args.reduction == kReductionMean)
    *loss.data_ptr<float>() = tw == 0.0 && eps > 0.f           ? std::numeric_limits<float>::quiet_NaN()
                              : std::isinf(sum32) || std::isinf(tw32) ? sum32 / tw32
                                                                      : static_cast<float>(total / tw);
  // No classes (every row ignored, or a bad target raised above): torch's smoothing term is
  // eps / C * (a sum of no terms) = NaN on every row, ignored or not.
  if (C == 0 && eps > 0.f) loss.fill_(std::numeric_limits<float>::quiet_NaN());
  return {loss, lse, total_weight};
}

template <>
at::Tensor Kernels<at::kCPU>::backward(const BackwardArgs& args) {
  const int64_t N = args.logits.size(0), C = args.logits.size(1);
  const at::Tensor& w = args.weight;
  const at::Tensor logits = class_contiguous(args.logits);
  const at::Tensor target = args.target.contiguous();
  const at::Tensor lse = args.lse.contiguous();
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0) return grad;
  // Per-row upstream gradient: g[i * g_stride] * g_scale.
  at::Tensor grad_loss = args.grad_loss.to(at::kFloat);  // may be an expanded (stride 0) tensor
  int64_t g_stride = args.reduction == kReductionNone ? grad_loss.stride(0) : 0;
  float g_scale = 1.f;
  if (args.reduction == kReductionMean) {
    // Read in place when it is the float32 the forward saved (item() is a dispatcher call).
    const float tw = args.total_weight.scalar_type() == at::kFloat && args.total_weight.is_contiguous()
                         ? *args.total_weight.const_data_ptr<float>()
                         : args.total_weight.item<float>();
    g_scale = 1.f / tw;
  }
  const float eps = static_cast<float>(args.label_smoothing);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "softmax_cross_entropy_backward_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "softmax_cross_entropy_backward_cpu_target", [&] {
      auto kargs = std::make_tuple(grad_loss.const_data_ptr<float>(), g_stride, g_scale, logits.const_data_ptr<T>(),
                                  logits.stride(0), target.const_data_ptr<index_t>(), wp, lse.const_data_ptr<double>(),
                                  N, C, args.ignore_index, eps, grad.data_ptr<T>());
#ifdef FASTEVAL_ROW_LANES
      if (C > 0 && C <= kBlockMaxC) {
        std::apply(wp ? backward_lanes<T, index_t, true> : backward_lanes<T, index_t, false>, kargs);
        return;
      }
#endif
      std::apply(backward_rows<T, index_t>, kargs);
    });
  });
  return grad;
}

}  // namespace cross_entropy

TORCH_LIBRARY_IMPL(fasteval, CPU, m) { cross_entropy::register_ops<cross_entropy::Kernels<at::kCPU>>(m); }

}  // namespace fasteval
