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
  // Per row, with t = target[i], eps = label_smoothing, w the class weights (ones if None):
  //   l_i = (1 - eps) * w[t] * (lse_i - x[i, t]) + eps / C * sum_c w[c] * (lse_i - x[i, c]),
  // 0 where t == ignore_index. reduction (at::Reduction): 0 none -> loss = l (N,); 1 mean -> loss =
  // sum_i l_i / total_weight; 2 sum -> loss = sum_i l_i (0-dim). total_weight = sum of w[t] over the
  // non-ignored rows (their count without weights), 0-dim. lse (N,) is 0 on ignored rows. All float32.
  m.def(
      "softmax_cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor loss, Tensor lse, Tensor total_weight)");
  // Gradient with respect to logits of <grad_loss, loss> using the saved lse and total_weight;
  // grad_loss has loss's shape. Returned in logits' dtype, (N, C) contiguous.
  m.def(
      "softmax_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, int ignore_index, float label_smoothing, int reduction) -> Tensor");
}
