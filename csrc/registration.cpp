// The one place that declares fasteval's operators. Kernels live next to their op
// (csrc/<op>/<op>_cpu.cpp, csrc/<op>/<op>_cuda.cu) and register with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fasteval._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fasteval compiled operators (registered under torch.ops.fasteval)",
      -1,       // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fasteval, m) {
  // Fused softmax cross-entropy over rows of a (N, C) logits tensor (class dim last, unit stride).
  // loss[i] = (1 - eps) * w[t_i] * (lse_i - x[i, t_i]) + eps / C * sum_c w[c] * (lse_i - x[i, c]),
  // 0 where t_i == ignore_index. Both outputs are float32 (N,). lse is 0 on ignored rows.
  m.def(
      "softmax_cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing) -> (Tensor loss, Tensor lse)");
  // Gradient of sum_i grad_loss[i] * loss[i] with respect to logits, using the saved lse.
  m.def(
      "softmax_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, int ignore_index, float label_smoothing) -> Tensor");
}
