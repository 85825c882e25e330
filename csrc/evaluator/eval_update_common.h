#pragma once
// Host-side pieces of fasteval::eval_update shared by the CPU and CUDA kernels: input and state checks
// (with messages for the user of ClassificationEvaluator) and the configuration passed to the kernels.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/host_device.h"

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

// The checks both evaluation ops (eval_update, linear_eval_update) make once their inputs' shapes are known:
// label smoothing, top_k, the calibration boundaries and the state for C classes, on the device of `like`.
inline void check_eval_state(const at::Tensor& like, const char* like_is, int64_t C, const at::Tensor& boundaries,
                             double label_smoothing, at::IntArrayRef top_k, bool counts_only,
                             const at::Tensor& loss_sum, const at::Tensor& confmat, const at::Tensor& topk_hits,
                             const at::Tensor& calib_count, const at::Tensor& calib_conf,
                             const at::Tensor& calib_correct, const at::Tensor& count, const char* op) {
  check_label_smoothing(label_smoothing, op);
  for (int64_t k : top_k) TORCH_CHECK_VALUE(k >= 1, op, ": every top_k must be >= 1, got ", top_k);
  TORCH_CHECK_TYPE(boundaries.scalar_type() == at::kFloat, op, ": calib_boundaries must be float32, got ",
                   boundaries.scalar_type());
  TORCH_CHECK_VALUE(boundaries.dim() == 1 && boundaries.numel() >= 2, op,
                    ": calib_boundaries must be a 1-D tensor of at least 2 edges, got shape ", boundaries.sizes());
  TORCH_CHECK_VALUE(boundaries.device() == like.device(), op, ": calib_boundaries is on ", boundaries.device(), " but ",
                    like_is, " on ", like.device());
  const int64_t nb = boundaries.numel();
  const int64_t K = static_cast<int64_t>(top_k.size());
  check_state(loss_sum, "loss_sum", at::kDouble, {1}, like, like_is, op);
  if (counts_only) {
    check_state(confmat, "confmat (per-class counts)", at::kLong, {3, C}, like, like_is, op);
  } else {
    check_state(confmat, "confmat", at::kLong, {C, C}, like, like_is, op);
  }
  check_state(topk_hits, "topk_hits", at::kLong, {K}, like, like_is, op);
  check_state(calib_count, "calib_count", at::kLong, {nb}, like, like_is, op);
  check_state(calib_conf, "calib_conf", at::kDouble, {nb}, like, like_is, op);
  check_state(calib_correct, "calib_correct", at::kLong, {nb}, like, like_is, op);
  check_state(count, "count", at::kLong, {2}, like, like_is, op);
}

// The calibration bin of a defined confidence: bucketize(conf, boundaries, right=True) - 1 (the number of
// boundaries <= conf, minus one, as std::upper_bound counts them), clamped to [0, nb - 1].
FASTEVAL_HD int64_t calib_bin(const float* bnd, int64_t nb, float conf) {
  int64_t first = 0, n = nb;
  while (n > 0) {
    const int64_t half = n >> 1;
    if (!(conf < bnd[first + half])) {
      first += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  const int64_t b = first - 1;
  return b < 0 ? 0 : (b > nb - 1 ? nb - 1 : b);
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
  check_kernel_float_type(logits.scalar_type(), "logits", kOp);
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
  check_eval_state(logits, "logits are", s.C, boundaries, label_smoothing, top_k, counts_only, loss_sum, confmat,
                   topk_hits, calib_count, calib_conf, calib_correct, count, kOp);
  return s;
}

// The logits as the kernels read them: (N, C) with unit class stride, or (N, C, S) read in place when its
// trailing (C, S) block is contiguous (a copy otherwise).
inline at::Tensor kernel_layout(const at::Tensor& logits) {
  if (logits.dim() == 2) return class_contiguous(logits);
  if (logits.stride(2) == 1 && logits.stride(1) == logits.size(2)) return logits;
  return logits.contiguous();
}

// The state tensors an evaluation update adds to (eval_update and linear_eval_update alike).
struct State {
  const at::Tensor& loss_sum;
  const at::Tensor& confmat;
  const at::Tensor& topk_hits;
  const at::Tensor& calib_count;
  const at::Tensor& calib_conf;
  const at::Tensor& calib_correct;
  const at::Tensor& count;
};

// The checked arguments of eval_update, as a device's kernel receives them.
struct UpdateArgs {
  Shapes sh;
  const at::Tensor& logits;
  const at::Tensor& target;
  const at::Tensor& boundaries;
  std::optional<int64_t> ignore_index;
  double label_smoothing;
  at::IntArrayRef top_k;
  bool counts_only;
  State state;
};

// The kernel of device D: eval_update_cpu.cpp and eval_update_cuda.cu define Kernels<at::kCPU> and
// Kernels<at::kCUDA>.
template <c10::DeviceType D>
struct Kernels {
  static constexpr c10::DeviceType kDevice = D;
  static void update(const UpdateArgs& args);
};

// eval_update as registered, one definition for every device: the checks, then the kernel of device
// K = Kernels<device>.
template <class K>
void update(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& boundaries,
            std::optional<int64_t> ignore_index, double label_smoothing, at::IntArrayRef top_k, bool counts_only,
            const at::Tensor& loss_sum, const at::Tensor& confmat, const at::Tensor& topk_hits,
            const at::Tensor& calib_count, const at::Tensor& calib_conf, const at::Tensor& calib_correct,
            const at::Tensor& count) {
  const Shapes sh = check_inputs(logits, target, boundaries, label_smoothing, top_k, counts_only, loss_sum, confmat,
                                 topk_hits, calib_count, calib_conf, calib_correct, count, K::kDevice);
  K::update({sh, logits, target, boundaries, ignore_index, label_smoothing, top_k, counts_only,
             {loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count}});
}

template <class K>
void register_ops(torch::Library& m) {
  m.impl("eval_update", &update<K>);
}

}  // namespace evaluator
}  // namespace fasteval
