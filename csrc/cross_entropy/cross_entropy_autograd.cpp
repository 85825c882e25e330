// Autograd for fasteval::softmax_cross_entropy, in C++.
//
// A Python autograd registration (torch.library.register_autograd) costs several microseconds per call
// even when no gradient is needed, which dominates small batches (a (32, 10) loss takes ~10 us in torch
// altogether). Registered for the Autograd alias key, this serves every device backend; the backward
// goes through the dispatcher to fasteval::softmax_cross_entropy_backward, so the fake (meta)
// implementations registered in Python keep torch.compile and opcheck working.
//
// Three routes, chosen per call:
//  - no graph to record (grad mode off, or logits do not require grad) and no forward-mode tangent:
//    the kernel, nothing else (the fast path; one flag test and two null checks more than the kernel);
//  - a graph to record: the SoftmaxCrossEntropy node below. Its backward calls the backward kernel,
//    unless it runs with grad mode on (backward(create_graph=True), torch.func.grad, a gradient
//    penalty): then it computes the same gradient with differentiable ATen ops, so that second
//    derivatives (double backward, Hessians) are exact instead of silently zero;
//  - a forward-mode tangent on the logits (torch.autograd.forward_ad), or logits wrapped by a torch.func
//    transform (grad, vjp, jacrev, jvp, jacfwd, hessian: a C++ autograd::Function cannot run under
//    them): the loss is computed with differentiable ATen ops (log_softmax, gather), whose forward- and
//    reverse-mode derivatives of any order torch provides. The result is the kernel's up to float32
//    rounding.
// As for torch's F.cross_entropy, the loss is not differentiable with respect to the class weights: a
// weight that requires grad (with grad mode on) or carries a tangent raises a RuntimeError.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/one_hot.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "common/checks.h"

namespace fasteval {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "fasteval.softmax_cross_entropy";

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& logits, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            int64_t ignore_index, double label_smoothing,
                                                            int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasteval::softmax_cross_entropy", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double,
                           int64_t)>();
  return op.call(logits, target, weight, ignore_index, label_smoothing, reduction);
}

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                         const at::Tensor& total_weight, int64_t ignore_index, double label_smoothing,
                         int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasteval::softmax_cross_entropy_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                         int64_t, double, int64_t)>();
  return op.call(grad_loss, logits, target, weight, lse, total_weight, ignore_index, label_smoothing, reduction);
}

// ---------------------------------------------------------------------------------------------------
// Differentiable ATen formulations (the routes that need derivatives beyond the first reverse one).

// Row masks of the targets: valid = counted rows (not ignore_index, in [0, C)); bad = out-of-range
// targets other than ignore_index, whose rows are NaN. With `check`, a bad target raises IndexError on the
// CPU, as the kernel does (on other devices raising would need a host synchronisation).
struct TargetMasks {
  at::Tensor valid, bad, safe;  // safe: the target where valid, else 0 (int64)
};

TargetMasks target_masks(const at::Tensor& target_any, int64_t C, int64_t ignore_index, const char* op,
                         bool check) {
  // In int64: an ignore_index outside the target dtype's range must match nothing, not its wrapped value.
  const at::Tensor target = target_any.to(at::kLong);
  const at::Tensor counted = target.ne(ignore_index);
  const at::Tensor bad = counted.logical_and(target.lt(0).logical_or(target.ge(C)));
  if (check && target.is_cpu()) {
    // Reading the data is a host operation: fine under torch.func.grad / jvp, impossible when the
    // targets are batched by torch.func.vmap (which rejects data-dependent control flow): bad rows are
    // NaN there, as on CUDA.
    bool any_bad = false;
    try {
      any_bad = bad.any().item<bool>();
    } catch (const c10::Error& e) {
      if (std::string(e.what()).find("vmap") == std::string::npos) throw;
    }
    if (any_bad) {
      const int64_t t = target.masked_select(bad)[0].item<int64_t>();
      throw_target_out_of_bounds(op, t, C, ignore_index);
    }
  }
  const at::Tensor valid = counted.logical_and(bad.logical_not());
  const at::Tensor safe = at::where(valid, target, at::zeros({}, target.options()));
  return {valid, bad, safe};
}

at::Tensor scalar_like(double v, const at::Tensor& like) { return at::scalar_tensor(v, like.options()); }

// The op's three results with ATen ops, differentiable (forward and reverse mode, any order) with
// respect to the logits. Computed in float32, as the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_forward(const at::Tensor& logits,
                                                                      const at::Tensor& target,
                                                                      const at::Tensor& w, int64_t ignore_index,
                                                                      double eps, int64_t reduction) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::Tensor x = logits.to(at::kFloat);
  const TargetMasks m = target_masks(target, C, ignore_index, kOp, /*check=*/true);
  const at::Tensor zero = scalar_like(0.0, x);
  const at::Tensor nan = scalar_like(std::numeric_limits<double>::quiet_NaN(), x);
  at::Tensor loss, lse, wt;
  if (C == 0) {  // every row is ignored (a counted row raised above or is NaN)
    loss = x.sum(1);
    lse = at::zeros({N}, x.options().dtype(at::kDouble));
    wt = at::zeros({N}, x.options());
  } else {
    // Rows that do not count are not used at all: their gradient is exactly 0 as in the kernels, even where
    // their logits are NaN / inf; their weight is 0 (never w[0] times a zero gradient: 0 * inf is NaN).
    const at::Tensor logp = at::log_softmax(at::where(m.valid.unsqueeze(1), x, zero), 1);
    const at::Tensor nll = logp.gather(1, m.safe.unsqueeze(1)).squeeze(1).neg();
    wt = at::where(m.valid, w.defined() ? w.index_select(0, m.safe) : at::ones({N}, x.options()), zero);
    loss = nll.mul(wt).mul(1.0 - eps);
    if (eps > 0) {
      const at::Tensor smooth = (w.defined() ? logp.mul(w.unsqueeze(0)) : logp).sum(1).neg();
      loss = loss.add(smooth.mul(eps / static_cast<double>(C)));
    }
    // lse in float64, NaN where the row max is not finite (as the kernel and torch's log_softmax).
    const at::Tensor xd = x.detach().to(at::kDouble);
    const at::Tensor nan64 = scalar_like(std::numeric_limits<double>::quiet_NaN(), xd);
    lse = at::where(xd.amax(1).isfinite(), at::logsumexp(xd, {1}), nan64);
  }
  loss = at::where(m.valid, loss, at::where(m.bad, nan, zero));
  lse = at::where(m.valid, lse, at::where(m.bad, scalar_like(std::numeric_limits<double>::quiet_NaN(), lse),
                                          scalar_like(0.0, lse)));
  const at::Tensor total_weight = wt.detach().sum();
  if (reduction == 1) {
    loss = loss.sum().div(total_weight);
    // A zero total weight with smoothing: torch's (1 - eps) * (0 / 0) + (eps / C) * (s / 0) is NaN, not s / 0.
    if (eps > 0) loss = at::where(total_weight.eq(0), scalar_like(std::numeric_limits<double>::quiet_NaN(), loss), loss);
  } else if (reduction == 2) {
    loss = loss.sum();
  }
  // No classes: as torch, eps / C * (a sum of no terms) = NaN, even in a reduction of no rows.
  if (C == 0 && eps > 0) loss = loss.add(std::numeric_limits<double>::quiet_NaN());
  return {loss, lse, total_weight};
}

// d <grad_loss, loss> / d logits with ATen ops (differentiable again, in grad_loss and logits):
//   grad_c = g ((1 - eps) w_t + eps W / C) softmax(x)_c - g eps / C w_c - [c == t] g (1 - eps) w_t,
// 0 on ignored rows; g = grad_loss (per row, / total_weight for the mean). The same formula as the
// backward kernel; returned in logits' dtype.
at::Tensor differentiable_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& w, const at::Tensor& total_weight, int64_t ignore_index,
                                   double eps, int64_t reduction) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (C == 0) return at::zeros({N, 0}, logits.options());
  const at::Tensor x = logits.to(at::kFloat);
  const TargetMasks m = target_masks(target, C, ignore_index, kOp, /*check=*/false);  // checked by the forward
  at::Tensor g = grad_loss.to(at::kFloat);
  if (reduction == 1) g = g.div(total_weight);
  if (reduction != 0) g = g.expand({N});
  g = at::where(m.valid, g, scalar_like(0.0, g));
  const at::Tensor zero = scalar_like(0.0, x);
  const at::Tensor wt =
      at::where(m.valid, w.defined() ? w.index_select(0, m.safe) : at::ones({N}, x.options()), zero);
  const at::Tensor p = at::softmax(at::where(m.valid.unsqueeze(1), x, zero), 1);
  at::Tensor coef_p = wt.mul(1.0 - eps);
  if (eps > 0) {  // the other classes' weights only enter with label smoothing (W = sum_c w_c)
    const at::Tensor W = w.defined() ? w.sum() : scalar_like(static_cast<double>(C), x);
    coef_p = coef_p.add(W.mul(eps / static_cast<double>(C)));
  }
  at::Tensor grad = p.mul(g.mul(coef_p).unsqueeze(1));
  if (eps > 0) {
    const at::Tensor ge = g.mul(eps / static_cast<double>(C)).unsqueeze(1);
    grad = grad.sub(w.defined() ? ge.mul(w.unsqueeze(0)) : ge);
  }
  const at::Tensor onehot = at::one_hot(m.safe, C).to(at::kFloat);
  grad = grad.sub(onehot.mul(g.mul(wt).mul(1.0 - eps).unsqueeze(1)));
  grad = at::where(m.valid.unsqueeze(1), grad, scalar_like(0.0, grad));
  return grad.to(logits.scalar_type());
}

[[noreturn]] void weight_not_differentiable() {
  TORCH_CHECK(false, kOp, " is not differentiable with respect to argument 'weight' (as torch's "
              "F.cross_entropy): this input cannot have requires_grad=True or a forward-mode tangent; detach it");
}

class SoftmaxCrossEntropy : public torch::autograd::Function<SoftmaxCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index,
                               double label_smoothing, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, total_weight] = call_forward(logits, target, weight, ignore_index, label_smoothing, reduction);
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), lse, total_weight});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({lse, total_weight});
    // lse and total_weight never receive a gradient: without this, autograd would hand backward() a
    // zero-filled tensor for each (an allocation and a fill kernel per backward, 2 of a small shape's 6
    // CUDA launches).
    ctx->set_materialize_grads(false);
    return {loss, lse, total_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (grads[0].defined() && ctx->needs_input_grad(0)) {
      const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
      const double eps = ctx->saved_data["label_smoothing"].toDouble();
      const int64_t reduction = ctx->saved_data["reduction"].toInt();
      if (at::GradMode::is_enabled()) {
        // create_graph: the gradient itself must be differentiable (double backward).
        grad_logits = differentiable_backward(grads[0], saved[0], saved[1], saved[2], saved[4], ignore_index, eps,
                                              reduction);
      } else {
        const std::optional<at::Tensor> weight =
            saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
        grad_logits = call_backward(grads[0], saved[0], saved[1], weight, saved[3], saved[4], ignore_index, eps,
                                    reduction);
      }
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_autograd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  const bool has_weight = weight.has_value() && weight->defined();
  // A forward-mode tangent (torch.autograd.forward_ad), or a torch.func transform (grad, vjp, jvp,
  // jacrev, jacfwd, hessian wrap their inputs; a C++ autograd::Function cannot run under them).
  const bool differentiable_route = logits._fw_grad(/*level=*/0).defined() ||
                                    logits.key_set().has(c10::DispatchKey::FuncTorchGradWrapper);
  if (has_weight && weight->_fw_grad(/*level=*/0).defined()) weight_not_differentiable();
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && has_weight && weight->requires_grad()) weight_not_differentiable();
  if (C10_UNLIKELY(differentiable_route)) {
    check_cross_entropy_inputs(logits, target, label_smoothing, reduction, kOp);
    const at::Tensor w = checked_weight(weight, logits.size(1), logits, kOp);
    return differentiable_forward(logits, target, w, ignore_index, label_smoothing, reduction);
  }
  if (!grad_mode || !logits.requires_grad()) {
    // No graph to record: skip the autograd node and its saved state.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(logits, target, weight, ignore_index, label_smoothing, reduction);
  }
  auto out = SoftmaxCrossEntropy::apply(logits, target, weight, ignore_index, label_smoothing, reduction);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasteval, Autograd, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_autograd);
}

}  // namespace fasteval
