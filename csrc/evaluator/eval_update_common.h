#pragma once
// Host-side pieces of fasteval::eval_update shared by the CPU and CUDA kernels: input and state checks
// (with messages for the user of ClassificationEvaluator) and the configuration passed to the kernels.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "common/checks.h"

namespace fasteval {
namespace evaluator {

constexpr const char* kOp = "fasteval.eval_update";

struct Config {
  bool has_ignore;             // whether ignore_index is given
  int64_t ignore_index;        // meaningful only when has_ignore
  float eps;                   // label smoothing
  std::vector<int64_t> top_k;  // k of each top-k counter
  const float* boundaries;     // calibration bin edges (num_bins of them)
  int64_t num_bins;            // = number of boundaries (B + 1 bins: the last holds confidence == 1)
};

struct Shapes {
  int64_t N, C, S, positions;
};

inline void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                        const at::Tensor& logits) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": state ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, kOp, ": state ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": state ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == logits.device(), kOp, ": state ", name, " is on ", t.device(), " but logits are on ",
              logits.device());
}

// Checks everything but the target values; returns the sizes. Throws before any state is touched.
inline Shapes check_inputs(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& boundaries,
                           double label_smoothing, at::IntArrayRef top_k, bool counts_only,
                           const at::Tensor& loss_sum, const at::Tensor& confmat, const at::Tensor& topk_hits,
                           const at::Tensor& calib_count, const at::Tensor& calib_conf,
                           const at::Tensor& calib_correct, const at::Tensor& count, at::DeviceType device) {
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, kOp, ": expected logits of shape (N, C) or (N, C, S), got ",
              logits.sizes());
  TORCH_INTERNAL_ASSERT(logits.device().type() == device);
  const auto st = logits.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kOp,
              ": logits must be float32, bfloat16 or float16, got ", st);
  Shapes s;
  s.N = logits.size(0);
  s.C = logits.size(1);
  s.S = logits.dim() == 3 ? logits.size(2) : 1;
  s.positions = s.N * s.S;
  TORCH_CHECK_VALUE(s.C > 0, kOp, ": the number of classes C must be positive, got logits of shape ", logits.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, kOp,
              ": target must hold class indices as int64 or int32, got ", target.scalar_type());
  if (logits.dim() == 2) {
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == s.N, kOp, ": expected target of shape (", s.N,
                ",) to match logits ", logits.sizes(), ", got ", target.sizes());
  } else {
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == s.N && target.size(1) == s.S, kOp, ": expected target of shape (",
                s.N, ", ", s.S, ") to match logits ", logits.sizes(), ", got ", target.sizes());
  }
  TORCH_CHECK_VALUE(target.device() == logits.device(), kOp, ": target is on ", target.device(), " but logits are on ",
              logits.device());
  check_label_smoothing(label_smoothing, kOp);
  for (int64_t k : top_k) TORCH_CHECK_VALUE(k >= 1, kOp, ": every top_k must be >= 1, got ", top_k);
  TORCH_CHECK_TYPE(boundaries.scalar_type() == at::kFloat, kOp, ": calib_boundaries must be float32, got ",
                   boundaries.scalar_type());
  TORCH_CHECK_VALUE(boundaries.dim() == 1 && boundaries.numel() >= 2, kOp,
                    ": calib_boundaries must be a 1-D tensor of at least 2 edges, got shape ", boundaries.sizes());
  TORCH_CHECK_VALUE(boundaries.device() == logits.device(), kOp, ": calib_boundaries is on ", boundaries.device(),
              " but logits are on ", logits.device());
  const int64_t nb = boundaries.numel();
  const int64_t K = static_cast<int64_t>(top_k.size());
  check_state(loss_sum, "loss_sum", at::kDouble, {1}, logits);
  if (counts_only) {
    check_state(confmat, "confmat (per-class counts)", at::kLong, {3, s.C}, logits);
  } else {
    check_state(confmat, "confmat", at::kLong, {s.C, s.C}, logits);
  }
  check_state(topk_hits, "topk_hits", at::kLong, {K}, logits);
  check_state(calib_count, "calib_count", at::kLong, {nb}, logits);
  check_state(calib_conf, "calib_conf", at::kDouble, {nb}, logits);
  check_state(calib_correct, "calib_correct", at::kLong, {nb}, logits);
  check_state(count, "count", at::kLong, {2}, logits);
  return s;
}

// The logits as the kernels read them: (N, C) with unit class stride, or (N, C, S) read in place when its
// trailing (C, S) block is contiguous (a copy otherwise).
inline at::Tensor kernel_layout(const at::Tensor& logits) {
  if (logits.dim() == 2) return class_contiguous(logits);
  if (logits.stride(2) == 1 && logits.stride(1) == logits.size(2)) return logits;
  return logits.contiguous();
}

}  // namespace evaluator
}  // namespace fasteval
