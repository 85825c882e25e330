// CPU kernel of fasteval::compare_update, the fused logit comparison (the math is in registration.cpp,
// the formulas of the divergence terms in compare/compare_common.h).
//
// Per position, the two rows are brought to float32 once (bfloat16 / float16 rows and the (N, C, S)
// layout into a per-thread buffer of C floats; float32 rows are read in place), then swept from cache:
//   1. max a, max b (NaN-propagating) and max |a - b| over the classes where they differ (the only read
//      from memory of a float32 row);
//   2. sum exp(a - max a), sum exp(b - max b);
//   3. the KL, reverse-KL and JS terms, all non-negative, in float32 vector accumulators;
//   4. the argmax of each and the rank of a's argmax in b (common/row_rank_cpu.h, the order of
//      torch.argmax / topk_rank).
// The target's probabilities and losses follow in float64 from the log-sum-exps. Positions are split
// into fixed chunks (independent of the thread count: the float64 sums are deterministic), each with its
// own small partial state, added in chunk order at the end. The histogram bins of each position are
// kept in two int32 arrays (O(N) memory, nothing of size N x C) and counted afterwards with the shared
// histogram code. Targets are validated before anything is written: a bad one raises IndexError and
// leaves the state untouched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_vec.h"
#include "common/histogram_cpu.h"
#include "common/row_rank_cpu.h"
#include "common/row_softmax_cpu.h"
#include "common/simd_math_avx2.h"
#include "compare/compare_common.h"

namespace fasteval {
namespace {

using namespace compare;
using cpu::Chunk;
using cpu::fVec;
using cpu::kChunk;
using cpu::kVecWidth;
using FL = cpu::ChunkLoader<float>;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

FASTEVAL_ALWAYS_INLINE fVec vlog(const fVec& x) {
#if defined(CPU_CAPABILITY_AVX2)
  return fVec(cpu::lanes::log_ps(x));
#else
  return x.log();
#endif
}

FASTEVAL_ALWAYS_INLINE bool any_lane(const fVec& mask) {
  return (~static_cast<uint32_t>(mask.zero_mask()) & ((1u << kVecWidth) - 1)) != 0;
}

// Float32 view of C values of type T at stride S: in place for contiguous float32, else converted into buf.
template <typename T>
inline const float* float_row(const T* x, int64_t C, int64_t S, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (S == 1) return x;
  }
  if (S == 1) {
    using L = cpu::ChunkLoader<T>;
    int64_t j = 0;
    for (; j + kChunk <= C; j += kChunk) FL::store(buf + j, L::load(x + j));
    if (j < C) FL::store(buf + j, L::load(x + j, C - j), C - j);
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<float>(x[c * S]);
  }
  return buf;
}

// Sweep 1: max a, max b (NaN-propagating), max |a - b| where a != b.
inline void row_maxima(const float* a, const float* b, int64_t C, float& ma, float& mb, float& md) {
  const fVec ninf = cpu::neg_inf_vec(), zero(0.f);
  fVec xa = ninf, xb = ninf, xd = zero;
  auto step = [&](const Chunk& ca, const Chunk& cb, const Chunk& ma_, const Chunk& mb_) {
    xa = at::vec::maximum(xa, at::vec::maximum(ma_.lo, ma_.hi));
    xb = at::vec::maximum(xb, at::vec::maximum(mb_.lo, mb_.hi));
    const fVec dlo = fVec::blendv((ca.lo - cb.lo).abs(), zero, ca.lo == cb.lo);
    const fVec dhi = fVec::blendv((ca.hi - cb.hi).abs(), zero, ca.hi == cb.hi);
    xd = at::vec::maximum(xd, at::vec::maximum(dlo, dhi));
  };
  int64_t j = 0;
  for (; j + kChunk <= C; j += kChunk) {
    const Chunk ca = FL::load(a + j), cb = FL::load(b + j);
    step(ca, cb, ca, cb);
  }
  if (j < C) {
    const int64_t n = C - j;
    const Chunk ca = FL::load(a + j, n), cb = FL::load(b + j, n);  // zero beyond n: equal, no difference
    step(ca, cb, cpu::mask_tail(ca, n, ninf), cpu::mask_tail(cb, n, ninf));
  }
  ma = cpu::hmax(xa);
  mb = cpu::hmax(xb);
  md = cpu::hmax(xd);
}

// Sweep 2: sum_c exp(x_c - m) of both rows (m finite).
inline void row_sumexp(const float* a, const float* b, int64_t C, float ma, float mb, float& sa, float& sb) {
  const fVec ninf = cpu::neg_inf_vec(), vma(ma), vmb(mb);
  fVec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t j = 0;
  for (; j + kChunk <= C; j += kChunk) {
    const Chunk ca = FL::load(a + j), cb = FL::load(b + j);
    s0 = s0 + cpu::exp_term(ca.lo - vma);
    s1 = s1 + cpu::exp_term(ca.hi - vma);
    s2 = s2 + cpu::exp_term(cb.lo - vmb);
    s3 = s3 + cpu::exp_term(cb.hi - vmb);
  }
  if (j < C) {
    const int64_t n = C - j;
    const Chunk ca = cpu::mask_tail(FL::load(a + j, n), n, ninf), cb = cpu::mask_tail(FL::load(b + j, n), n, ninf);
    s0 = s0 + cpu::exp_term(ca.lo - vma);
    s1 = s1 + cpu::exp_term(ca.hi - vma);
    s2 = s2 + cpu::exp_term(cb.lo - vmb);
    s3 = s3 + cpu::exp_term(cb.hi - vmb);
  }
  sa = cpu::hsum(s0 + s1);
  sb = cpu::hsum(s2 + s3);
}

struct VAcc {
  fVec kl{0.f}, rkl{0.f}, js{0.f}, kl_inf{0.f}, rkl_inf{0.f};
};

// The terms of compare_common.h (add_class_terms) for one vector of classes.
FASTEVAL_ALWAYS_INLINE void vterms(const fVec& a, const fVec& b, const fVec& vma, const fVec& vmb, const fVec& vra,
                                   const fVec& vrb, const fVec& vDh, const fVec& vDe, const fVec& vDr, VAcc& acc) {
  const fVec ninf = cpu::neg_inf_vec(), zero(0.f), one(1.f), half(0.5f);
  const fVec ai = a == ninf, bi = b == ninf;
  const fVec either = ai | bi;
  const fVec la = (a - vma) - vra, lb = (b - vmb) - vrb;  // pivoted: exact for logits of any magnitude
  const fVec p = cpu::fast_exp(la), q = cpu::fast_exp(lb);
  // log_ratio (compare_common.h): a - b = s + e exactly (TwoSum; NaN where a - b overflows).
  const fVec s = a - b;
  const fVec bv = s - a;
  const fVec e = (a - (s - bv)) - (b + bv);
  const fVec t = fVec::blendv((s - vDh) + ((e - vDe) - vDr), zero, either);
  const fVec u = t * t;
  using at::vec::fmadd;
  const fVec E = u * fmadd(u, fmadd(u, fmadd(u, fmadd(u, fVec(1.f / 403200.f), fVec(1.f / 5760.f)), fVec(1.f / 144.f)),
                                    fVec(0.125f)),
                           fVec(0.5f));
  const fVec O = t * u * fmadd(u, fmadd(u, fmadd(u, fVec(1.f / 45360.f), fVec(1.f / 840.f)), fVec(1.f / 30.f)),
                               fVec(1.f / 3.f));
  const fVec EJ =
      u * fmadd(u, fmadd(u, fmadd(u, fmadd(u, fVec(-1.f / 38707200.f), fVec(1.f / 92160.f)), fVec(1.f / 2304.f)),
                         fVec(1.f / 64.f)),
                fVec(0.125f));
  const fVec OJ = t * u * fmadd(u, fmadd(u, fmadd(u, fVec(-1.f / 3870720.f), fVec(1.f / 11520.f)), fVec(1.f / 384.f)),
                                fVec(1.f / 16.f));
  fVec kl = q * (E + O), rkl = p * (E - O), js = q * (EJ + OJ);
  const fVec big = t.abs() >= fVec(kSmallT);
  if (any_lane(big)) {
    const fVec kl_d = fmadd(p, t - one, q);       // q - p (1 - t)
    const fVec rkl_d = p - q * (one + t);         // p - q (1 + t)
    const fVec lm = vlog(at::vec::maximum(half * (p + q), fVec(std::numeric_limits<float>::min())));
    const fVec js_d = half * (p * (la - lm) + q * (lb - lm));
    kl = fVec::blendv(kl, kl_d, big);
    rkl = fVec::blendv(rkl, rkl_d, big);
    js = fVec::blendv(js, js_d, big);
  }
  // -inf classes: both -inf add nothing (p = q = 0); one of them alone: see compare_common.h.
  kl = fVec::blendv(kl, q, ai);
  rkl = fVec::blendv(rkl, p, bi);
  js = fVec::blendv(js, fVec(kHalfLog2) * (p + q), either);
  acc.kl = acc.kl + kl;
  acc.rkl = acc.rkl + rkl;
  acc.js = acc.js + js;
  const fVec ones = zero == zero;
  acc.kl_inf = acc.kl_inf | (bi & (ai ^ ones));
  acc.rkl_inf = acc.rkl_inf | (ai & (bi ^ ones));
}

// Sweep 3: KL(p||q), KL(q||p), JS of two rows with finite maxima ma, mb; ra = log sum exp(a - ma),
// rb likewise.
inline void row_divergences(const float* a, const float* b, int64_t C, float ma, float mb, float ra, float rb,
                            float& kl, float& rkl, float& js) {
  const LogShift D = log_shift(ma, mb, ra, rb);
  const fVec vma(ma), vmb(mb), vra(ra), vrb(rb), vDh(D.hi), vDe(D.e), vDr(D.r), ninf = cpu::neg_inf_vec();
  VAcc acc;
  int64_t j = 0;
  for (; j + kChunk <= C; j += kChunk) {
    const Chunk ca = FL::load(a + j), cb = FL::load(b + j);
    vterms(ca.lo, cb.lo, vma, vmb, vra, vrb, vDh, vDe, vDr, acc);
    vterms(ca.hi, cb.hi, vma, vmb, vra, vrb, vDh, vDe, vDr, acc);
  }
  if (j < C) {
    const int64_t n = C - j;  // padding lanes: -inf in both, which adds nothing
    const Chunk ca = cpu::mask_tail(FL::load(a + j, n), n, ninf), cb = cpu::mask_tail(FL::load(b + j, n), n, ninf);
    vterms(ca.lo, cb.lo, vma, vmb, vra, vrb, vDh, vDe, vDr, acc);
    if (n > kVecWidth) vterms(ca.hi, cb.hi, vma, vmb, vra, vrb, vDh, vDe, vDr, acc);
  }
  kl = any_lane(acc.kl_inf) ? std::numeric_limits<float>::infinity() : cpu::hsum(acc.kl);
  rkl = any_lane(acc.rkl_inf) ? std::numeric_limits<float>::infinity() : cpu::hsum(acc.rkl);
  js = cpu::hsum(acc.js);
}

struct Position {
  double kl, rkl, js, dp, nll_a, nll_b, absdiff;
  int64_t ia, ib, rank;
};

// Everything about one position from its two float32 rows; y < 0: a's argmax.
inline Position compare_position(const float* a, const float* b, int64_t C, int64_t y, bool need_rank) {
  Position r;
  float ma, mb, md;
  row_maxima(a, b, C, ma, mb, md);
  r.absdiff = md;
  r.ia = cpu::row_find_first(a, C, ma);
  r.ib = cpu::row_find_first(b, C, mb);
  r.rank = need_rank ? cpu::row_rank(b, C, r.ia) : 0;
  if (y < 0) y = r.ia;
  if (!(std::isfinite(ma) && std::isfinite(mb))) {  // NaN, +inf or only -inf in a row: as log_softmax
    r.kl = r.rkl = r.js = r.dp = r.nll_a = r.nll_b = kNaN;
    return r;
  }
  float sa, sb;
  row_sumexp(a, b, C, ma, mb, sa, sb);
  float kl, rkl, js;
  row_divergences(a, b, C, ma, mb, std::log(sa), std::log(sb), kl, rkl, js);
  r.kl = kl;
  r.rkl = rkl;
  r.js = js;
  // log p_y = (a_y - max a) - log sum exp(a - max a), in float64 (pivoted: exact for large logits)
  const double lpy = (static_cast<double>(a[y]) - ma) - std::log(static_cast<double>(sa));
  const double lqy = (static_cast<double>(b[y]) - mb) - std::log(static_cast<double>(sb));
  r.dp = std::exp(lqy) - std::exp(lpy);
  r.nll_a = -lpy;
  r.nll_b = -lqy;
  return r;
}

inline void nan_max(double& m, double v) {
  if (!std::isnan(m) && (std::isnan(v) || v > m)) m = v;
}

struct Partial {
  double sum[kStatRows], sq[kStatRows], mx[kStatRows];
  int64_t cnt[kCountNames];
  int64_t hits[kMaxTopK];
  Partial() {
    for (int i = 0; i < kStatRows; ++i) {
      sum[i] = sq[i] = 0;
      mx[i] = -kInf;
    }
    std::fill(cnt, cnt + kCountNames, 0);
    std::fill(hits, hits + kMaxTopK, 0);
  }
  void add(int row, double v) {
    sum[row] += v;
    sq[row] += v * v;
    nan_max(mx[row], v);
  }
};

struct Run {
  int64_t N, C, S, P;
  bool has_target, has_ignore;
  int64_t ignore;
  std::vector<int64_t> top_k;
  float* row_stats;      // (P, 4) or null
  int64_t* row_argmax;   // (P, 2) or null
  int32_t* kl_bins;      // (P,) -1 where ignored
  int32_t* dp_bins;
};

template <typename TA, typename TB, typename I>
void run(const at::Tensor& a, const at::Tensor& b, const I* tp, const Run& cfg, std::vector<Partial>& parts,
         int64_t chunk) {
  const TA* xa = a.const_data_ptr<TA>();
  const TB* xb = b.const_data_ptr<TB>();
  const int64_t sa = a.stride(0), sb = b.stride(0);
  const int64_t C = cfg.C, S = cfg.S, P = cfg.P;
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  const int64_t nchunks = static_cast<int64_t>(parts.size());
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> buf(static_cast<size_t>(2 * C));
    for (int64_t ch = cb; ch < ce; ++ch) {
      Partial& part = parts[ch];
      const int64_t p0 = ch * chunk, p1 = std::min(P, p0 + chunk);
      for (int64_t i = p0; i < p1; ++i) {
        int64_t t = -1;
        if (cfg.has_target) {
          t = static_cast<int64_t>(tp[i]);
          if (cfg.has_ignore && t == cfg.ignore) {
            if (cfg.row_stats) std::fill(cfg.row_stats + 4 * i, cfg.row_stats + 4 * i + 4, static_cast<float>(kNaN));
            if (cfg.row_argmax) cfg.row_argmax[2 * i] = cfg.row_argmax[2 * i + 1] = -1;
            cfg.kl_bins[i] = cfg.dp_bins[i] = -1;
            continue;
          }
        }
        const int64_t n = i / S, s = i % S;
        const float* ra = float_row<TA>(xa + n * sa + s, C, S, buf.data());
        const float* rb = float_row<TB>(xb + n * sb + s, C, S, buf.data() + C);
        const Position r = compare_position(ra, rb, C, t, K > 0);
        part.add(kKL, r.kl);
        part.add(kRKL, r.rkl);
        part.add(kJS, r.js);
        part.add(kDP, r.dp);
        part.add(kAbsDiff, r.absdiff);
        part.cnt[kCount] += 1;
        part.cnt[kAgree] += r.ia == r.ib;
        if (cfg.has_target) {
          part.add(kNllA, r.nll_a);
          part.add(kNllB, r.nll_b);
          const bool ca = r.ia == t, cbb = r.ib == t;
          part.cnt[kRefCorrect] += ca;
          part.cnt[kCandCorrect] += cbb;
          part.cnt[kC2W] += ca && !cbb;
          part.cnt[kW2C] += !ca && cbb;
          part.cnt[kWithTarget] += 1;
        }
        for (int64_t k = 0; k < K; ++k) part.hits[k] += r.rank < cfg.top_k[k];
        cfg.kl_bins[i] = static_cast<int32_t>(kl_bin(r.kl));
        cfg.dp_bins[i] = static_cast<int32_t>(dp_bin(r.dp));
        if (cfg.row_stats) {
          float* o = cfg.row_stats + 4 * i;
          o[0] = static_cast<float>(r.kl);
          o[1] = static_cast<float>(r.rkl);
          o[2] = static_cast<float>(r.js);
          o[3] = static_cast<float>(r.dp);
        }
        if (cfg.row_argmax) {
          cfg.row_argmax[2 * i] = r.ia;
          cfg.row_argmax[2 * i + 1] = r.ib;
        }
      }
    }
  });
}

}  // namespace

namespace compare {

template <>
void Kernels<at::kCPU>::update(const UpdateArgs& args) {
  const Shapes& sh = args.sh;
  const at::Tensor& target = args.target;
  const bool has_target = target.defined();
  const int64_t P = sh.positions, C = sh.C;
  if (has_target && P > 0) {
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "compare_update_cpu_check", [&] {
      check_target_values(target.const_data_ptr<index_t>(), P, C, args.ignore_index, kOp,
                          "; the state was not changed");
    });
  }
  if (P == 0) return;
  const at::Tensor a = kernel_layout(args.reference), b = kernel_layout(args.candidate);

  Run cfg;
  cfg.N = sh.N;
  cfg.C = C;
  cfg.S = sh.S;
  cfg.P = P;
  cfg.has_target = has_target;
  cfg.has_ignore = args.ignore_index.has_value();
  cfg.ignore = args.ignore_index.value_or(0);
  cfg.top_k.assign(args.top_k.begin(), args.top_k.end());
  cfg.row_stats = args.row_stats;
  cfg.row_argmax = args.row_argmax;
  std::vector<int32_t> bins(static_cast<size_t>(2 * P));
  cfg.kl_bins = bins.data();
  cfg.dp_bins = bins.data() + P;

  // Fixed chunks of positions (about 64 KiB of logits each), at most 1024 of them.
  const int64_t min_rows = std::max<int64_t>(1, 16384 / C);
  const int64_t chunk = std::max(min_rows, (P + 1023) / 1024);
  std::vector<Partial> parts(static_cast<size_t>((P + chunk - 1) / chunk));

  FASTEVAL_DISPATCH_LOGITS_TYPES(a.scalar_type(), "compare_update_cpu_a", [&] {
    using TA = scalar_t;
    FASTEVAL_DISPATCH_LOGITS_TYPES(b.scalar_type(), "compare_update_cpu_b", [&] {
      using TB = scalar_t;
      if (has_target) {
        AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "compare_update_cpu_t", [&] {
          run<TA, TB, index_t>(a, b, target.const_data_ptr<index_t>(), cfg, parts, chunk);
        });
      } else {
        run<TA, TB, int64_t>(a, b, nullptr, cfg, parts, chunk);
      }
    });
  });

  // Partials in chunk order (deterministic).
  Partial total;
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  for (const Partial& part : parts) {
    for (int r = 0; r < kStatRows; ++r) {
      total.sum[r] += part.sum[r];
      total.sq[r] += part.sq[r];
      nan_max(total.mx[r], part.mx[r]);
    }
    for (int c = 0; c < kCountNames; ++c) total.cnt[c] += part.cnt[c];
    for (int64_t k = 0; k < K; ++k) total.hits[k] += part.hits[k];
  }
  double* st = args.stats.data_ptr<double>();
  for (int r = 0; r < kStatRows; ++r) {
    if (!has_target && (r == kNllA || r == kNllB)) continue;
    st[3 * r] += total.sum[r];
    st[3 * r + 1] += total.sq[r];
    nan_max(st[3 * r + 2], total.mx[r]);
  }
  int64_t* cn = args.counts.data_ptr<int64_t>();
  for (int c = 0; c < kCountNames; ++c) cn[c] += total.cnt[c];
  for (int64_t k = 0; k < K; ++k) cn[kCountNames + k] += total.hits[k];

  const int32_t* kb = cfg.kl_bins;
  const int32_t* db = cfg.dp_bins;
  cpu::parallel_histogram(P, kKlBins, 4096, args.kl_hist.data_ptr<int64_t>(), [&](int64_t begin, int64_t end, const auto& acc) {
    for (int64_t i = begin; i < end; ++i)
      if (kb[i] >= 0) acc.add(kb[i]);
  });
  cpu::parallel_histogram(P, kDpBins, 4096, args.dp_hist.data_ptr<int64_t>(), [&](int64_t begin, int64_t end, const auto& acc) {
    for (int64_t i = begin; i < end; ++i)
      if (db[i] >= 0) acc.add(db[i]);
  });
}

}  // namespace compare

TORCH_LIBRARY_IMPL(fasteval, CPU, m) { compare::register_ops<compare::Kernels<at::kCPU>>(m); }

}  // namespace fasteval
