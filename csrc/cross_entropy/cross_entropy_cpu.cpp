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

// Rows per parallel task: enough work per task to amortise the scheduling.
inline int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// W = sum_c w_c (C without weights), in double then rounded once.
inline float weight_sum(const float* w, int64_t C) {
  if (!w) return static_cast<float>(C);
  double acc = 0;
  for (int64_t c = 0; c < C; ++c) acc += w[c];
  return static_cast<float>(acc);
}

[[noreturn]] void bad_target(int64_t t, int64_t C, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, kOp, ": target ", t, " is out of bounds for ", C,
                    " classes (valid targets are 0..", C - 1, " or ignore_index=", ignore_index, ")");
}

template <typename T, typename I, bool SMOOTH>
void forward_rows(const T* x, int64_t row_stride, const I* target, const float* w, int64_t N, int64_t C,
                  int64_t ignore_index, float eps, float* loss, float* lse) {
  const float wsum = weight_sum(w, C);
  const float keep = 1.f - eps;
  const float eps_over_c = eps / static_cast<float>(C);
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = static_cast<int64_t>(target[i]);
      if (t == ignore_index) {
        loss[i] = 0.f;
        lse[i] = 0.f;
        continue;
      }
      if (t < 0 || t >= C) bad_target(t, C, ignore_index);
      const T* row = x + i * row_stride;
      const cpu::RowStats st = cpu::row_softmax_stats<T, SMOOTH>(row, C, w);
      const float l = st.lse();
      const float wt = w ? w[t] : 1.f;
      float v = keep * wt * (l - static_cast<float>(row[t]));
      if constexpr (SMOOTH) v += eps_over_c * (wsum * l - st.sum_wx);
      loss[i] = v;
      lse[i] = l;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t ignore_index, double label_smoothing) {
  check_logits_2d(logits_in, kOp);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  check_target_1d(target_in, N, logits_in, kOp);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  const at::Tensor w = checked_weight(weight, C, logits_in, kOp);
  const at::Tensor logits = class_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, opts);
  at::Tensor lse = at::empty({N}, opts);
  if (N == 0) return {loss, lse};
  const float eps = static_cast<float>(label_smoothing);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "softmax_cross_entropy_cpu", [&] {
    using T = scalar_t;
    {
      AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "softmax_cross_entropy_cpu_target", [&] {
        const T* xp = logits.const_data_ptr<T>();
        const index_t* tp = target.const_data_ptr<index_t>();
        if (eps > 0.f) {
          forward_rows<T, index_t, true>(xp, logits.stride(0), tp, wp, N, C, ignore_index, eps,
                                         loss.data_ptr<float>(), lse.data_ptr<float>());
        } else {
          forward_rows<T, index_t, false>(xp, logits.stride(0), tp, wp, N, C, ignore_index, eps,
                                          loss.data_ptr<float>(), lse.data_ptr<float>());
        }
      });
    }
  });
  return {loss, lse};
}

// grad_c = a * p_c - b * w_c  (w_c = 1 without weights), then grad_t -= g * (1 - eps) * w_t, with
// p_c = exp(x_c - lse), a = g * ((1 - eps) * w_t + eps * W / C), b = g * eps / C.
template <typename T, typename I>
void backward_rows(const float* g, int64_t g_stride, const T* x, int64_t row_stride, const I* target,
                   const float* w, const float* lse, int64_t N, int64_t C, int64_t ignore_index, float eps,
                   T* grad) {
  using L = ChunkLoader<T>;
  const float wsum = weight_sum(w, C);
  const float keep = 1.f - eps;
  const float eps_over_c = eps / static_cast<float>(C);
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* out = grad + i * C;
      const int64_t t = static_cast<int64_t>(target[i]);
      if (t == ignore_index) {
        std::fill(out, out + C, T(0));
        continue;
      }
      if (t < 0 || t >= C) bad_target(t, C, ignore_index);
      const T* row = x + i * row_stride;
      const float gi = g[i * g_stride];
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
                                              const at::Tensor& lse_in, int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "fasteval.softmax_cross_entropy_backward";
  check_logits_2d(logits_in, op);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  check_target_1d(target_in, N, logits_in, op);
  TORCH_CHECK(grad_loss_in.dim() == 1 && grad_loss_in.size(0) == N, op, ": grad_loss must have shape (", N,
              ",), got ", grad_loss_in.sizes());
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == N, op, ": lse must have shape (", N, ",), got ",
              lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(grad_loss_in.device() == logits_in.device() && lse_in.device() == logits_in.device(), op,
              ": grad_loss, lse and logits must be on the same device");
  const at::Tensor w = checked_weight(weight, C, logits_in, op);
  const at::Tensor logits = class_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.to(at::kFloat);  // may be an expanded (stride 0) tensor
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0) return grad;
  const float eps = static_cast<float>(label_smoothing);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "softmax_cross_entropy_backward_cpu", [&] {
    using T = scalar_t;
    {
      AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "softmax_cross_entropy_backward_cpu_target", [&] {
        backward_rows<T, index_t>(grad_loss.const_data_ptr<float>(), grad_loss.stride(0), logits.const_data_ptr<T>(),
                                  logits.stride(0), target.const_data_ptr<index_t>(), wp, lse.const_data_ptr<float>(),
                                  N, C, ignore_index, eps, grad.data_ptr<T>());
      });
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasteval, CPU, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cpu);
  m.impl("softmax_cross_entropy_backward", &softmax_cross_entropy_backward_cpu);
}

}  // namespace fasteval
