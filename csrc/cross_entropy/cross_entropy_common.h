#pragma once
// The entry points of fasteval::softmax_cross_entropy and its backward, shared by the CPU and CUDA kernels:
// the checks (common/checks.h; the reference makes the same ones in the same order), then the device's
// kernel with the checked arguments.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace fasteval {
namespace cross_entropy {

constexpr const char* kOp = "fasteval.softmax_cross_entropy";
constexpr const char* kBackwardOp = "fasteval.softmax_cross_entropy_backward";

// The checked arguments of the forward, as a device's kernel receives them.
struct ForwardArgs {
  const at::Tensor& logits;  // (N, C)
  const at::Tensor& target;  // (N,)
  at::Tensor weight;         // float32 (C,) contiguous; undefined for None
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
};

struct BackwardArgs : ForwardArgs {
  const at::Tensor& grad_loss;
  const at::Tensor& lse;
  const at::Tensor& total_weight;
};

// The kernels of device D: cross_entropy_cpu.cpp and cross_entropy_cuda.cu define Kernels<at::kCPU> and
// Kernels<at::kCUDA>.
template <c10::DeviceType D>
struct Kernels {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const ForwardArgs& args);  // (loss, lse, total_weight)
  static at::Tensor backward(const BackwardArgs& args);                                   // grad_logits
};

// The two ops as registered, one definition for every device: the checks, then the kernel of device
// K = Kernels<device>.
template <class K>
struct Entry {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                int64_t ignore_index, double label_smoothing,
                                                                int64_t reduction) {
    check_cross_entropy_inputs(logits, target, label_smoothing, reduction, kOp);
    return K::forward({logits, target, checked_weight(weight, logits.size(1), logits, kOp), ignore_index,
                       label_smoothing, reduction});
  }

  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                             const at::Tensor& total_weight, int64_t ignore_index, double label_smoothing,
                             int64_t reduction) {
    check_cross_entropy_backward_inputs(grad_loss, logits, target, lse, total_weight, label_smoothing, reduction,
                                        kBackwardOp);
    return K::backward({{logits, target, checked_weight(weight, logits.size(1), logits, kBackwardOp), ignore_index,
                         label_smoothing, reduction},
                        grad_loss,
                        lse,
                        total_weight});
  }
};

template <class K>
void register_ops(torch::Library& m) {
  m.impl("softmax_cross_entropy", &Entry<K>::forward);
  m.impl("softmax_cross_entropy_backward", &Entry<K>::backward);
}

}  // namespace cross_entropy
}  // namespace fasteval
