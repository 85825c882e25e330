// CPU kernel of fasteval::eval_update, the fused evaluation pass (the math is in registration.cpp).
//
// Each row of the logits is read once, by the row pass shared with the cross-entropy kernel
// (common/row_softmax_cpu.h: row_eval_stats), which yields the log-sum-exp, the argmax and the rank of
// the target's logit together. From those the loss, the top-k hits and the calibration bin of the row
// follow without touching the row again. Rows are split into fixed chunks (independent of the number of
// threads, so results are deterministic), each chunk accumulating into its own small partial state;
// the partials are added in chunk order at the end. The confusion matrix is counted from the per-row
// predictions after the pass with the histogram code of the confusion-matrix ops
// (common/histogram_cpu.h); rows with a non-finite maximum take the argmax and rank of
// common/row_rank_cpu.h. Nothing of size N x C is allocated; 64-bit indexing throughout.
//
// Targets are validated before anything is written: a bad target raises IndexError and leaves the state
// untouched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/histogram_cpu.h"
#include "common/row_softmax_cpu.h"
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
    const float l = st.lse();
    float v = keep * (l - static_cast<float>(row[t]));
    if constexpr (SMOOTH) v += eps_over_c * (static_cast<float>(C) * l - st.sum_wx);
    r.loss = v;
    r.conf = 1.f / st.sumexp;  // softmax of the max: exp(0) / sum
  }
  r.pred = ev.argmax;
  r.rank = ev.rank;
  return r;
}

// Argmax and rank (the order of common/row_rank_cpu.h) of n values at stride `stride`; scalar.
template <typename T>
inline cpu::RowEval strided_argmax_rank(const T* x, int64_t n, int64_t stride, int64_t t) {
  const float xt = static_cast<float>(x[t * stride]);
  const bool tnan = std::isnan(xt);
  int64_t arg = 0, rank = 0;
  float best = static_cast<float>(x[0]);
  for (int64_t c = 0; c < n; ++c) {
    const float v = static_cast<float>(x[c * stride]);
    const bool vnan = std::isnan(v);
    if (!std::isnan(best) && (v > best || vnan)) {
      best = v;
      arg = c;
    }
    const bool above = !tnan && (vnan || v > xt);
    const bool tie = tnan ? vnan : v == xt;
    rank += above || (tie && c < t);
  }
  return {arg, rank};
}

// A position of the (N, C, S) layout: C values at stride S. Scalar, one read (the target's logit is
// read first so that the rank is counted in the same sweep as the online max / sum-exp). SMOOTH: add
// the label-smoothing term (only then: sum_c x_c is -inf when a class is masked with -inf, and
// 0 * -inf would turn the loss into NaN).
template <typename T, bool SMOOTH>
inline PositionResult strided_position(const T* x, int64_t C, int64_t S, int64_t t, float keep, float eps) {
  const float xt = static_cast<float>(x[t * S]);
  float m = -std::numeric_limits<float>::infinity(), s = 0.f, sx = 0.f;
  bool bad = false;
  int64_t arg = 0, gt = 0, tie_before = 0;
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(x[c * S]);
    if (std::isnan(v)) bad = true;
    if (v > m) {
      s = s * std::exp(m - v) + 1.f;
      m = v;
      arg = c;
    } else if (m > -std::numeric_limits<float>::infinity()) {
      s += std::exp(v - m);
    }
    if constexpr (SMOOTH) sx += v;
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
  const float l = m + std::log(s);
  r.loss = keep * (l - xt);
  if constexpr (SMOOTH) r.loss += (eps / static_cast<float>(C)) * (static_cast<float>(C) * l - sx);
  r.conf = 1.f / s;
  r.pred = arg;
  r.rank = gt + tie_before;
  return r;
}

template <typename T, typename I, bool SMOOTH>
void run(const at::Tensor& logits, const at::Tensor& target, const evaluator::Config& cfg, int64_t* pred_out,
         std::vector<Partial>& parts, int64_t chunk_rows) {
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.dim() == 3 ? logits.size(2) : 1;
  const int64_t P = N * S;  // positions
  const T* x = logits.const_data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  const I* tp = target.const_data_ptr<I>();
  const float keep = 1.f - cfg.eps, eps_over_c = cfg.eps / static_cast<float>(C);
  const int64_t nchunks = static_cast<int64_t>(parts.size());
  const int64_t K = static_cast<int64_t>(cfg.top_k.size());
  const float* bnd = cfg.boundaries;
  const int64_t nb = cfg.num_bins;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      Partial& part = parts[ch];
      part.init(K, nb);
      const int64_t p0 = ch * chunk_rows, p1 = std::min(P, p0 + chunk_rows);
      for (int64_t i = p0; i < p1; ++i) {
        const int64_t t = static_cast<int64_t>(tp[i]);
        if (cfg.has_ignore && t == cfg.ignore_index) {
          pred_out[i] = -1;
          continue;
        }
        PositionResult r;
        if (S == 1) {
          r = contiguous_row<T, SMOOTH>(x + i * row_stride, C, t, keep, eps_over_c);
        } else {
          const int64_t n = i / S, s = i % S;
          r = strided_position<T, SMOOTH>(x + n * row_stride + s, C, S, t, keep, cfg.eps);
        }
        pred_out[i] = r.pred;
        part.loss += static_cast<double>(r.loss);
        part.valid += 1;
        for (int64_t k = 0; k < K; ++k) part.hits[k] += r.rank < cfg.top_k[k];
        if (!std::isnan(r.conf)) {
          // bucketize(conf, boundaries, right=True) - 1: the last boundary <= conf.
          int64_t b = static_cast<int64_t>(std::upper_bound(bnd, bnd + nb, r.conf) - bnd) - 1;
          b = std::min(std::max<int64_t>(b, 0), nb - 1);
          part.ccount[b] += 1;
          part.cconf[b] += static_cast<double>(r.conf);
          part.ccorrect[b] += r.pred == t;
        }
      }
    }
  });
}

void eval_update_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& boundaries_in,
                     std::optional<int64_t> ignore_index, double label_smoothing, at::IntArrayRef top_k, bool counts_only,
                     const at::Tensor& loss_sum, const at::Tensor& confmat, const at::Tensor& topk_hits,
                     const at::Tensor& calib_count, const at::Tensor& calib_conf, const at::Tensor& calib_correct,
                     const at::Tensor& count) {
  const evaluator::Shapes sh = evaluator::check_inputs(logits_in, target_in, boundaries_in, label_smoothing, top_k,
                                                       counts_only, loss_sum, confmat, topk_hits, calib_count,
                                                       calib_conf, calib_correct, count, at::kCPU);
  const int64_t C = sh.C, P = sh.positions;
  const at::Tensor logits = evaluator::kernel_layout(logits_in);
  const at::Tensor target = target_in.contiguous();
  if (P == 0) return;

  const bool has_ignore = ignore_index.has_value();
  const int64_t ignore = ignore_index.value_or(0);

  // Validate every target before writing anything.
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "eval_update_cpu_check", [&] {
    const index_t* tp = target.const_data_ptr<index_t>();
    for (int64_t i = 0; i < P; ++i) {
      const int64_t t = static_cast<int64_t>(tp[i]);
      if (!(has_ignore && t == ignore) && (t < 0 || t >= C)) {
        TORCH_CHECK_INDEX(false, kOp, ": target ", t, " is out of bounds for ", C, " classes (valid targets are 0..",
                          C - 1, has_ignore ? " or ignore_index=" + std::to_string(ignore) : std::string(),
                          "); the state was not changed");
      }
    }
  });

  const at::Tensor bnd = boundaries_in.contiguous();
  std::vector<int64_t> ks(top_k.begin(), top_k.end());
  evaluator::Config cfg{has_ignore, ignore, static_cast<float>(label_smoothing), ks, bnd.const_data_ptr<float>(),
                        bnd.numel()};
  // Fixed chunks of positions (about 64 KiB of logits each), at most 512 of them.
  const int64_t min_rows = std::max<int64_t>(1, 65536 / (C * static_cast<int64_t>(logits.element_size())));
  const int64_t chunk_rows = std::max(min_rows, (P + 511) / 512);
  std::vector<Partial> parts(static_cast<size_t>((P + chunk_rows - 1) / chunk_rows));
  std::vector<int64_t> pred(static_cast<size_t>(P));

  FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "eval_update_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "eval_update_cpu_target", [&] {
      if (cfg.eps > 0.f) {
        run<T, index_t, true>(logits, target, cfg, pred.data(), parts, chunk_rows);
      } else {
        run<T, index_t, false>(logits, target, cfg, pred.data(), parts, chunk_rows);
      }
    });
  });

  // Add the partials in chunk order (deterministic).
  double loss = 0;
  int64_t valid = 0;
  int64_t* hits = topk_hits.data_ptr<int64_t>();
  int64_t* cc = calib_count.data_ptr<int64_t>();
  double* cf = calib_conf.data_ptr<double>();
  int64_t* cr = calib_correct.data_ptr<int64_t>();
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
  loss_sum.data_ptr<double>()[0] += loss;
  count.data_ptr<int64_t>()[0] += valid;

  // Confusion counts from the predictions (pred = -1 marks ignored positions), with the histogram code
  // of the standalone confusion-matrix ops. Per-class counts: bins [0, C) tp, [C, 2C) predicted,
  // [2C, 3C) target.
  int64_t* cm = confmat.data_ptr<int64_t>();
  const int64_t* pp = pred.data();
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "eval_update_cpu_confmat", [&] {
    const index_t* tp = target.const_data_ptr<index_t>();
    const int64_t bins = counts_only ? 3 * C : C * C;
    cpu::parallel_histogram(P, bins, 4096, cm, [&](int64_t begin, int64_t end, const auto& acc) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p = pp[i];
        if (p < 0) continue;
        const int64_t t = static_cast<int64_t>(tp[i]);
        if (counts_only) {
          if (p == t) acc.add(t);
          acc.add(C + p);
          acc.add(2 * C + t);
        } else {
          acc.add(t * C + p);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fasteval, CPU, m) { m.impl("eval_update", &eval_update_cpu); }

}  // namespace fasteval
