// CPU kernel of fasteval::eval_update, the fused evaluation pass (the math is in registration.cpp).
//
// Each position's logits are read once (from memory; a second sweep, where there is one, hits the cache),
// and the max, the sum of exp, the target's logit, the argmax and the rank of the target come out of the
// same pass; the loss, the top-k hits, the confidence and its calibration bin follow. Paths (AVX2 / AVX512
// builds; the portable build has the last one only):
//   (N, C), C <= 32        8 rows per vector (common/row_lanes_cpu.h, load_block): a block of rows
//                          transposed in registers, every step a vertical vector operation for 8 rows;
//   (N, C), C <= 4096      8 rows swept one by one, their reductions transposed into the lanes;
//   (N, C, S)              8 consecutive positions of a sample per vector (column c of them is contiguous);
//   otherwise              the per-row pass shared with cross-entropy (common/row_softmax_cpu.h:
//                          row_eval_stats), one position after the other.
// Rows with a NaN or a max that is not finite take the per-row pass in every path (argmax and rank of
// common/row_rank_cpu.h, NaN loss and confidence). lse - x_t is computed as log(sumexp) - (x_t - max)
// everywhere (no cancellation for logits of large magnitude).
//
// Positions are split into fixed chunks (a multiple of 8 positions, independent of the number of
// threads), each accumulating its floating sums into its own partial state, added in chunk order at the
// end: results are deterministic. Chunks are grouped into one contiguous run per thread; confusion
// histograms of up to kInlineHistBins bins are counted in the pass, one per group; larger ones from the
// per-position predictions afterwards with the histogram code of the confusion-matrix ops
// (common/histogram_cpu.h). Nothing of size N x C is allocated; 64-bit indexing throughout.
//
// Targets are validated before anything is written: a bad target raises IndexError and leaves the state
// untouched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/histogram_cpu.h"
#include "common/row_lanes_cpu.h"
#include "common/row_softmax_cpu.h"
#include "confusion/confusion_common.h"
#include "evaluator/eval_update_common.h"

namespace fasteval {
namespace {

using evaluator::kOp;

// Per-chunk partial state.
struct Partial {
  double loss = 0;
  int64_t valid = 0;
  std::vector<int64_t> hits, ccount, ccorrect;
  std::vector<double> cconf;
  void init(int64_t K, int64_t nb) {
    hits.assign(K, 0);
    ccount.assign(nb, 0);
    ccorrect.assign(nb, 0);
    cconf.assign(nb, 0.0);
  }
};

// What one position contributes, from its row statistics.
struct PositionResult {
  float loss;
  float conf;  // NaN when undefined
  int64_t pred;
  int64_t rank;
};

// Beyond this |row max| the raw sum of the logits loses too many bits to the difference with C max.
constexpr float kHugeLogit = 1024.f;

template <typename T, bool SMOOTH>
inline PositionResult contiguous_row(const T* row, int64_t C, int64_t t, float keep, float eps_over_c) {
  cpu::RowEval ev;
  const cpu::RowStats st = cpu::row_eval_stats<T, SMOOTH>(row, C, t, &ev);
  PositionResult r;
  if (!std::isfinite(st.max)) {  // NaN, +inf or only -inf: loss and confidence are NaN (as torch's)
    ev.argmax = cpu::row_argmax(row, C);
    ev.rank = cpu::row_rank(row, C, t);
    r.loss = std::numeric_limits<float>::quiet_NaN();
    r.conf = std::numeric_limits<float>::quiet_NaN();
  } else {
    // lse - x_t as log(sumexp) - (x_t - max): no cancellation for rows of huge logits.
    const float log_s = std::log(st.sumexp);
    float v = keep * (log_s - (static_cast<float>(row[t]) - st.max));
    if constexpr (SMOOTH) {
      // C lse - sum_c x_c = C log(sumexp) - sum_c (x_c - max); from the raw sum the difference cancels (or
      // overflows) for rows of huge logits: those get the shifted sum in one more pass over the row.
      float shifted;
      if (std::fabs(st.max) > kHugeLogit || !std::isfinite(st.sum_wx)) {
        shifted = 0.f;
        for (int64_t c = 0; c < C; ++c) shifted += static_cast<float>(row[c]) - st.max;
      } else {
        shifted = st.sum_wx - static_cast<float>(C) * st.max;
      }
      v += eps_over_c * (static_cast<float>(C) * log_s - shifted);
    }
    r.loss = v;
    r.conf = 1.f / st.sumexp;  // softmax of the max: exp(0) / sum
  }
  r.pred = ev.argmax;
  r.rank = ev.rank;
  return r;
}

// Argmax and rank (the order of common/order.h) of n values at stride `stride`; scalar.
template <typename T>
inline cpu::RowEval strided_argmax_rank(const T* x, int64_t n, int64_t stride, int64_t t) {
  const float xt = static_cast<float>(x[t * stride]);
  order::ArgMax am = order::ArgMax::empty();
  order::RankParts<int64_t> rp = order::RankParts<int64_t>::empty();
  for (int64_t c = 0; c < n; ++c) {
    const float v = static_cast<float>(x[c * stride]);
    am.visit(v, c);
    rp.visit(v, c, xt, t);
  }
  return {am.index(), rp.rank(xt)};
}

// A position of the (N, C, S) layout: C values at stride S. Scalar, one read (the target's logit is
// read first so that the rank is counted in the same sweep as the online max / sum-exp). SMOOTH: add
// the label-smoothing term (only then: sum_c x_c is -inf when a class is masked with -inf, and
// 0 * -inf would turn the loss into NaN).
template <typename T, bool SMOOTH>
inline PositionResult strided_position(const T* x, int64_t C, int64_t S, int64_t t, float keep, float eps) {
  const float xt = static_cast<float>(x[t * S]);
  float m = -std::numeric_limits<float>::infinity();
  double s = 0.0, sx = 0.0;  // double: one sequential sum over a large C (the values at stride S)
  bool bad = false;
  int64_t arg = 0, gt = 0, tie_before = 0;
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(x[c * S]);
    if (std::isnan(v)) bad = true;
    if (v > m) {
      s = s * static_cast<double>(std::exp(m - v)) + 1.0;
      m = v;
      arg = c;
    } else if (m > -std::numeric_limits<float>::infinity()) {
      s += static_cast<double>(std::exp(v - m));
    }
    if constexpr (SMOOTH) sx += static_cast<double>(v);
    gt += v > xt;
    tie_before += (v == xt) && c < t;
  }
  PositionResult r;
  if (bad || !std::isfinite(m)) {
    const cpu::RowEval ev = strided_argmax_rank<T>(x, C, S, t);
    r.pred = ev.argmax;
    r.rank = ev.rank;
    r.loss = std::numeric_limits<float>::quiet_NaN();
    r.conf = std::numeric_limits<float>::quiet_NaN();
    return r;
  }
  const float log_s = static_cast<float>(std::log(s));
  r.loss = keep * (log_s - (xt - m));  // no cancellation for huge logits (see contiguous_row)
  if constexpr (SMOOTH) {
    double shifted;
    if (std::fabs(m) > kHugeLogit || !std::isfinite(sx)) {
      shifted = 0.0;
      for (int64_t c = 0; c < C; ++c) shifted += static_cast<double>(static_cast<float>(x[c * S]) - m);
    } else {
      shifted = sx - static_cast<double>(C) * m;
    }
    r.loss += (eps / static_cast<float>(C)) * (static_cast<float>(C) * log_s - static_cast<float>(shifted));
  }
  r.conf = static_cast<float>(1.0 / s);
  r.pred = arg;
  r.rank = gt + tie_before;
  return r;
}

// Fixed chunks of positions, grouped into at most one group per thread. Each chunk has its own Partial
// (the floating sums are added in chunk order, so the result depends on the sizes only, never on the
// thread count); counts that are integers (the confusion counts when they are taken in the same pass)
// go to one histogram per group.
struct Plan {
  int64_t chunk_rows;  // positions per chunk (a multiple of 8)
  int64_t nchunks;
  int64_t groups;      // contiguous runs of chunks, one parallel task each
  int64_t chunk_begin(int64_t g) const { return nchunks / groups * g + std::min(g, nchunks % groups); }
};

// Confusion histograms up to this many bins are counted in the pass itself, one copy per group.
constexpr int64_t kInlineHistBins = int64_t(1) << 16;

// Below this many logits an update runs on the calling thread: a parallel region costs microseconds.
constexpr int64_t kInlineWork = 32768;

inline Plan make_plan(int64_t P, int64_t C, int64_t element_size) {
  Plan pl;
  // About 64 KiB of logits per chunk, at most 512 chunks.
  const int64_t min_rows = std::max<int64_t>(1, 65536 / (C * element_size));
  pl.chunk_rows = (std::max(min_rows, (P + 511) / 512) + 7) / 8 * 8;
  pl.nchunks = (P + pl.chunk_rows - 1) / pl.chunk_rows;
  const int64_t threads = P * C <= kInlineWork || at::in_parallel_region() ? 1 : at::get_num_threads();
  pl.groups = std::max<int64_t>(1, std::min(threads, pl.nchunks));
  return pl;
}

// Runs body(group, chunk_begin, chunk_end) for every group, in parallel when there are several.
template <typename Body>
void for_groups(const Plan& pl, const Body& body) {
  if (pl.groups == 1) {
    body(int64_t(0), int64_t(0), pl.nchunks);
    return;
  }
  at::parallel_for(0, pl.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) body(g, pl.chunk_begin(g), pl.chunk_begin(g + 1));
  });
}

// Where the confusion counts of a position go: straight into the group's histogram (hist non-null), or
// the prediction into pred_out (-1 for ignored positions) for a histogram pass afterwards.
struct ConfSink {
  int64_t* hist;
  int64_t* pred_out;
  int64_t C;
  bool counts_only;
  FASTEVAL_ALWAYS_INLINE void add(int64_t i, int64_t t, int64_t p) const {
    if (hist) {
      emit(HostBins{hist}, t, p, C, counts_only);
    } else {
      pred_out[i] = p;
    }
  }
  FASTEVAL_ALWAYS_INLINE void ignored(int64_t i) const {
    if (!hist) pred_out[i] = -1;
  }
};

using evaluator::calib_bin;

// What one position adds to its chunk's partial state and to the confusion counts.
FASTEVAL_ALWAYS_INLINE void add_position(const PositionResult& r, int64_t i, int64_t t, const evaluator::Config& cfg,
                                         Partial& part, const ConfSink& sink) {
  sink.add(i, t, r.pred);
  part.loss += static_cast<double>(r.loss);
  part.valid += 1;
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  for (int64_t k = 0; k < K; ++k) part.hits[k] += r.rank < cfg.top_k[k];
  if (!std::isnan(r.conf)) {
    const int64_t b = calib_bin(cfg.boundaries, cfg.num_bins, r.conf);
    part.ccount[b] += 1;
    part.cconf[b] += static_cast<double>(r.conf);
    part.ccorrect[b] += r.pred == t;
  }
}

// The per-position pass (every build; the only one without AVX2): one position after the other.
template <typename T, typename I, bool SMOOTH>
void run_rows(const at::Tensor& logits, const at::Tensor& target, const evaluator::Config& cfg, const Plan& pl,
              std::vector<Partial>& parts, const std::vector<ConfSink>& sinks) {
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.dim() == 3 ? logits.size(2) : 1;
  const int64_t P = N * S;  // positions
  const T* x = logits.const_data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  const I* tp = target.const_data_ptr<I>();
  const float keep = 1.f - cfg.eps, eps_over_c = cfg.eps / static_cast<float>(C);
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  for_groups(pl, [&](int64_t g, int64_t cb, int64_t ce) {
    const ConfSink& sink = sinks[g];
    for (int64_t ch = cb; ch < ce; ++ch) {
      Partial& part = parts[ch];
      part.init(K, cfg.num_bins);
      const int64_t p0 = ch * pl.chunk_rows, p1 = std::min(P, p0 + pl.chunk_rows);
      for (int64_t i = p0; i < p1; ++i) {
        const int64_t t = static_cast<int64_t>(tp[i]);
        if (cfg.has_ignore && t == cfg.ignore_index) {
          sink.ignored(i);
          continue;
        }
        PositionResult r;
        if (S == 1) {
          r = contiguous_row<T, SMOOTH>(x + i * row_stride, C, t, keep, eps_over_c);
        } else {
          const int64_t n = i / S, s = i % S;
          r = strided_position<T, SMOOTH>(x + n * row_stride + s, C, S, t, keep, cfg.eps);
        }
        add_position(r, i, t, cfg, part, sink);
      }
    }
  });
}

#ifdef FASTEVAL_ROW_LANES
namespace L = cpu::lanes;

// Up to this C the rows of (N, C) logits are transposed into the lanes 8 at a time (lanes::load_block);
// up to kLanesMaxC they are swept one by one with their reductions transposed into the lanes; wider rows
// take the per-row pass (which keeps a block of each row in L1 between its two sweeps).
constexpr int64_t kBlockMaxC = L::kMaxC;
constexpr int64_t kLanesMaxC = 4096;
// (N, C, S) logits: 8 consecutive positions of a sample per vector, any C up to this (indices in float
// lanes are exact far beyond).
constexpr int64_t kSpatialMaxC = int64_t(1) << 20;
// Columns per partial sum of the (N, C, S) statistics.
constexpr int64_t kColumnBlock = 256;
// Top-k counters kept in vector lanes (more k: counted lane by lane).
constexpr int64_t kLaneTopK = 8;
// Calibration bins found by a vector count of the boundaries below the confidence (more: binary search).
constexpr int64_t kLaneBins = 64;

// Statistics of 8 positions (lane r = position r), from which everything the pass adds follows.
// m, sx (NaN detection: see lanes::rows_need_row_pass), xt = x_t, s = sum_c exp(x_c - m),
// sd = sum_c (x_c - m) (SMOOTH), arg = first index of the max, rank of x_t. arg and rank as float
// lanes (exact integers); all meaningful only in lanes that do not need the per-row pass.
struct LaneStats {
  __m256 m, sx, xt, s, sd, arg, rank;
};

// Lane statistics from C column vectors col(c) (lane r = position r; t: the target per lane, in [0, C)).
// Two sweeps over the columns: max, sum, x_t; then the sum of exp, the first index of the max and the
// rank of x_t (#{c : x_c > x_t} + #{c < t : x_c == x_t}, the order of common/order.h for rows
// without NaN).
template <bool SMOOTH, typename Col>
FASTEVAL_LANES_INLINE LaneStats columns_stats(const Col& col, int64_t C, __m256i t) {
  LaneStats st;
  const __m256 one = _mm256_set1_ps(1.f);
  {
    const __m256 v = col(0);
    st.m = v;
    st.sx = v;
    st.xt = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(t, _mm256_setzero_si256())));
  }
  __m256i cidx = _mm256_setzero_si256();
  for (int64_t c = 1; c < C; ++c) {
    cidx = _mm256_add_epi32(cidx, _mm256_set1_epi32(1));
    const __m256 v = col(c);
    st.m = _mm256_max_ps(st.m, v);
    st.sx = _mm256_add_ps(st.sx, v);
    st.xt = _mm256_blendv_ps(st.xt, v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(t, cidx)));
  }
  const __m256 tf = _mm256_cvtepi32_ps(t);
  __m256 s = _mm256_setzero_ps(), sd = _mm256_setzero_ps(), rank = _mm256_setzero_ps();
  __m256 arg = _mm256_setzero_ps(), found = _mm256_setzero_ps(), cf = _mm256_setzero_ps();
  // The sums run over blocks of kColumnBlock columns whose partial sums are then added: one sequential sum
  // over a large C loses about C * 2^-24 relative when values repeat (the roundings correlate).
  __m256 s_block = _mm256_setzero_ps(), sd_block = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m256 v = col(c);
    const __m256 d = _mm256_sub_ps(v, st.m);
    s_block = _mm256_add_ps(s_block, L::exp_le0(d));
    if constexpr (SMOOTH) sd_block = _mm256_add_ps(sd_block, d);
    if ((c + 1) % kColumnBlock == 0) {
      s = _mm256_add_ps(s, s_block);
      sd = _mm256_add_ps(sd, sd_block);
      s_block = sd_block = _mm256_setzero_ps();
    }
    const __m256 at_max = _mm256_andnot_ps(found, _mm256_cmp_ps(v, st.m, _CMP_EQ_OQ));
    arg = _mm256_blendv_ps(arg, cf, at_max);
    found = _mm256_or_ps(found, at_max);
    const __m256 above = _mm256_or_ps(_mm256_cmp_ps(v, st.xt, _CMP_GT_OQ),
                                      _mm256_and_ps(_mm256_cmp_ps(v, st.xt, _CMP_EQ_OQ),
                                                    _mm256_cmp_ps(cf, tf, _CMP_LT_OQ)));
    rank = _mm256_add_ps(rank, _mm256_and_ps(above, one));
    cf = _mm256_add_ps(cf, one);
  }
  st.s = _mm256_add_ps(s, s_block);
  st.sd = _mm256_add_ps(sd, sd_block);
  st.arg = arg;
  st.rank = rank;
  return st;
}

struct MinOp {
  FASTEVAL_LANES_INLINE __m256 operator()(__m256 a, __m256 b) const { return _mm256_min_ps(a, b); }
};

// The same statistics for 8 rows base + r * stride (r < nrows) of C > 8 elements each, swept one by one
// (medium C): a first sweep from memory (max, sum, and the rank of x_t, which is known beforehand), a
// second from cache (sum of exp, first index of the max); the per-row accumulator vectors are reduced
// together by one transposing reduction each. xt: lane r = the target's logit of row r (0 for ignored
// rows), t the targets as floats.
template <typename T, bool SMOOTH>
FASTEVAL_LANES_INLINE LaneStats rows_stats_eval(const T* base, int64_t stride, int nrows, int64_t C, __m256 xt,
                                                __m256 tf) {
  using V = L::Vec8<T>;
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  const __m256 lane_idx = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t full = C - C % 8;
  const int tail = static_cast<int>(C % 8);
  const __m256i tmask = L::first_lanes(tail);
  const __m256 ftmask = _mm256_castsi256_ps(tmask);
  auto load_tail = [&](const T* p) {  // zeros beyond the row
    if constexpr (std::is_same_v<T, float>) {
      return V::load(p, tmask);
    } else {
      return V::load(p, tail);
    }
  };
  alignas(32) float xr[L::kLanes], tr[L::kLanes];
  _mm256_store_ps(xr, xt);
  _mm256_store_ps(tr, tf);
  // Sweep 1, from memory: max, sum, rank.
  __m256 mv[L::kLanes], sv[L::kLanes], rv[L::kLanes];
  for (int r = 0; r < L::kLanes; ++r) {
    mv[r] = sv[r] = rv[r] = zero;
    if (r >= nrows) continue;
    const T* p = base + r * stride;
    const __m256 vxt = _mm256_set1_ps(xr[r]), vt = _mm256_set1_ps(tr[r]);
    __m256 m0 = ninf, m1 = ninf, s0 = zero, s1 = zero, r0 = zero, r1 = zero;
    __m256 idx = lane_idx;
    auto rank_of = [&](__m256 a, __m256 ia) {  // 1 where a ranks above x_t
      const __m256 above = _mm256_or_ps(_mm256_cmp_ps(a, vxt, _CMP_GT_OQ),
                                        _mm256_and_ps(_mm256_cmp_ps(a, vxt, _CMP_EQ_OQ),
                                                      _mm256_cmp_ps(ia, vt, _CMP_LT_OQ)));
      return _mm256_and_ps(above, one);
    };
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {
      const __m256 a = V::load(p + j), b = V::load(p + j + 8);
      const __m256 ib = _mm256_add_ps(idx, _mm256_set1_ps(8.f));
      m0 = _mm256_max_ps(m0, a);
      m1 = _mm256_max_ps(m1, b);
      s0 = _mm256_add_ps(s0, a);
      s1 = _mm256_add_ps(s1, b);
      r0 = _mm256_add_ps(r0, rank_of(a, idx));
      r1 = _mm256_add_ps(r1, rank_of(b, ib));
      idx = _mm256_add_ps(idx, _mm256_set1_ps(16.f));
    }
    if (j < full) {
      const __m256 a = V::load(p + j);
      m0 = _mm256_max_ps(m0, a);
      s0 = _mm256_add_ps(s0, a);
      r0 = _mm256_add_ps(r0, rank_of(a, idx));
      idx = _mm256_add_ps(idx, _mm256_set1_ps(8.f));
    }
    if (tail) {
      const __m256 a = load_tail(p + full);
      m1 = _mm256_max_ps(m1, _mm256_blendv_ps(ninf, a, ftmask));
      s1 = _mm256_add_ps(s1, a);
      r1 = _mm256_add_ps(r1, _mm256_and_ps(ftmask, rank_of(a, idx)));
    }
    mv[r] = _mm256_max_ps(m0, m1);
    sv[r] = _mm256_add_ps(s0, s1);
    rv[r] = _mm256_add_ps(r0, r1);
  }
  LaneStats st;
  st.m = L::reduce8(mv, L::MaxOp{});
  st.sx = L::reduce8(sv, L::AddOp{});
  st.rank = L::reduce8(rv, L::AddOp{});
  st.xt = xt;
  // Sweep 2, from cache: sum of exp (and of x - max), first index of the max.
  alignas(32) float mr[L::kLanes];
  _mm256_store_ps(mr, st.m);
  const __m256 big = _mm256_set1_ps(static_cast<float>(C));
  __m256 dv[L::kLanes], av[L::kLanes];
  for (int r = 0; r < L::kLanes; ++r) {
    sv[r] = dv[r] = zero;
    av[r] = big;
    if (r >= nrows) continue;
    const T* p = base + r * stride;
    const char* pf = reinterpret_cast<const char*>(base + (L::kLanes + r) * stride);  // the same row of the next 8
    const __m256 m = _mm256_set1_ps(mr[r]);
    __m256 e0 = zero, e1 = zero, d0 = zero, d1 = zero, a0 = big, a1 = big;
    __m256 idx = lane_idx;
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {
      _mm_prefetch(pf + j * sizeof(T), _MM_HINT_T0);
      if constexpr (sizeof(T) == 2) _mm_prefetch(pf + j * sizeof(T) + 32, _MM_HINT_T0);
      const __m256 xa = V::load(p + j), xb = V::load(p + j + 8);
      const __m256 a = _mm256_sub_ps(xa, m), b = _mm256_sub_ps(xb, m);
      e0 = _mm256_add_ps(e0, L::exp_le0(a));
      e1 = _mm256_add_ps(e1, L::exp_le0(b));
      if constexpr (SMOOTH) {
        d0 = _mm256_add_ps(d0, a);
        d1 = _mm256_add_ps(d1, b);
      }
      a0 = _mm256_min_ps(a0, _mm256_blendv_ps(big, idx, _mm256_cmp_ps(xa, m, _CMP_EQ_OQ)));
      a1 = _mm256_min_ps(a1, _mm256_blendv_ps(big, _mm256_add_ps(idx, _mm256_set1_ps(8.f)),
                                              _mm256_cmp_ps(xb, m, _CMP_EQ_OQ)));
      idx = _mm256_add_ps(idx, _mm256_set1_ps(16.f));
    }
    if (j < full) {
      const __m256 xa = V::load(p + j);
      const __m256 a = _mm256_sub_ps(xa, m);
      e0 = _mm256_add_ps(e0, L::exp_le0(a));
      if constexpr (SMOOTH) d0 = _mm256_add_ps(d0, a);
      a0 = _mm256_min_ps(a0, _mm256_blendv_ps(big, idx, _mm256_cmp_ps(xa, m, _CMP_EQ_OQ)));
      idx = _mm256_add_ps(idx, _mm256_set1_ps(8.f));
    }
    if (tail) {
      // Lanes beyond the row hold 0: their terms are masked off.
      const __m256 xa = load_tail(p + full);
      const __m256 a = _mm256_and_ps(_mm256_sub_ps(xa, m), ftmask);
      e1 = _mm256_add_ps(e1, _mm256_and_ps(L::exp_le0(a), ftmask));
      if constexpr (SMOOTH) d1 = _mm256_add_ps(d1, a);
      a1 = _mm256_min_ps(a1, _mm256_blendv_ps(big, idx, _mm256_and_ps(ftmask, _mm256_cmp_ps(xa, m, _CMP_EQ_OQ))));
    }
    sv[r] = _mm256_add_ps(e0, e1);
    dv[r] = _mm256_add_ps(d0, d1);
    av[r] = _mm256_min_ps(a0, a1);
  }
  st.s = L::reduce8(sv, L::AddOp{});
  st.sd = SMOOTH ? L::reduce8(dv, L::AddOp{}) : zero;
  st.arg = L::reduce8(av, MinOp{});
  return st;
}

// Per-chunk lane accumulators, folded into the chunk's Partial at its end.
struct LaneAcc {
  L::LaneSum loss;
  __m256 hits[kLaneTopK];
  void reset() {
    loss = L::LaneSum{};
    for (auto& h : hits) h = _mm256_setzero_ps();
  }
};

// Adds 8 positions (lane r = position i0 + r, nr of them) to the chunk's state from their lane statistics.
// redo(r) gives the per-position result of lane r for lanes whose row needs the per-row pass (a NaN, or a
// max that is not finite).
template <bool SMOOTH, typename Redo>
FASTEVAL_LANES_INLINE void finish_block(const LaneStats& st, const L::Targets& tg, int64_t i0, int64_t C,
                                        int nr, const evaluator::Config& cfg, bool lane_bins, Partial& part,
                                        LaneAcc& acc, const ConfSink& sink, const Redo& redo) {
  const __m256 counted = _mm256_xor_ps(tg.ignored, _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
  const int cmask = _mm256_movemask_ps(counted);  // lanes >= nr are marked ignored by load_targets
  const __m256 log_s = L::log_normal_ps(st.s);  // s >= 1 where used (redone and ignored lanes are replaced)
  __m256 loss = _mm256_mul_ps(_mm256_set1_ps(1.f - cfg.eps), _mm256_sub_ps(log_s, _mm256_sub_ps(st.xt, st.m)));
  if constexpr (SMOOTH) {
    loss = _mm256_fmadd_ps(_mm256_set1_ps(cfg.eps / static_cast<float>(C)),
                           _mm256_fmsub_ps(_mm256_set1_ps(static_cast<float>(C)), log_s, st.sd), loss);
  }
  const __m256 conf = _mm256_div_ps(_mm256_set1_ps(1.f), st.s);  // softmax of the max: exp(0) / sum
  __m256 rank = st.rank, arg = st.arg;
  __m256 bin = _mm256_set1_ps(-1.f);
  if (lane_bins) {
    for (int64_t k = 0; k < cfg.num_bins; ++k) {
      bin = _mm256_add_ps(bin, _mm256_and_ps(_mm256_cmp_ps(_mm256_set1_ps(cfg.boundaries[k]), conf, _CMP_LE_OQ),
                                             _mm256_set1_ps(1.f)));
    }
    bin = _mm256_min_ps(_mm256_max_ps(bin, _mm256_setzero_ps()), _mm256_set1_ps(static_cast<float>(cfg.num_bins - 1)));
  }
  alignas(32) float lossv[L::kLanes], confv[L::kLanes], argv[L::kLanes], rankv[L::kLanes], binv[L::kLanes];
  alignas(32) int32_t tv[L::kLanes];
  _mm256_store_ps(confv, conf);
  _mm256_store_ps(argv, arg);
  _mm256_store_ps(binv, bin);
  _mm256_store_si256(reinterpret_cast<__m256i*>(tv), tg.t);
  const int redo_mask = _mm256_movemask_ps(_mm256_and_ps(counted, L::rows_need_row_pass(st.m, st.sx)));
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  const bool lane_topk = K <= kLaneTopK;
  if (redo_mask) {  // NaN / inf / all -inf rows: rare
    _mm256_store_ps(lossv, loss);
    _mm256_store_ps(rankv, rank);
    for (int r = 0; r < L::kLanes; ++r) {
      if (!(redo_mask >> r & 1)) continue;
      const PositionResult pr = redo(r);
      lossv[r] = pr.loss;
      confv[r] = pr.conf;
      argv[r] = static_cast<float>(pr.pred);
      // Ranks of rows with NaN are below C (exact in a float); the hit test only compares them with k.
      rankv[r] = static_cast<float>(pr.rank);
    }
    loss = _mm256_load_ps(lossv);
    rank = _mm256_load_ps(rankv);
  }
  acc.loss.add(_mm256_and_ps(counted, loss));
  if (lane_topk) {
    for (int64_t k = 0; k < K; ++k) {
      const __m256 hit = _mm256_cmp_ps(rank, _mm256_set1_ps(static_cast<float>(cfg.top_k[k])), _CMP_LT_OQ);
      acc.hits[k] = _mm256_add_ps(acc.hits[k], _mm256_and_ps(_mm256_and_ps(hit, counted), _mm256_set1_ps(1.f)));
    }
  } else {
    _mm256_store_ps(rankv, rank);
  }
  part.valid += __builtin_popcount(static_cast<unsigned>(cmask));
  for (int r = 0; r < L::kLanes; ++r) {
    if (!(cmask >> r & 1)) {
      if (r < nr) sink.ignored(i0 + r);
      continue;
    }
    const int64_t t = tv[r];
    const int64_t p = static_cast<int64_t>(argv[r]);
    sink.add(i0 + r, t, p);
    if (!lane_topk) {
      for (int64_t k = 0; k < K; ++k) part.hits[k] += rankv[r] < static_cast<float>(cfg.top_k[k]);
    }
    const float cf = confv[r];
    if (!std::isnan(cf)) {
      const int64_t b = lane_bins && !(redo_mask >> r & 1) ? static_cast<int64_t>(binv[r])
                                                          : calib_bin(cfg.boundaries, cfg.num_bins, cf);
      part.ccount[b] += 1;
      part.cconf[b] += static_cast<double>(cf);
      part.ccorrect[b] += p == t;
    }
  }
}

// Folds a chunk's lane accumulators into its Partial.
inline void fold(const LaneAcc& acc, int64_t K, Partial& part) {
  part.loss = acc.loss.total();
  for (int64_t k = 0; k < std::min(K, kLaneTopK); ++k) {
    alignas(32) float h[L::kLanes];
    _mm256_store_ps(h, acc.hits[k]);
    for (int r = 0; r < L::kLanes; ++r) part.hits[k] += static_cast<int64_t>(h[r]);
  }
}

// Targets of a block, ignored lanes' class set to 0 (so that per-lane picks stay inside the row).
template <typename I>
FASTEVAL_LANES_INLINE L::Targets block_targets(const I* tp, int nr, int64_t C, int64_t ignore) {
  L::Targets tg = L::load_targets(tp, nr, C, ignore);
  tg.t = _mm256_andnot_si256(_mm256_castps_si256(tg.ignored), tg.t);
  return tg;  // tg.bad is never set: the targets were validated before the pass
}

// (N, C) logits, C <= kBlockMaxC (BLOCK: 8 rows transposed into the lanes) or C <= kLanesMaxC (8 rows
// swept one by one).
template <typename T, typename I, bool SMOOTH, bool BLOCK>
void run_lanes(const at::Tensor& logits, const at::Tensor& target, const evaluator::Config& cfg, const Plan& pl,
               bool lane_bins, std::vector<Partial>& parts, const std::vector<ConfSink>& sinks) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const T* x = logits.const_data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  const T* limit = x + (N - 1) * row_stride + C;  // one past the last element read
  const I* tp = target.const_data_ptr<I>();
  const float keep = 1.f - cfg.eps, eps_over_c = cfg.eps / static_cast<float>(C);
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  const int64_t ignore = cfg.has_ignore ? cfg.ignore_index : -1;  // -1: no valid target equals it
  constexpr int64_t kPrefetchRows = 64;
  for_groups(pl, [&](int64_t g, int64_t cb, int64_t ce) {
    const ConfSink& sink = sinks[g];
    __m256 col[BLOCK ? L::kMaxC : 1];
    LaneAcc acc;
    for (int64_t ch = cb; ch < ce; ++ch) {
      Partial& part = parts[ch];
      part.init(K, cfg.num_bins);
      acc.reset();
      const int64_t p0 = ch * pl.chunk_rows, p1 = std::min(N, p0 + pl.chunk_rows);
      for (int64_t i = p0; i < p1; i += L::kLanes) {
        const int nr = static_cast<int>(std::min<int64_t>(L::kLanes, p1 - i));
        const L::Targets tg = block_targets(tp + i, nr, C, ignore);
        auto redo = [&](int r) {
          return contiguous_row<T, SMOOTH>(x + (i + r) * row_stride, C, static_cast<int64_t>(tp[i + r]), keep,
                                           eps_over_c);
        };
        LaneStats st;
        if constexpr (BLOCK) {
          if (i + kPrefetchRows + L::kLanes <= N) {
            L::prefetch_rows(x + (i + kPrefetchRows) * row_stride, row_stride, L::kLanes, C);
          }
          L::load_block(x + i * row_stride, row_stride, nr, C, limit, col);
          st = columns_stats<SMOOTH>([&](int64_t c) { return col[c]; }, C, tg.t);
        } else {
          alignas(32) int32_t tr[L::kLanes];
          alignas(32) float xr[L::kLanes];
          _mm256_store_si256(reinterpret_cast<__m256i*>(tr), tg.t);
          for (int r = 0; r < L::kLanes; ++r) xr[r] = r < nr ? static_cast<float>(x[(i + r) * row_stride + tr[r]]) : 0.f;
          st = rows_stats_eval<T, SMOOTH>(x + i * row_stride, row_stride, nr, C, _mm256_load_ps(xr),
                                          _mm256_cvtepi32_ps(tg.t));
        }
        finish_block<SMOOTH>(st, tg, i, C, nr, cfg, lane_bins, part, acc, sink, redo);
      }
      fold(acc, K, part);
    }
  });
}

// (N, C, S) logits: 8 consecutive positions of one sample per vector; column c of them is 8 contiguous
// values (masked at the end of the sample's S positions).
template <typename T, typename I, bool SMOOTH>
void run_spatial(const at::Tensor& logits, const at::Tensor& target, const evaluator::Config& cfg, const Plan& pl,
                 bool lane_bins, std::vector<Partial>& parts, const std::vector<ConfSink>& sinks) {
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.size(2);
  const int64_t P = N * S;
  const T* x = logits.const_data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  const I* tp = target.const_data_ptr<I>();
  const float keep = 1.f - cfg.eps;
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  const int64_t ignore = cfg.has_ignore ? cfg.ignore_index : -1;
  for_groups(pl, [&](int64_t g, int64_t cb, int64_t ce) {
    const ConfSink& sink = sinks[g];
    LaneAcc acc;
    for (int64_t ch = cb; ch < ce; ++ch) {
      Partial& part = parts[ch];
      part.init(K, cfg.num_bins);
      acc.reset();
      const int64_t p0 = ch * pl.chunk_rows, p1 = std::min(P, p0 + pl.chunk_rows);
      int64_t i = p0;
      while (i < p1) {
        const int64_t n = i / S, s = i % S;
        const int nr = static_cast<int>(std::min<int64_t>({L::kLanes, p1 - i, S - s}));
        const T* base = x + n * row_stride + s;
        const L::Targets tg = block_targets(tp + i, nr, C, ignore);
        auto redo = [&](int r) {
          return strided_position<T, SMOOTH>(base + r, C, S, static_cast<int64_t>(tp[i + r]), keep, cfg.eps);
        };
        LaneStats st;
        if (nr == L::kLanes) {
          st = columns_stats<SMOOTH>([&](int64_t c) { return L::Vec8<T>::load(base + c * S); }, C, tg.t);
        } else {
          const __m256i mask = L::first_lanes(nr);
          st = columns_stats<SMOOTH>(
              [&](int64_t c) {
                if constexpr (std::is_same_v<T, float>) {
                  return L::Vec8<T>::load(base + c * S, mask);
                } else {
                  return L::Vec8<T>::load(base + c * S, nr);
                }
              },
              C, tg.t);
        }
        finish_block<SMOOTH>(st, tg, i, C, nr, cfg, lane_bins, part, acc, sink, redo);
        i += nr;
      }
      fold(acc, K, part);
    }
  });
}
#endif  // FASTEVAL_ROW_LANES

}  // namespace

namespace evaluator {

template <>
void Kernels<at::kCPU>::update(const UpdateArgs& args) {
  const evaluator::Shapes& sh = args.sh;
  const int64_t C = sh.C, P = sh.positions;
  const at::Tensor logits = evaluator::kernel_layout(args.logits);
  const at::Tensor target = args.target.contiguous();
  if (P == 0) return;

  const bool has_ignore = args.ignore_index.has_value();
  const int64_t ignore = args.ignore_index.value_or(0);

  // Validate every target before writing anything: a branch-free scan in blocks (vectorized), then the
  // first bad target found by a scalar search for the message.
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "eval_update_cpu_check", [&] {
    const index_t* tp = target.const_data_ptr<index_t>();
    const uint64_t uc = static_cast<uint64_t>(C);
    bool bad = false;
    constexpr int64_t kScan = 4096;
    for (int64_t b0 = 0; b0 < P && !bad; b0 += kScan) {
      const int64_t b1 = std::min(P, b0 + kScan);
      int64_t nbad = 0;
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t t = static_cast<int64_t>(tp[i]);
        nbad += (static_cast<uint64_t>(t) >= uc) & !(has_ignore && t == ignore);
      }
      bad = nbad > 0;
    }
    if (bad) check_target_values(tp, P, C, args.ignore_index, kOp, "; the state was not changed");
  });

  const at::Tensor bnd = args.boundaries.contiguous();
  std::vector<int64_t> ks(args.top_k.begin(), args.top_k.end());
  evaluator::Config cfg{has_ignore, ignore, static_cast<float>(args.label_smoothing), ks, bnd.const_data_ptr<float>(),
                        bnd.numel()};
  const Plan pl = make_plan(P, C, static_cast<int64_t>(logits.element_size()));
  std::vector<Partial> parts(static_cast<size_t>(pl.nchunks));

  // Confusion counts: in the same pass into one histogram per group (the first group counts straight
  // into the state: the targets are valid, nothing can fail from here), or, for large histograms, from
  // the predictions after the pass with the histogram code of the standalone confusion-matrix ops.
  const int64_t bins = args.counts_only ? 3 * C : C * C;
  int64_t* cm = args.state.confmat.data_ptr<int64_t>();
  const bool inline_hist = bins <= kInlineHistBins;
  std::vector<int64_t> group_hist(inline_hist ? static_cast<size_t>((pl.groups - 1) * bins) : 0, 0);
  std::vector<int64_t> pred(inline_hist ? 0 : static_cast<size_t>(P));
  std::vector<ConfSink> sinks;
  for (int64_t g = 0; g < pl.groups; ++g) {
    int64_t* h = !inline_hist ? nullptr : g == 0 ? cm : group_hist.data() + (g - 1) * bins;
    sinks.push_back(ConfSink{h, inline_hist ? nullptr : pred.data(), C, args.counts_only});
  }

#ifdef FASTEVAL_ROW_LANES
  const float* bp = cfg.boundaries;
  const bool lane_bins = cfg.num_bins <= kLaneBins && std::is_sorted(bp, bp + cfg.num_bins) &&
                         std::none_of(bp, bp + cfg.num_bins, [](float v) { return std::isnan(v); });
#endif
  FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "eval_update_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "eval_update_cpu_target", [&] {
      auto pick = [&](auto smooth) {
        constexpr bool SM = decltype(smooth)::value;
#ifdef FASTEVAL_ROW_LANES
        if (sh.S == 1 && C <= kBlockMaxC) {
          return run_lanes<T, index_t, SM, true>(logits, target, cfg, pl, lane_bins, parts, sinks);
        }
        if (sh.S == 1 && C <= kLanesMaxC) {
          return run_lanes<T, index_t, SM, false>(logits, target, cfg, pl, lane_bins, parts, sinks);
        }
        if (sh.S > 1 && C <= kSpatialMaxC) {
          return run_spatial<T, index_t, SM>(logits, target, cfg, pl, lane_bins, parts, sinks);
        }
#endif
        run_rows<T, index_t, SM>(logits, target, cfg, pl, parts, sinks);
      };
      if (cfg.eps > 0.f) {
        pick(std::true_type{});
      } else {
        pick(std::false_type{});
      }
    });
  });

  // Add the partials in chunk order (deterministic).
  double loss = 0;
  int64_t valid = 0;
  int64_t* hits = args.state.topk_hits.data_ptr<int64_t>();
  int64_t* cc = args.state.calib_count.data_ptr<int64_t>();
  double* cf = args.state.calib_conf.data_ptr<double>();
  int64_t* cr = args.state.calib_correct.data_ptr<int64_t>();
  for (const Partial& part : parts) {
    loss += part.loss;
    valid += part.valid;
    for (size_t k = 0; k < ks.size(); ++k) hits[k] += part.hits[k];
    for (int64_t b = 0; b < cfg.num_bins; ++b) {
      cc[b] += part.ccount[b];
      cf[b] += part.cconf[b];
      cr[b] += part.ccorrect[b];
    }
  }
  args.state.loss_sum.data_ptr<double>()[0] += loss;
  args.state.count.data_ptr<int64_t>()[0] += valid;

  if (inline_hist) {
    for (int64_t g = 1; g < pl.groups; ++g) {
      const int64_t* h = group_hist.data() + (g - 1) * bins;
      for (int64_t b = 0; b < bins; ++b) cm[b] += h[b];
    }
    return;
  }
  // Per-class counts: bins [0, C) tp, [C, 2C) predicted, [2C, 3C) target; pred = -1 marks ignored positions.
  const int64_t* pp = pred.data();
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "eval_update_cpu_confmat", [&] {
    const index_t* tp = target.const_data_ptr<index_t>();
    cpu::parallel_histogram(P, bins, 4096, cm, [&](int64_t begin, int64_t end, const auto& acc) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p = pp[i];
        if (p < 0) continue;
        emit(acc, static_cast<int64_t>(tp[i]), p, C, args.counts_only);
      }
    });
  });
}

}  // namespace evaluator

TORCH_LIBRARY_IMPL(fasteval, CPU, m) { evaluator::register_ops<evaluator::Kernels<at::kCPU>>(m); }

}  // namespace fasteval
