// CPU kernels of fasteval::softmax_cross_entropy and its backward.
//
// Forward: one read of each row (see common/row_softmax_cpu.h), x[target] gathered from the row, the
// label-smoothing sum accumulated in the same sweep; fp32 accumulation for every input dtype; rows split
// over threads with at::parallel_for; 64-bit indexing throughout.
// Backward: one read of the logits and one write of the gradient, from the saved log-sum-exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <vector>
#include <torch/library.h>

#include "common/checks.h"
#include "common/row_softmax_cpu.h"

namespace fasteval {
namespace {

using cpu::Chunk;
using cpu::ChunkLoader;
using cpu::fVec;
using cpu::kChunk;

constexpr const char* kOp = "fasteval.softmax_cross_entropy";
constexpr const char* kBackwardOp = "fasteval.softmax_cross_entropy_backward";
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

[[noreturn]] void bad_target(int64_t t, int64_t C, int64_t ignore_index, const char* op = kOp) {
  TORCH_CHECK_INDEX(false, op, ": target ", t, " is out of bounds for ", C,
                    " classes (valid targets are 0..", C - 1, " or ignore_index=", ignore_index, ")");
}

// Rows per partial sum of the reduction: fixed by C alone, so that the sum of the partials (in order,
// in double) does not depend on the number of threads.
inline int64_t rows_per_partial(int64_t C) { return std::clamp<int64_t>(65536 / std::max<int64_t>(C, 1), 1, 256); }

template <typename T, typename I, bool SMOOTH>
void forward_rows(const T* x, int64_t row_stride, const I* target, const float* w, int64_t N, int64_t C,
                  int64_t ignore_index, float eps, float* loss_rows, float* lse, double* part_loss,
                  double* part_weight) {
  const float wsum = weight_sum(w, C);
  const float keep = 1.f - eps;
  const float eps_over_c = C > 0 ? eps / static_cast<float>(C) : 0.f;  // C = 0: no row is counted
  const int64_t rpp = rows_per_partial(C);
  const int64_t nparts = (N + rpp - 1) / rpp;
  at::parallel_for(0, nparts, std::max<int64_t>(1, grain_rows(C) / rpp), [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      double sum_loss = 0.0, sum_weight = 0.0;
      const int64_t end = std::min(N, (part + 1) * rpp);
      for (int64_t i = part * rpp; i < end; ++i) {
        const int64_t t = static_cast<int64_t>(target[i]);
        float v = 0.f, l = 0.f;
        if (t != ignore_index) {
          if (t < 0 || t >= C) bad_target(t, C, ignore_index);
          const T* row = x + i * row_stride;
          const cpu::RowStats st = cpu::row_softmax_stats<T, SMOOTH>(row, C, w);
          l = st.lse();
          const float wt = w ? w[t] : 1.f;
          v = keep * wt * (l - static_cast<float>(row[t]));
          if constexpr (SMOOTH) v += eps_over_c * (wsum * l - st.sum_wx);
          sum_loss += v;
          sum_weight += wt;
        }
        if (loss_rows) loss_rows[i] = v;
        lse[i] = l;
      }
      part_loss[part] = sum_loss;
      part_weight[part] = sum_weight;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_cross_entropy_inputs(logits_in, target_in, label_smoothing, reduction, kOp);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const at::Tensor w = checked_weight(weight, C, logits_in, kOp);
  const at::Tensor logits = class_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({N}, opts);
  at::Tensor loss = reduction == kReductionNone ? at::empty({N}, opts) : at::empty({}, opts);
  at::Tensor total_weight = at::empty({}, opts);
  const int64_t rpp = rows_per_partial(C);
  std::vector<double> part_loss((N + rpp - 1) / rpp), part_weight(part_loss.size());
  const float eps = static_cast<float>(label_smoothing);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  float* loss_rows = reduction == kReductionNone ? loss.data_ptr<float>() : nullptr;
  if (N > 0) {
    FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "softmax_cross_entropy_cpu", [&] {
      using T = scalar_t;
      AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "softmax_cross_entropy_cpu_target", [&] {
        const T* xp = logits.const_data_ptr<T>();
        const index_t* tp = target.const_data_ptr<index_t>();
        if (eps > 0.f) {
          forward_rows<T, index_t, true>(xp, logits.stride(0), tp, wp, N, C, ignore_index, eps, loss_rows,
                                         lse.data_ptr<float>(), part_loss.data(), part_weight.data());
        } else {
          forward_rows<T, index_t, false>(xp, logits.stride(0), tp, wp, N, C, ignore_index, eps, loss_rows,
                                          lse.data_ptr<float>(), part_loss.data(), part_weight.data());
        }
      });
    });
  }
  double total = 0.0, tw = 0.0;
  for (size_t k = 0; k < part_loss.size(); ++k) {
    total += part_loss[k];
    tw += part_weight[k];
  }
  total_weight.fill_(tw);
  if (reduction == kReductionSum) loss.fill_(total);
  if (reduction == kReductionMean) loss.fill_(total / tw);  // 0 / 0 = NaN when every row is ignored, as torch
  // No classes (every row ignored, or a bad target raised above): torch's smoothing term is
  // eps / C * (a sum of no terms) = NaN on every row, ignored or not.
  if (C == 0 && eps > 0.f) loss.fill_(std::numeric_limits<float>::quiet_NaN());
  return {loss, lse, total_weight};
}

// grad_c = a * p_c - b * w_c  (w_c = 1 without weights), then grad_t -= g * (1 - eps) * w_t, with
// p_c = exp(x_c - lse), a = g * ((1 - eps) * w_t + eps * W / C), b = g * eps / C.
template <typename T, typename I>
void backward_rows(const float* g, int64_t g_stride, float g_scale, const T* x, int64_t row_stride, const I* target,
                   const float* w, const float* lse, int64_t N, int64_t C, int64_t ignore_index, float eps,
                   T* grad) {
  using L = ChunkLoader<T>;
  const float wsum = weight_sum(w, C);
  const float keep = 1.f - eps;
  const float eps_over_c = C > 0 ? eps / static_cast<float>(C) : 0.f;  // C = 0: no row is counted
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* out = grad + i * C;
      const int64_t t = static_cast<int64_t>(target[i]);
      if (t == ignore_index) {
        std::fill(out, out + C, T(0));
        continue;
      }
      if (t < 0 || t >= C) bad_target(t, C, ignore_index, kBackwardOp);
      const T* row = x + i * row_stride;
      const float gi = g[i * g_stride] * g_scale;
      const float wt = w ? w[t] : 1.f;
      const float a = gi * (keep * wt + eps_over_c * wsum);
      const float b = gi * eps_over_c;
      const fVec va(a), vb(b), vl(lse[i]);
      auto grad_chunk = [&](const Chunk& c, const float* wc, int64_t n) {
        Chunk r;
        r.lo = va * cpu::fast_exp(c.lo - vl);
        r.hi = va * cpu::fast_exp(c.hi - vl);
        if (b != 0.f) {
          if (wc) {
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
      for (; j + kChunk <= C; j += kChunk) L::store(out + j, grad_chunk(L::load(row + j), w ? w + j : nullptr, kChunk));
      if (j < C) L::store(out + j, grad_chunk(L::load(row + j, C - j), w ? w + j : nullptr, C - j), C - j);
      // The target column, recomputed in fp32 rather than corrected after rounding.
      const float pt = std::exp(static_cast<float>(row[t]) - lse[i]);
      out[t] = static_cast<T>(a * pt - b * wt - gi * keep * wt);
    }
  });
}

at::Tensor softmax_cross_entropy_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                                              const at::Tensor& target_in, const std::optional<at::Tensor>& weight,
                                              const at::Tensor& lse_in, const at::Tensor& total_weight,
                                              int64_t ignore_index, double label_smoothing, int64_t reduction) {
  constexpr const char* op = kBackwardOp;
  check_cross_entropy_backward_inputs(grad_loss_in, logits_in, target_in, lse_in, total_weight, label_smoothing,
                                      reduction, op);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const at::Tensor w = checked_weight(weight, C, logits_in, op);
  const at::Tensor logits = class_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0) return grad;
  // Per-row upstream gradient: g[i * g_stride] * g_scale.
  at::Tensor grad_loss = grad_loss_in.to(at::kFloat);  // may be an expanded (stride 0) tensor
  int64_t g_stride = reduction == kReductionNone ? grad_loss.stride(0) : 0;
  float g_scale = 1.f;
  if (reduction == kReductionMean) g_scale = 1.f / total_weight.item<float>();
  const float eps = static_cast<float>(label_smoothing);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "softmax_cross_entropy_backward_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "softmax_cross_entropy_backward_cpu_target", [&] {
      backward_rows<T, index_t>(grad_loss.const_data_ptr<float>(), g_stride, g_scale, logits.const_data_ptr<T>(),
                                logits.stride(0), target.const_data_ptr<index_t>(), wp, lse.const_data_ptr<float>(),
                                N, C, ignore_index, eps, grad.data_ptr<T>());
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasteval, CPU, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cpu);
  m.impl("softmax_cross_entropy_backward", &softmax_cross_entropy_backward_cpu);
}

}  // namespace fasteval
