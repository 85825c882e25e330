// Autograd for fasteval::softmax_cross_entropy, in C++.
//
// A Python autograd registration (torch.library.register_autograd) costs several microseconds per call
// even when no gradient is needed, which dominates small batches (a (32, 10) loss takes ~10 us in torch
// altogether). Registered for the Autograd alias key, this serves every device backend; the backward
// goes through the dispatcher to fasteval::softmax_cross_entropy_backward, so the fake (meta)
// implementations registered in Python keep torch.compile and opcheck working.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fasteval {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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
    return {loss, lse, total_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (grads[0].defined() && ctx->needs_input_grad(0)) {
      const std::optional<at::Tensor> weight =
          saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
      grad_logits = call_backward(grads[0], saved[0], saved[1], weight, saved[3], saved[4],
                                  ctx->saved_data["ignore_index"].toInt(),
                                  ctx->saved_data["label_smoothing"].toDouble(),
                                  ctx->saved_data["reduction"].toInt());
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_autograd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
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
