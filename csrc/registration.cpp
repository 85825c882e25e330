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
  // non-ignored rows (their count without weights), 0-dim; loss and total_weight float32. lse (N,) =
  // max_c x[i, c] + log sum_c exp(x[i, c] - max) in float64 (so that the backward's exp(x - lse) is exact
  // for logits of any magnitude), 0 on ignored rows.
  m.def(
      "softmax_cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor loss, Tensor lse, Tensor total_weight)");
  // Gradient with respect to logits of <grad_loss, loss> using the saved lse and total_weight;
  // grad_loss has loss's shape. Returned in logits' dtype, (N, C) contiguous.
  m.def(
      "softmax_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, int ignore_index, float label_smoothing, int reduction) -> Tensor");

  // Fused evaluation update: ONE read of each row of the logits, nothing of size N x C materialised.
  // logits: (N, C) with unit class stride, or (N, C, S) (the flattened (N, C, d1, ...) layout, class
  // stride S). A position is a row (or an (n, s) pair). target: (N,) or (N, S), int64 / int32.
  // ignore_index: None (every target counts) or the target value of positions that count nowhere.
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
      "eval_update(Tensor logits, Tensor target, Tensor calib_boundaries, int? ignore_index, "
      "float label_smoothing, int[] top_k, bool counts_only, Tensor(a!) loss_sum, Tensor(b!) confmat, "
      "Tensor(c!) topk_hits, Tensor(d!) calib_count, Tensor(e!) calib_conf, Tensor(f!) calib_correct, "
      "Tensor(g!) count) -> ()");

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
  // Binned (multi-threshold) confusion matrices in one pass: thresholds (T,) floating, in any order
  // (duplicates allowed); counts are returned in the order given. A sample is predicted positive at
  // threshold k when preds >= thresholds[k], compared in float32 (float64 for float64 preds; the
  // thresholds are rounded to nearest first); never for a NaN threshold or a NaN score, as torch's >=.
  // preds (N, L) floating; target (N, L) integer 0/1 (binary / multilabel) or target (N,) class labels
  // (one-vs-rest over the L = C columns of preds). confmat (L, T, 2, 2) = [[tn, fp], [fn, tp]] per label
  // and threshold.
  m.def("binned_confusion_matrix(Tensor preds, Tensor target, Tensor thresholds, int? ignore_index) -> "
        "(Tensor confmat, Tensor invalid)");
  // Rank of the target's score within its row of scores (N, C): the target's position in the row
  // sorted by descending score with ties in index order (torch.sort(descending=True, stable=True);
  // NaN ranks above every number, as in torch.sort and torch.argmax):
  //   rank[i] = #{j : x_j > x_t or isnan(x_j)} + #{j < t : x_j == x_t}     (x_t not NaN)
  //   rank[i] = #{j < t : isnan(x_j)}                                      (x_t NaN)
  // so rank 0 <=> argmax == target, and the target is in the top k <=> rank < k. -1 for ignored rows.
  m.def("topk_rank(Tensor scores, Tensor target, int? ignore_index) -> (Tensor rank, Tensor invalid)");

  // ---- Logit comparison (csrc/compare/): a reference model's logits a against a candidate's b.
  // reference (a) and candidate (b): (N, C) with unit class stride, or (N, C, S) (class stride S), the
  // same shape; float32 / bfloat16 / float16 each (they may differ). A position is a row (or (n, s)).
  // target: None or (N,) / (N, S) int64 / int32; positions whose target == ignore_index count nowhere.
  // A target outside [0, C) other than ignore_index rejects the whole batch: the CPU kernel raises
  // IndexError before any write; the CUDA kernel adds the number of such targets to counts[6] and
  // changes nothing else (the Python API raises when it next reads the state).
  // For every counted position, in nats, with p = softmax(a), q = softmax(b), 0 log 0 = 0:
  //   kl   = KL(p||q) = sum_c p_c (log p_c - log q_c)   (a class with a_c = b_c = -inf adds 0; one with
  //          b_c = -inf < a_c adds +inf); rkl = KL(q||p) likewise;
  //   js   = (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2;
  //   all three NaN when max a or max b is not finite (a NaN, a +inf, or only -inf), as log_softmax;
  //   ia, ib = argmax a, argmax b (first maximal index, NaN above all, as torch.argmax);
  //   r    = rank of a_ia's class in b: #{c : b_c > b_ia or isnan(b_c)} + #{c < ia : b_c == b_ia}
  //          (the rule of topk_rank; ia is in b's top k <=> r < k);
  //   y    = target (when given) else ia;  dp = q_y - p_y;  nll_a = -log p_y, nll_b = -log q_y;
  //   d    = max_c |a_c - b_c| over the classes where a_c != b_c (0 if none; NaN if any value is NaN).
  // Per-row values are computed in float32 (KL-type sums from non-negative terms), the state in
  // float64 / int64:
  //   stats (7, 3) float64, rows kl, rkl, js, dp, nll_a, nll_b, d; columns (sum, sum of squares, max)
  //        += / max= the position's value (NaN propagates); the nll rows only when target is given;
  //   counts (8 + K,) int64: [0] += 1, [1] += (ia == ib), [2] += (ia == y), [3] += (ib == y),
  //        [4] += (ia == y && ib != y), [5] += (ia != y && ib == y), [7] += 1 ([2..5], [7] only with
  //        a target), [6] rejected targets (above), [8 + j] += (r < top_k[j]);
  //   kl_hist (2787,) int64: bin 0 kl < 1e-10, bin 1 + floor(232 (log10 kl + 10)) for kl in
  //        [1e-10, 1e2), 2785 for kl >= 1e2, 2786 for NaN;
  //   dp_hist (20001,) int64: bin min(floor((dp + 1) 1e4), 19999), 20000 for NaN.
  // row_stats (P, 4) float32 (kl, rkl, js, dp) and row_argmax (P, 2) int64 (ia, ib), P = N * S, when
  // given, are overwritten for every position (NaN / -1 where ignored).
  m.def(
      "compare_update(Tensor reference, Tensor candidate, Tensor? target, int? ignore_index, int[] top_k, "
      "Tensor(a!) stats, Tensor(b!) counts, Tensor(c!) kl_hist, Tensor(d!) dp_hist, Tensor(e!)? row_stats, "
      "Tensor(f!)? row_argmax) -> ()");
  // ---- Cross-entropy and the evaluation pass from hidden states (csrc/linear_ce/): the logits
  // x = input @ linear_weight^T + linear_bias (N, V) are never materialised; the kernels work over chunks
  // of the vocabulary with an online softmax and accumulate in float32. input (N, H), linear_weight
  // (V, H), linear_bias (V,) or None, all float32, bfloat16 or float16 of one dtype; target (N,) int64 /
  // int32.
  //
  // Loss: exactly fasteval::softmax_cross_entropy of the logits x (see above), with
  // x_it = <input_i, linear_weight_t> + linear_bias_t; loss and total_weight float32, lse_i = log sum_c
  // exp(x_ic) float64, as softmax_cross_entropy's (a row's loss is (max - x_it) + log sum exp(x_i - max)
  // with x_it from the same matmul as the other logits: exact for logits of any magnitude, never negative).
  m.def(
      "linear_cross_entropy(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor? weight, int ignore_index, float label_smoothing, int reduction, bool round_grad=False) -> "
      "(Tensor loss, Tensor lse, Tensor total_weight)");
  // Gradients of <grad_loss, loss> with the saved lse and total_weight. With g the gradient with respect
  // to the logits (softmax_cross_entropy_backward's, recomputed chunk by chunk, never materialised):
  //   grad_input = g @ linear_weight (N, H), grad_linear_weight = g^T @ input (V, H),
  //   grad_linear_bias = sum_i g_i (V,) (returned also when linear_bias is None), in input's dtype.
  // Products and sums in float32, g itself in float32; with round_grad (the forward only carries it to its
  // autograd formula), g is first rounded to input's dtype (as F.cross_entropy's backward gives it for logits
  // of that dtype): for bfloat16 on a CPU with AVX512_BF16 and on CUDA, the matmuls then multiply bfloat16
  // operands, where products below 2^-126 may count as zero.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor linear_weight, Tensor? linear_bias, "
      "Tensor target, Tensor? weight, Tensor lse, Tensor total_weight, int ignore_index, float label_smoothing, "
      "int reduction, bool round_grad=False) -> (Tensor grad_input, Tensor grad_linear_weight, "
      "Tensor grad_linear_bias)");
  // The fused evaluation pass from hidden states: exactly fasteval::eval_update of the (N, V) logits x
  // above (same state, same mutations, same handling of ignore_index and of targets outside [0, V)).
  // The target logit is computed as one dot product per row; argmax and rank follow torch.argmax's order
  // over the chunks' float32 logits (the rank is counted against the matmul's x_t from the target's chunk on,
  // and before it against the dot product, made exact with the few logits within rounding of it: up to 8 per
  // row); they can differ from those of F.linear's logits only where two logits lie within float32 rounding.
  m.def(
      "linear_eval_update(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor calib_boundaries, int? ignore_index, float label_smoothing, int[] top_k, bool counts_only, "
      "Tensor(a!) loss_sum, Tensor(b!) confmat, Tensor(c!) topk_hits, Tensor(d!) calib_count, "
      "Tensor(e!) calib_conf, Tensor(f!) calib_correct, Tensor(g!) count) -> ()");
}
