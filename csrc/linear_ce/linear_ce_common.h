#pragma once
// Host-side pieces of fasteval::linear_cross_entropy (+ backward) and fasteval::linear_eval_update shared
// by the CPU and CUDA kernels: the ops' entry points (input checks, which the reference makes in the same
// order with the same exception types, then the device's kernels), their registration and the vocabulary
// chunk size.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/order.h"
#include "evaluator/eval_update_common.h"

namespace fasteval {
namespace linear_ce {

constexpr const char* kOp = "fasteval.linear_cross_entropy";
constexpr const char* kBackwardOp = "fasteval.linear_cross_entropy_backward";
constexpr const char* kEvalOp = "fasteval.linear_eval_update";

struct Sizes {
  int64_t N, H, V;
};

// input (N, H), linear_weight (V, H), linear_bias (V,) or None: dims, dtypes (float32 / bfloat16 /
// float16, all the same), sizes and devices.
inline Sizes check_linear(const at::Tensor& input, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                          const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": expected input of shape (N, H), got ", input.dim(), " dims ",
                    input.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": expected linear_weight of shape (V, H), got ", w.dim(), " dims ", w.sizes());
  const auto st = input.scalar_type();
  check_kernel_float_type(st, "input", op);
  TORCH_CHECK_TYPE(w.scalar_type() == st, op, ": linear_weight has dtype ", w.scalar_type(), " but input has ", st);
  TORCH_CHECK_VALUE(w.size(1) == input.size(1), op, ": linear_weight of shape ", w.sizes(),
                    " does not match the hidden size H = ", input.size(1), " of input ", input.sizes());
  TORCH_CHECK_VALUE(w.device() == input.device(), op, ": linear_weight is on ", w.device(), " but input is on ",
                    input.device());
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), op, ": linear_bias must have shape (", w.size(0),
                      ",), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == st, op, ": linear_bias has dtype ", b.scalar_type(), " but input has ", st);
    TORCH_CHECK_VALUE(b.device() == input.device(), op, ": linear_bias is on ", b.device(), " but input is on ",
                      input.device());
  }
  return {input.size(0), input.size(1), w.size(0)};
}

// target: (N,) int64 / int32 class indices on input's device.
inline void check_target(const at::Tensor& target, const at::Tensor& input, int64_t N, const char* op) {
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                   ": target must hold class indices as int64 or int32, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, op, ": expected target of shape (", N,
                    ",) to match input ", input.sizes(), ", got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == input.device(), op, ": target is on ", target.device(), " but input is on ",
                    input.device());
}

// Checks of the loss op (forward): the linear layer, then the cross-entropy arguments as
// fasteval::softmax_cross_entropy checks them against logits of shape (N, V). Returns the sizes.
inline Sizes check_forward(const at::Tensor& input, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const at::Tensor& target, double label_smoothing, int64_t reduction, const char* op) {
  const Sizes s = check_linear(input, w, bias, op);
  check_target(target, input, s.N, op);
  check_label_smoothing(label_smoothing, op);
  check_reduction(reduction, op);
  return s;
}

// The class weights as a float32 (V,) tensor (undefined when None), checked as in softmax_cross_entropy.
inline at::Tensor checked_class_weight(const std::optional<at::Tensor>& weight, int64_t V, const at::Tensor& input,
                                       const char* op) {
  return checked_weight(weight, V, input, op);
}

// Checks of fasteval::linear_eval_update, before any state is touched: the linear layer, the target
// (N,), then everything fasteval::eval_update checks for logits of shape (N, V).
inline Sizes check_eval_inputs(const at::Tensor& input, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const at::Tensor& target, const at::Tensor& boundaries, double label_smoothing,
                               at::IntArrayRef top_k, bool counts_only, const at::Tensor& loss_sum,
                               const at::Tensor& confmat, const at::Tensor& topk_hits, const at::Tensor& calib_count,
                               const at::Tensor& calib_conf, const at::Tensor& calib_correct, const at::Tensor& count,
                               const char* op) {
  const Sizes s = check_linear(input, w, bias, op);
  TORCH_CHECK_VALUE(s.V > 0, op, ": the number of classes V must be positive, got linear_weight of shape ",
                    w.sizes());
  check_target(target, input, s.N, op);
  evaluator::check_eval_state(input, "input is", s.V, boundaries, label_smoothing, top_k, counts_only, loss_sum,
                              confmat, topk_hits, calib_count, calib_conf, calib_correct, count, op);
  return s;
}

// The value subtracted from every logit of a row in the smoothing sum sum_c w_c (x_c - pivot): the target logit
// xt (the up-front dot product) when finite, else 0. Any pivot gives the same sum in exact arithmetic; one near
// the row's logits keeps it exact in float32 for rows far from 0 (sum_c w_c x_c would cancel against W lse).
FASTEVAL_HD float smoothing_pivot(float xt) { return order::is_finite(xt) ? xt : 0.f; }

// A counted row's loss from its state after every chunk: max m, sum s of exp(x - m), the target logit xm as
// its chunk's matmul gave it, the pivot's xt and the smoothing sum sx (see smoothing_pivot); class weight wt
// and wsum = sum_c w_c (V and 1 without weights). (1 - eps) wt (lse - xm) + eps / V (wsum lse - sum_c w_c x_c),
// each lse term taken relative (lse - xm = (m - xm) + log s, never negative, 0 for one class), so that rows
// far from 0 keep their low bits. NaN when the max is not finite (NaN, +inf, only -inf), as torch.
FASTEVAL_HD float row_loss(float m, float s, float xm, float xt, float sx, float wt, float wsum, float eps,
                           int64_t V) {
  if (!order::is_finite(m)) return order::quiet_nan();
  const float log_s = logf(s);
  float v = (1.f - eps) * (wt * ((m - xm) + log_s));
  if (eps > 0.f) v += eps / static_cast<float>(V) * (wsum * ((m - smoothing_pivot(xt)) + log_s) - sx);
  return v;
}

// The exact rank of the evaluation pass. The target's logit xt is a dot product computed up front, which may
// differ in the last bits from xm, the one its chunk's matmul gives (and the argmax reads). From the target's
// chunk on the rank is counted against xm itself; before it against xt + d, the classes within [xt - d, xt + d]
// kept in a band of kBand per row. band_half_width: d = 4 (2 + sqrt(H + 1)) u S for S = sum_h |x_h w_h| (+ |b_t|),
// the size of rounding errors that grow as a random walk (measured: at most 2.2 u S between a dot product and a
// BLAS matmul, H from 3 to 4096; the worst case is 2 gamma(H + 1) S), plus the underflow of H + 1 products; NaN
// where xt or d is not finite. The rank does not rely on it: an xm outside the band makes it fall back.
constexpr int kBand = 8;

FASTEVAL_HD float band_half_width(int64_t H, double S, float xt) {
  const double n = static_cast<double>(H + 1);
  const double d = 4.0 * (2.0 + sqrt(n)) * 5.9604644775390625e-8 * S + 2.0 * n * 1.401298464324817e-45;
  return order::is_finite(xt) && d < 3e38 ? static_cast<float>(d) : order::quiet_nan();
}

// The rank #{c != t : x_c > xm or NaN} + #{c < t : x_c == xm} from above_hi (the count above the reference of
// each chunk: xt + d before the target's chunk, xm from it on, ties before t included) and the band (nband
// classes band_c with logits band_x; banded: there were chunks before the target's). When the band failed (xm
// outside it, more near-ties than it keeps) or a target logit is NaN, the count against the dot product,
// fallback = #{c != t : x_c > xt or NaN} + #{c < t : x_c == xt}, made to agree with the argmax pred on rank 0.
FASTEVAL_HD int64_t target_rank(int64_t t, int64_t pred, float xt, float xm, float d, bool banded, int64_t nband,
                                const float* band_x, const int64_t* band_c, int64_t above_hi, int64_t fallback) {
  if (order::is_nan(xt) || order::is_nan(xm) || (banded && (nband > kBand || !(fabsf(xm - xt) <= d)))) {
    return pred == t ? 0 : (fallback > 1 ? fallback : 1);
  }
  int64_t r = above_hi;
  for (int64_t j = 0; j < nband; ++j) r += band_x[j] > xm || (band_x[j] == xm && band_c[j] < t);
  return r;
}

// Columns of the vocabulary per chunk. The chunk's logits (N x vc float32) are the workspace: about
// target_bytes (on the CPU a few MiB, so that the row pass finds them in the last-level cache right after
// the matmul wrote them; on a GPU more, so that fewer chunks amortise the host's cost of each), at least
// kMinCols columns (matmul efficiency), never more than max(64 MiB, 2% of the N x V float32 logits), never
// more than V.
inline int64_t chunk_columns(int64_t N, int64_t V, int64_t target_bytes) {
  if (V <= 0) return 1;
  const int64_t n = std::max<int64_t>(N, 1);
  const int64_t kMinCols = 256;
  const double logits_bytes = 4.0 * static_cast<double>(n) * static_cast<double>(V);
  const int64_t limit = std::max<int64_t>(int64_t(64) << 20, static_cast<int64_t>(0.02 * logits_bytes));
  int64_t vc = target_bytes / (4 * n);
  vc = vc / 64 * 64;
  vc = std::max(vc, kMinCols);
  vc = std::min(vc, limit / (4 * n));
  vc = std::max<int64_t>(vc, 1);
  vc = std::min<int64_t>(vc, int64_t(1) << 22);  // per-lane float counts of the row pass stay exact
  return std::min(vc, V);
}

// The checked arguments of each op, as a device's kernels receive them.
struct ForwardArgs {
  Sizes sz;
  const at::Tensor& input;
  const at::Tensor& linear_weight;
  const std::optional<at::Tensor>& linear_bias;
  const at::Tensor& target;
  at::Tensor class_weight;  // float32 (V,); undefined for None
  int64_t ignore_index;
  float label_smoothing;
  int64_t reduction;
};

struct BackwardArgs : ForwardArgs {
  const at::Tensor& grad_loss;
  const at::Tensor& lse;
  const at::Tensor& total_weight;
  bool round_grad;  // dL rounded to input's dtype before the matmuls that apply it
};

struct EvalArgs {
  Sizes sz;
  const at::Tensor& input;
  const at::Tensor& linear_weight;
  const std::optional<at::Tensor>& linear_bias;
  const at::Tensor& target;
  const at::Tensor& boundaries;
  std::optional<int64_t> ignore_index;
  float label_smoothing;
  at::IntArrayRef top_k;
  bool counts_only;
  evaluator::State state;
};

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The kernels of device D, each given the checked arguments: linear_ce_cpu.cpp and linear_ce_cuda.cu
// define Kernels<at::kCPU> and Kernels<at::kCUDA>.
template <c10::DeviceType D>
struct Kernels {
  static Tensor3 forward(const ForwardArgs& a);    // (loss, lse, total_weight)
  static Tensor3 backward(const BackwardArgs& a);  // (grad_input, grad_linear_weight, grad_linear_bias)
  static void eval_update(const EvalArgs& a);      // adds the batch to the state tensors
};

// The three ops as registered, one definition for every device: the checks, then the device's
// K::forward / backward / eval_update (K = Kernels<device>). The kernels run without
// autograd: their matmuls write into workspaces (out= variants), and the ops' autograd formula is
// registered separately.
template <class K>
struct Entry {
  static Tensor3 forward(const at::Tensor& input, const at::Tensor& linear_weight,
                         const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                         int64_t reduction, bool /*round_grad: the backward's*/) {
    const Sizes sz = check_forward(input, linear_weight, linear_bias, target, label_smoothing, reduction, kOp);
    at::Tensor cw = checked_class_weight(weight, sz.V, input, kOp);
    const at::NoGradGuard no_grad;
    Tensor3 out = K::forward({sz, input, linear_weight, linear_bias, target, std::move(cw), ignore_index,
                              static_cast<float>(label_smoothing), reduction});
    // No classes (every row ignored, or a bad target): torch's smoothing term is eps / V * (a sum of no
    // terms) = NaN on every row, ignored or not.
    if (sz.V == 0 && label_smoothing > 0) std::get<0>(out).fill_(std::numeric_limits<float>::quiet_NaN());
    return out;
  }

  static Tensor3 backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& linear_weight,
                          const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                          const at::Tensor& total_weight, int64_t ignore_index, double label_smoothing,
                          int64_t reduction, bool round_grad) {
    const char* op = kBackwardOp;
    const Sizes sz = check_forward(input, linear_weight, linear_bias, target, label_smoothing, reduction, op);
    at::Tensor cw = checked_class_weight(weight, sz.V, input, op);
    check_backward_extras(grad_loss, lse, total_weight, input, "input", sz.N, at::kDouble, reduction, op);
    const at::NoGradGuard no_grad;
    return K::backward({{sz, input, linear_weight, linear_bias, target, std::move(cw), ignore_index,
                         static_cast<float>(label_smoothing), reduction},
                        grad_loss,
                        lse,
                        total_weight,
                        round_grad});
  }

  static void eval_update(const at::Tensor& input, const at::Tensor& linear_weight,
                          const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                          const at::Tensor& boundaries, std::optional<int64_t> ignore_index, double label_smoothing,
                          at::IntArrayRef top_k, bool counts_only, const at::Tensor& loss_sum,
                          const at::Tensor& confmat, const at::Tensor& topk_hits, const at::Tensor& calib_count,
                          const at::Tensor& calib_conf, const at::Tensor& calib_correct, const at::Tensor& count) {
    const Sizes sz = check_eval_inputs(input, linear_weight, linear_bias, target, boundaries, label_smoothing, top_k,
                                       counts_only, loss_sum, confmat, topk_hits, calib_count, calib_conf,
                                       calib_correct, count, kEvalOp);
    const at::NoGradGuard no_grad;
    K::eval_update({sz, input, linear_weight, linear_bias, target, boundaries, ignore_index,
                    static_cast<float>(label_smoothing), top_k, counts_only,
                    {loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count}});
  }
};

template <class K>
void register_ops(torch::Library& m) {
  m.impl("linear_cross_entropy", &Entry<K>::forward);
  m.impl("linear_cross_entropy_backward", &Entry<K>::backward);
  m.impl("linear_eval_update", &Entry<K>::eval_update);
}

}  // namespace linear_ce
}  // namespace fasteval
