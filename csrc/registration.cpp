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

  // ---- Confusion matrices (csrc/confusion/). Every count is int64. `invalid` is a 0-dim int64 tensor:
  // the number of samples skipped because a label was outside [0, C) (or a binary label outside {0, 1}).
  // CPU kernels raise IndexError on such samples instead (invalid is then always 0); CUDA kernels count
  // them so that no call synchronises with the host, and the Python layer checks the counter later.
  //
  // Multiclass confusion matrix, rows = true class, columns = predicted class:
  //   confmat[t, p] = #{i : target[i] = t, pred[i] = p, target[i] != ignore_index}
  // preds: integer labels with target's shape, or floating scores (N, C, d1, ...) with target
  // (N, d1, ...); then pred[i] = argmax over the class dim (first maximal index; NaN counts as the
  // maximum, as torch.argmax does), fused into the same pass.
  m.def("confusion_matrix(Tensor preds, Tensor target, int num_classes, int? ignore_index) -> "
        "(Tensor confmat, Tensor invalid)");
  // Per-class counts without a C x C matrix (huge C): counts is (3, C) int64 with rows
  //   0: tp[c] = #{t = c, p = c},  1: pred_count[c] = #{p = c},  2: target_count[c] = #{t = c}
  // over non-ignored samples; preds as for confusion_matrix.
  m.def("class_counts(Tensor preds, Tensor target, int num_classes, int? ignore_index) -> "
        "(Tensor counts, Tensor invalid)");
  // Binary / multilabel confusion matrices: preds (N, L) floating scores (positive when
  // preds > threshold, compared in float32, float64 for float64 preds) or integer 0/1 labels; target
  // (N, L) integer 0/1. confmat (L, 2, 2) = [[tn, fp], [fn, tp]] per label; elements whose target
  // equals ignore_index are skipped.
  m.def("multilabel_confusion_matrix(Tensor preds, Tensor target, float threshold, int? ignore_index) -> "
        "(Tensor confmat, Tensor invalid)");
  // Binned (multi-threshold) confusion matrices in one pass: thresholds (T,) sorted ascending, a
  // sample is predicted positive at threshold k when preds >= thresholds[k]. preds (N, L) floating;
  // target (N, L) integer 0/1 (binary / multilabel) or target (N,) class labels (one-vs-rest over the
  // L = C columns of preds). confmat (L, T, 2, 2) = [[tn, fp], [fn, tp]] per label and threshold.
  m.def("binned_confusion_matrix(Tensor preds, Tensor target, Tensor thresholds, int? ignore_index) -> "
        "(Tensor confmat, Tensor invalid)");
  // Rank of the target's score within its row of scores (N, C): the target's position in the row
  // sorted by descending score with ties in index order (torch.sort(descending=True, stable=True);
  // NaN ranks above every number, as in torch.sort and torch.argmax):
  //   rank[i] = #{j : x_j > x_t or isnan(x_j)} + #{j < t : x_j == x_t}     (x_t not NaN)
  //   rank[i] = #{j < t : isnan(x_j)}                                      (x_t NaN)
  // so rank 0 <=> argmax == target, and the target is in the top k <=> rank < k. -1 for ignored rows.
  m.def("topk_rank(Tensor scores, Tensor target, int? ignore_index) -> (Tensor rank, Tensor invalid)");
}
