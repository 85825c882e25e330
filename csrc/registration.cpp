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

  // Fused evaluation update: ONE read of each row of the logits, nothing of size N x C materialised.
  // logits: (N, C) with unit class stride, or (N, C, S) (the flattened (N, C, d1, ...) layout, class
  // stride S). A position is a row (or an (n, s) pair). target: (N,) or (N, S), int64 / int32.
  // A target outside [0, C) other than ignore_index rejects the whole batch, nothing else is mutated:
  // the CPU kernel raises IndexError; the CUDA kernel (which cannot raise without a host sync) adds the
  // number of such targets to count[1] instead, and the Python API raises when it next reads the state.
  // For every valid position (target != ignore_index) with t = target, x = its C logits,
  // lse = log sum_c exp(x_c):
  //   loss_sum[0]      += (1 - eps) * (lse - x_t) + eps / C * sum_c (lse - x_c)     (fp32 per row,
  //                        fp64 sum; eps = label_smoothing)
  //   p                 = argmax_c x_c (first maximal index; a NaN counts as the maximum, as torch.argmax)
  //   confmat[t, p]    += 1                       when counts_only is false; confmat is (C, C) int64
  //   confmat[:, .]    += (tp, pred, target)      when counts_only is true; confmat is (3, C) int64:
  //                        confmat[0, t] += (p == t), confmat[1, p] += 1, confmat[2, t] += 1
  //   r                 = #{c : x_c > x_t} + #{c < t : x_c == x_t}  (rank of the target; NaN above all)
  //   topk_hits[j]     += (r < top_k[j])                              topk_hits: (len(top_k),) int64
  //   conf              = max_c softmax(x)_c = 1 / sum_c exp(x_c - max x)
  //   b                 = bucketize(conf, calib_boundaries, right=True) - 1  (B+1 float32 boundaries,
  //                        0 = b_0 < ... < b_B = 1; b == B only for conf == 1); skipped if conf is NaN
  //   calib_count[b]   += 1, calib_conf[b] += conf, calib_correct[b] += (p == t)   ((B+1,) int64 /
  //                        float64 / int64)
  //   count[0]         += 1                                            count: (2,) int64
  m.def(
      "eval_update(Tensor logits, Tensor target, Tensor calib_boundaries, int ignore_index, "
      "float label_smoothing, int[] top_k, bool counts_only, Tensor(a!) loss_sum, Tensor(b!) confmat, "
      "Tensor(c!) topk_hits, Tensor(d!) calib_count, Tensor(e!) calib_conf, Tensor(f!) calib_correct, "
      "Tensor(g!) count) -> ()");
}
