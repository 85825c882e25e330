// CPU kernels of the confusion-matrix ops: fasteval::confusion_matrix, class_counts,
// multilabel_confusion_matrix, binned_confusion_matrix and topk_rank.
//
// One pass over the inputs, int64 counts, no temporary of size N: the samples are split into one chunk
// per thread, each counting into its own histogram (common/histogram_cpu.h), merged at the end; the
// argmax of score rows is fused into the same pass (common/row_rank_cpu.h). Out-of-range labels raise
// IndexError before anything is written out of bounds (invalid is always 0 on CPU).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/histogram_cpu.h"
#include "common/row_lanes_cpu.h"
#include "common/row_rank_cpu.h"
#include "confusion/confusion_common.h"

namespace fasteval {
namespace {

using cpu::Chunk;
using cpu::ChunkLoader;
using cpu::fVec;
using cpu::kChunk;

[[noreturn]] void bad_label(const char* op, const char* what, int64_t v, const char* range,
                            int64_t num_classes, const std::optional<int64_t>& ignore_index) {
  if (range) {
    TORCH_CHECK_INDEX(false, op, ": ", what, " ", v, " is out of range (valid values are ", range,
                      ignore_index ? " or ignore_index=" + std::to_string(*ignore_index) : std::string(), ")");
  }
  const std::string ign = ignore_index ? "ignore_index=" + std::to_string(*ignore_index) : std::string();
  if (num_classes == 0) {
    TORCH_CHECK_INDEX(false, op, ": ", what, " ", v, " is out of range for 0 classes (no class index is valid",
                      ignore_index ? "; the only valid value is " + ign : std::string(), ")");
  }
  TORCH_CHECK_INDEX(false, op, ": ", what, " ", v, " is out of range for ", num_classes,
                    " classes (valid values are 0..", num_classes - 1, ignore_index ? " or " + ign : std::string(),
                    ")");
}

at::Tensor zero_invalid(const at::Tensor& like) { return at::zeros({}, like.options().dtype(at::kLong)); }

// ---------------------------------------------------------------------------------------------------
// Multiclass: confusion matrix (bins C*C) or per-class counts (bins 3*C).

struct LabelCheck {
  const char* op;
  int64_t C;
  bool has_ignore;
  int64_t ignore;
  std::optional<int64_t> ignore_opt;
  // Returns false for an ignored sample; raises on an out-of-range label.
  FASTEVAL_ALWAYS_INLINE bool target_ok(int64_t t) const {
    if (has_ignore && t == ignore) return false;
    if (C10_UNLIKELY(static_cast<uint64_t>(t) >= static_cast<uint64_t>(C))) bad_label(op, "target", t, nullptr, C, ignore_opt);
    return true;
  }
  FASTEVAL_ALWAYS_INLINE void pred_ok(int64_t p) const {
    if (C10_UNLIKELY(static_cast<uint64_t>(p) >= static_cast<uint64_t>(C))) bad_label(op, "prediction", p, nullptr, C, std::nullopt);
  }
};

template <Mode M, typename P, typename T>
void count_labels(const P* preds, const T* target, int64_t n, int64_t bins, const LabelCheck& chk, int64_t* out) {
  const int64_t C = chk.C;
  cpu::parallel_histogram(n, bins, 32768, out, [&](int64_t b, int64_t e, auto acc) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = static_cast<int64_t>(target[i]);
      if (!chk.target_ok(t)) continue;
      const int64_t p = static_cast<int64_t>(preds[i]);
      chk.pred_ok(p);
      emit<M>(acc, t, p, C);
    }
  });
}

// Class indices are carried in float lanes by argmax_columns: exact for every index up to 2^24. Above
// that count_scores takes the scalar argmax_column (int64 indices).
constexpr int64_t kMaxFloatIndexClasses = int64_t(1) << 24;

// argmax over the class dim of 16 (or len < 16) positions d0.. of a sample laid out (C, D), D > 1.
// Index lanes are floats: exact only while C <= kMaxFloatIndexClasses (the caller's choice).
template <typename S>
FASTEVAL_ALWAYS_INLINE void argmax_columns(const S* base, int64_t C, int64_t D, int64_t len, float* idx_out) {
  using L = ChunkLoader<S>;
  auto load = [&](const S* p) { return len == kChunk ? L::load(p) : L::load(p, len); };
  Chunk mx = load(base);
  fVec ix_lo(0.f), ix_hi(0.f);
  for (int64_t c = 1; c < C; ++c) {
    const Chunk x = load(base + c * D);
    const fVec vc(static_cast<float>(c));
    // Take x where it is larger, or NaN while the running max is not: first maximal index, first NaN.
    const fVec m_lo = (x.lo > mx.lo) | ((x.lo != x.lo) & (mx.lo == mx.lo));
    const fVec m_hi = (x.hi > mx.hi) | ((x.hi != x.hi) & (mx.hi == mx.hi));
    mx.lo = fVec::blendv(mx.lo, x.lo, m_lo);
    mx.hi = fVec::blendv(mx.hi, x.hi, m_hi);
    ix_lo = fVec::blendv(ix_lo, vc, m_lo);
    ix_hi = fVec::blendv(ix_hi, vc, m_hi);
  }
  ix_lo.store(idx_out);
  ix_hi.store(idx_out + cpu::kVecWidth);
}

// The same for one position, scalar, with int64 indices (any C): the order of common/order.h (first
// maximal index; the first NaN is the maximum).
template <typename S>
inline int64_t argmax_column(const S* base, int64_t C, int64_t D) {
  order::ArgMax best = order::ArgMax::empty();
  for (int64_t c = 0; c < C && !order::is_nan(best.v); ++c) best.visit(static_cast<float>(base[c * D]), c);
  return best.index();
}

#ifdef FASTEVAL_ROW_LANES
// Up to this many classes rows of scores are transposed into the vector lanes 8 at a time
// (common/row_lanes_cpu.h) for the argmax and the rank; wider rows take the per-row passes.
constexpr int64_t kLanesMaxC = cpu::lanes::kMaxC;
#endif

template <Mode M, typename S, typename T>
void count_scores(const at::Tensor& scores, const T* target, int64_t N, int64_t C, int64_t D, int64_t bins,
                  const LabelCheck& chk, int64_t* out) {
  const S* x = scores.const_data_ptr<S>();
  const int64_t row_stride = scores.stride(0);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(C * D, 1));
  if (D == 1) {
#ifdef FASTEVAL_ROW_LANES
    if (C > 0 && C <= kLanesMaxC) {
      // 8 rows transposed into the lanes at a time; block_argmax follows torch.argmax's order.
      namespace L = cpu::lanes;
      const S* limit = x + (N - 1) * row_stride + C;  // one past the last element read
      cpu::parallel_histogram(N, bins, grain, out, [&](int64_t b, int64_t e, auto acc) {
        __m256 col[L::kMaxC];
        alignas(32) int32_t arg[L::kLanes];
        for (int64_t i = b; i < e; i += L::kLanes) {
          const int nr = static_cast<int>(std::min<int64_t>(L::kLanes, e - i));
          L::load_block(x + i * row_stride, row_stride, nr, C, limit, col);
          _mm256_store_si256(reinterpret_cast<__m256i*>(arg), L::block_argmax(col, C));
          for (int r = 0; r < nr; ++r) {
            const int64_t t = static_cast<int64_t>(target[i + r]);
            if (!chk.target_ok(t)) continue;
            emit<M>(acc, t, arg[r], C);
          }
        }
      });
      return;
    }
#endif
    cpu::parallel_histogram(N, bins, grain, out, [&](int64_t b, int64_t e, auto acc) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = static_cast<int64_t>(target[i]);
        if (!chk.target_ok(t)) continue;
        emit<M>(acc, t, cpu::row_argmax(x + i * row_stride, C), C);
      }
    });
    return;
  }
  if (C > kMaxFloatIndexClasses) {  // float index lanes would round the class index: scalar, exact
    cpu::parallel_histogram(N, bins, grain, out, [&](int64_t b, int64_t e, auto acc) {
      for (int64_t i = b; i < e; ++i) {
        const S* base = x + i * row_stride;
        const T* ti = target + i * D;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t t = static_cast<int64_t>(ti[d]);
          if (!chk.target_ok(t)) continue;
          emit<M>(acc, t, argmax_column<S>(base + d, C, D), C);
        }
      }
    }, /*max_per_unit=*/D);
    return;
  }
  cpu::parallel_histogram(N, bins, grain, out, [&](int64_t b, int64_t e, auto acc) {
    alignas(64) float idx[kChunk];
    for (int64_t i = b; i < e; ++i) {
      const S* base = x + i * row_stride;
      const T* ti = target + i * D;
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, D - d0);
        argmax_columns<S>(base + d0, C, D, len, idx);
        for (int64_t k = 0; k < len; ++k) {
          const int64_t t = static_cast<int64_t>(ti[d0 + k]);
          if (!chk.target_ok(t)) continue;
          emit<M>(acc, t, static_cast<int64_t>(idx[k]), C);
        }
      }
    }
  }, /*max_per_unit=*/D);
}

// ---------------------------------------------------------------------------------------------------
// Binary / multilabel with a threshold: bins 4 * L, bin = l * 4 + target * 2 + pred.

// The compute type of a thresholded score: float for float32 / bfloat16 / float16 (exact conversions),
// double for float64; integer predictions are labels.
template <typename P>
using score_compute_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

template <typename P, typename T>
void count_multilabel(const P* pp, const T* tp, int64_t N, int64_t L, double threshold,
                      std::optional<int64_t> ignore_index, int64_t* out) {
  constexpr const char* op = "fasteval.multilabel_confusion_matrix";
  const bool has_ign = ignore_index.has_value();
  const int64_t ign = ignore_index.value_or(0);
  using CT = score_compute_t<P>;
  const CT thr = static_cast<CT>(threshold);
  if (N == 0 || L == 0) return;  // nothing to count (and no `% L` by zero below)
  cpu::parallel_histogram(N * L, 4 * L, 32768, out, [&](int64_t b, int64_t e, auto acc) {
    int64_t l = b % L;
    for (int64_t i = b; i < e; ++i, l = (l + 1 == L ? 0 : l + 1)) {
      const int64_t t = static_cast<int64_t>(tp[i]);
      if (has_ign && t == ign) continue;
      if (C10_UNLIKELY(static_cast<uint64_t>(t) > 1)) bad_label(op, "target", t, "0 or 1", 2, ignore_index);
      int64_t p;
      if constexpr (std::is_integral_v<P>) {
        p = static_cast<int64_t>(pp[i]);
        if (C10_UNLIKELY(static_cast<uint64_t>(p) > 1)) bad_label(op, "prediction", p, "0 or 1", 2, std::nullopt);
      } else {
        p = static_cast<CT>(pp[i]) > thr;  // NaN is never above the threshold
      }
      acc.add(l * 4 + t * 2 + p);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Binned: the thresholds, in any order, are sorted first (a copy, stable, NaN last) with the permutation
// that gives each one's position in the caller's order. Then bucket b = #{k : sorted[k] <= x} (a
// branchless binary search; a NaN threshold is never <= x, so no score reaches it, as torch's x >= NaN),
// histogram over (label, bucket, target), and a suffix sum over buckets gives the counts at every
// threshold: x >= sorted[k]  <=>  bucket > k, written back to the threshold's own position.

// order[k] = index (in thr) of the k-th smallest threshold: ascending, NaN after every number, equal
// values (and NaNs) in index order; sorted[k] = thr[order[k]].
inline void sort_thresholds(const double* thr, int64_t T, std::vector<double>& sorted, std::vector<int64_t>& order) {
  order.resize(T);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [thr](int64_t a, int64_t b) {
    return !std::isnan(thr[a]) && (std::isnan(thr[b]) || thr[a] < thr[b]);
  });
  sorted.resize(T);
  for (int64_t k = 0; k < T; ++k) sorted[k] = thr[order[k]];
}

template <typename P, typename TT>
void count_binned(const P* pp, const TT* tp, int64_t N, int64_t L, bool one_vs_rest, const double* td, int64_t T,
                  std::optional<int64_t> ignore_index, int64_t* hist) {
  constexpr const char* op = "fasteval.binned_confusion_matrix";
  using CT = score_compute_t<P>;
  // td is ascending (NaN last); rounding to CT keeps it so (rounding is monotone).
  std::vector<CT> thr(T);
  for (int64_t k = 0; k < T; ++k) thr[k] = static_cast<CT>(td[k]);
  const CT* th = thr.data();
  const bool has_ign = ignore_index.has_value();
  const int64_t ign = ignore_index.value_or(0);
  const int64_t B = T + 1;
  const int64_t bins = L * B * 2;
  if (one_vs_rest) {
    // L = 0 (no columns): every counted target is out of range; the loop below raises on the first.
    cpu::parallel_histogram(N, bins, std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)), hist,
                            [&](int64_t b, int64_t e, auto acc) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = static_cast<int64_t>(tp[i]);
        if (has_ign && t == ign) continue;
        if (C10_UNLIKELY(static_cast<uint64_t>(t) >= static_cast<uint64_t>(L))) bad_label(op, "target", t, nullptr, L, ignore_index);
        const P* row = pp + i * L;
        for (int64_t l = 0; l < L; ++l) {
          acc.add((l * B + bucket_of<CT>(th, T, static_cast<CT>(row[l]))) * 2 + (l == t));
        }
      }
    });
    return;
  }
  if (N == 0 || L == 0) return;  // nothing to count (and no `% L` by zero below)
  cpu::parallel_histogram(N * L, bins, 32768, hist, [&](int64_t b, int64_t e, auto acc) {
    int64_t l = b % L;
    for (int64_t i = b; i < e; ++i, l = (l + 1 == L ? 0 : l + 1)) {
      const int64_t t = static_cast<int64_t>(tp[i]);
      if (has_ign && t == ign) continue;
      if (C10_UNLIKELY(static_cast<uint64_t>(t) > 1)) bad_label(op, "target", t, "0 or 1", 2, ignore_index);
      acc.add((l * B + bucket_of<CT>(th, T, static_cast<CT>(pp[i]))) * 2 + t);
    }
  });
}

}  // namespace

namespace confusion {

template <>
template <Mode M>
at::Tensor Kernels<at::kCPU>::multiclass(const at::Tensor& preds_in, const at::Tensor& target_in,
                                         const MulticlassShape& s, std::optional<int64_t> ignore_index, const char* op,
                                         at::Tensor& out) {
  const int64_t C = out.size(-1), bins = out.numel();
  const at::Tensor target = target_in.contiguous();
  LabelCheck chk{op, C, ignore_index.has_value(), ignore_index.value_or(0), ignore_index};
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "fasteval_confusion_target", [&] {
    using T = index_t;
    const T* tp = target.const_data_ptr<T>();
    if (s.from_scores) {
      const at::Tensor scores = scores_view(preds_in, s);
      FASTEVAL_DISPATCH_LOGITS_TYPES(scores.scalar_type(), "fasteval_confusion_scores", [&] {
        count_scores<M, scalar_t, T>(scores, tp, s.N, C, s.D, bins, chk, o);
      });
    } else {
      const at::Tensor preds = preds_in.contiguous();
      if (preds.scalar_type() == at::kLong) {
        count_labels<M, int64_t, T>(preds.const_data_ptr<int64_t>(), tp, target.numel(), bins, chk, o);
      } else {
        count_labels<M, int32_t, T>(preds.const_data_ptr<int32_t>(), tp, target.numel(), bins, chk, o);
      }
    }
  });
  return zero_invalid(target_in);
}

template <>
Counts Kernels<at::kCPU>::multilabel(const at::Tensor& preds_in, const at::Tensor& target_in, double threshold,
                                     std::optional<int64_t> ignore_index) {
  const int64_t N = preds_in.size(0), L = preds_in.size(1);
  at::Tensor out = at::zeros({L, 2, 2}, target_in.options().dtype(at::kLong));
  const at::Tensor preds = preds_in.contiguous(), target = target_in.contiguous();
  int64_t* o = out.data_ptr<int64_t>();
  FASTEVAL_DISPATCH_BINARY_TARGET(target.scalar_type(), "fasteval_multilabel_target", [&] {
    using T = scalar_t;
    const T* tp = target.const_data_ptr<T>();
    FASTEVAL_DISPATCH_SCORE_OR_LABEL_TYPES(preds.scalar_type(), "fasteval_multilabel_preds", [&] {
      count_multilabel<scalar_t, T>(preds.const_data_ptr<scalar_t>(), tp, N, L, threshold, ignore_index, o);
    });
  });
  return {out, zero_invalid(target_in)};
}

template <>
Counts Kernels<at::kCPU>::binned(const at::Tensor& preds_in, const at::Tensor& target_in,
                                 const at::Tensor& thresholds, bool one_vs_rest,
                                 std::optional<int64_t> ignore_index) {
  const int64_t N = preds_in.size(0), L = preds_in.size(1), T = thresholds.numel();
  const at::Tensor preds = preds_in.contiguous(), target = target_in.contiguous();
  const at::Tensor thr = thresholds.to(at::kDouble).contiguous();
  std::vector<double> sorted;
  std::vector<int64_t> order;
  sort_thresholds(thr.const_data_ptr<double>(), T, sorted, order);
  at::Tensor hist = at::zeros({L, T + 1, 2}, target_in.options().dtype(at::kLong));
  int64_t* h = hist.data_ptr<int64_t>();
  FASTEVAL_DISPATCH_BINARY_TARGET(target.scalar_type(), "fasteval_binned_target", [&] {
    using TT = scalar_t;
    const TT* tp = target.const_data_ptr<TT>();
    FASTEVAL_DISPATCH_SCORE_TYPES(preds.scalar_type(), "fasteval_binned_preds", [&] {
      count_binned<scalar_t, TT>(preds.const_data_ptr<scalar_t>(), tp, N, L, one_vs_rest, sorted.data(), T,
                                 ignore_index, h);
    });
  });
  at::Tensor out = at::empty({L, T, 2, 2}, target_in.options().dtype(at::kLong));
  binned_suffix_sums(h, L, T, order.data(), out.data_ptr<int64_t>());
  return {out, zero_invalid(target_in)};
}

template <>
Counts Kernels<at::kCPU>::topk_rank(const at::Tensor& scores_in, const at::Tensor& target_in,
                                    std::optional<int64_t> ignore_index) {
  constexpr const char* op = "fasteval.topk_rank";
  const int64_t N = scores_in.size(0), C = scores_in.size(1);
  const at::Tensor scores = class_contiguous(scores_in);
  const at::Tensor target = target_in.contiguous();
  at::Tensor rank = at::empty({N}, target_in.options().dtype(at::kLong));
  int64_t* r = rank.data_ptr<int64_t>();
  const bool has_ign = ignore_index.has_value();
  const int64_t ign = ignore_index.value_or(0);
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "fasteval_topk_target", [&] {
    const index_t* tp = target.const_data_ptr<index_t>();
    FASTEVAL_DISPATCH_LOGITS_TYPES(scores.scalar_type(), "fasteval_topk_scores", [&] {
      const scalar_t* x = scores.const_data_ptr<scalar_t>();
      const int64_t rs = scores.stride(0);
#ifdef FASTEVAL_ROW_LANES
      if (C > 0 && C <= kLanesMaxC) {
        // 8 rows transposed into the lanes at a time; block_rank follows the order of row_rank.
        namespace L = cpu::lanes;
        const scalar_t* limit = x + (N - 1) * rs + C;
        const int64_t nblocks = (N + L::kLanes - 1) / L::kLanes;
        at::parallel_for(0, nblocks, std::max<int64_t>(1, 4096 / C), [&](int64_t b, int64_t e) {
          __m256 col[L::kMaxC];
          alignas(32) int32_t tv[L::kLanes], rk[L::kLanes];
          for (int64_t blk = b; blk < e; ++blk) {
            const int64_t i = blk * L::kLanes;
            const int nr = static_cast<int>(std::min<int64_t>(L::kLanes, N - i));
            uint32_t ignored = 0;
            for (int q = 0; q < L::kLanes; ++q) {
              tv[q] = 0;
              if (q >= nr) continue;
              const int64_t t = static_cast<int64_t>(tp[i + q]);
              if (has_ign && t == ign) {
                ignored |= 1u << q;
                continue;
              }
              if (C10_UNLIKELY(static_cast<uint64_t>(t) >= static_cast<uint64_t>(C))) {
                bad_label(op, "target", t, nullptr, C, ignore_index);
              }
              tv[q] = static_cast<int32_t>(t);
            }
            L::load_block(x + i * rs, rs, nr, C, limit, col);
            __m256i t = _mm256_load_si256(reinterpret_cast<const __m256i*>(tv));
            __m256 m, sum, xt;
            L::block_max_sum_pick<1>(col, C, &t, &m, &sum, &xt);
            _mm256_store_si256(reinterpret_cast<__m256i*>(rk), L::block_rank(col, C, t, xt));
            for (int k = 0; k < nr; ++k) r[i + k] = ignored >> k & 1 ? -1 : rk[k];
          }
        });
        return;
      }
#endif
      at::parallel_for(0, N, std::max<int64_t>(1, 32768 / C), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t t = static_cast<int64_t>(tp[i]);
          if (has_ign && t == ign) {
            r[i] = -1;
            continue;
          }
          if (C10_UNLIKELY(static_cast<uint64_t>(t) >= static_cast<uint64_t>(C))) bad_label(op, "target", t, nullptr, C, ignore_index);
          r[i] = cpu::row_rank(x + i * rs, C, t);
        }
      });
    });
  });
  return {rank, zero_invalid(target_in)};
}

}  // namespace confusion

TORCH_LIBRARY_IMPL(fasteval, CPU, m) { confusion::register_ops<confusion::Kernels<at::kCPU>>(m); }

}  // namespace fasteval
