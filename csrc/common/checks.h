#pragma once
// Input checks shared by the kernels: messages are written for the user of the Python API.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace fasteval {

// User errors surface in Python as ValueError (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE), the
// same types the pure-torch reference raises; out-of-range class indices as IndexError.

// The floating dtypes the kernels read (logits, scores, hidden states): float32, bfloat16 and float16,
// dispatched by FASTEVAL_DISPATCH_LOGITS_TYPES below. Python names the same set fasteval._ops.KERNEL_DTYPES
// and sends other dtypes (float64) to the reference; test_meta checks that the two agree.
inline bool is_kernel_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

// TypeError unless `what` (e.g. "logits") has a kernel float dtype.
inline void check_kernel_float_type(at::ScalarType st, const char* what, const char* op) {
  TORCH_CHECK_TYPE(is_kernel_float_type(st), op, ": ", what, " must be float32, bfloat16 or float16, got ", st);
}

inline void check_logits_2d(const at::Tensor& logits, const char* op) {
  // C = 0 is allowed, as in torch: every target is then out of range (IndexError) or ignore_index.
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": expected logits of shape (N, C), got ", logits.dim(), " dims ",
              logits.sizes());
  check_kernel_float_type(logits.scalar_type(), "logits", op);
}

inline void check_target_1d(const at::Tensor& target, int64_t n, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must hold class indices as int64 or int32, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == n, op, ": expected target of shape (", n,
              ",) to match logits ", logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits are on ", logits.device());
}

// Returns a contiguous float32 copy of weight (or an undefined tensor).
inline at::Tensor checked_weight(const std::optional<at::Tensor>& weight, int64_t num_classes,
                                 const at::Tensor& logits, const char* op) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  const auto& w = *weight;
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == num_classes, op, ": weight must have shape (", num_classes,
              ",), got ", w.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), op, ": weight must be a floating tensor, got ",
              w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == logits.device(), op, ": weight is on ", w.device(), " but logits are on ",
              logits.device());
  return w.to(at::kFloat).contiguous();
}

// reduction as at::Reduction: 0 none, 1 mean, 2 sum.
inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
}

inline void check_label_smoothing(double eps, const char* op) {
  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 1.0, op, ": label_smoothing must be between 0.0 and 1.0, got ", eps);
}

// All checks of fasteval::softmax_cross_entropy's inputs but the weight (see checked_weight).
inline void check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& target, double label_smoothing,
                                       int64_t reduction, const char* op) {
  check_logits_2d(logits, op);
  check_target_1d(target, logits.size(0), logits, op);
  check_label_smoothing(label_smoothing, op);
  check_reduction(reduction, op);
}

// The inputs a cross-entropy backward gets beyond those of its forward: grad_loss ((N,) for reduction
// none, else 0-dim), the forward's lse (N,) of dtype lse_dtype and its 0-dim total_weight, all on the
// device of `like` (named like_name in the message).
inline void check_backward_extras(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& total_weight,
                                  const at::Tensor& like, const char* like_name, int64_t N, at::ScalarType lse_dtype,
                                  int64_t reduction, const char* op) {
  if (reduction == 0) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == N, op, ": grad_loss must have shape (", N,
                      ",) for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.dim() == 0, op, ": grad_loss must be 0-dim for reduction mean or sum, got ",
                      grad_loss.sizes());
  }
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == N, op, ": lse must have shape (", N, ",), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype, op, ": lse must be ", lse_dtype == at::kDouble ? "float64" : "float32",
                   ", got ", lse.scalar_type());
  TORCH_CHECK_VALUE(total_weight.dim() == 0, op, ": total_weight must be 0-dim, got ", total_weight.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == like.device() && lse.device() == like.device() &&
                        total_weight.device() == like.device(),
                    op, ": grad_loss, lse, total_weight and ", like_name, " must be on the same device");
}

// The same for fasteval::softmax_cross_entropy_backward: its forward's checks, then its float64 lse.
inline void check_cross_entropy_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                const at::Tensor& target, const at::Tensor& lse,
                                                const at::Tensor& total_weight, double label_smoothing,
                                                int64_t reduction, const char* op) {
  check_cross_entropy_inputs(logits, target, label_smoothing, reduction, op);
  check_backward_extras(grad_loss, lse, total_weight, logits, "logits", logits.size(0), at::kDouble, reduction, op);
}

// A state tensor of a stateful op (the evaluation and comparison updates): its dtype and shape, contiguous,
// on the device of `like` (named by like_is, e.g. "logits are").
inline void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                        const at::Tensor& like, const char* like_is, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": state ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": state ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": state ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": state ", name, " is on ", t.device(), " but ", like_is, " on ",
                    like.device());
}

// torch's IndexError for a class-index target t outside [0, C) that is not the ignore_index (None when
// the op has no ignore_index); `note` ends the message (e.g. "; the state was not changed").
[[noreturn]] inline void throw_target_out_of_bounds(const char* op, int64_t t, int64_t C,
                                                    std::optional<int64_t> ignore_index, const char* note = "") {
  TORCH_CHECK_INDEX(false, op, ": target ", t, " is out of bounds for ", C, " classes (valid targets are 0..", C - 1,
                    ignore_index.has_value() ? " or ignore_index=" + std::to_string(*ignore_index) : std::string(),
                    ")", note);
}

// Host check of P class-index targets: throws the error above for the first one outside [0, C) that is not
// the ignore_index.
template <typename I>
void check_target_values(const I* tp, int64_t P, int64_t C, std::optional<int64_t> ignore_index, const char* op,
                         const char* note = "") {
  for (int64_t i = 0; i < P; ++i) {
    const int64_t t = static_cast<int64_t>(tp[i]);
    if ((t < 0 || t >= C) && !(ignore_index.has_value() && t == *ignore_index)) {
      throw_target_out_of_bounds(op, t, C, ignore_index, note);
    }
  }
}

// Logits with unit stride along the class dimension (rows may be strided).
inline at::Tensor class_contiguous(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

}  // namespace fasteval

#include <ATen/Dispatch.h>
// Dispatches over the logits dtypes the kernels support (float32, bfloat16, float16); float64 and
// others are rejected by check_logits_2d before this point.
#define FASTEVAL_DISPATCH_LOGITS_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
