#pragma once
// Input checks, layouts, the bin rule and the ops' entry points shared by the CPU and CUDA confusion-matrix
// kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/host_device.h"
#include "common/limits.h"

namespace fasteval {

#define FASTEVAL_DISPATCH_SCORE_TYPES(TYPE, NAME, ...)                                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)                     \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)               \
                                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// 0/1 targets of the binary and multilabel matrices.
#define FASTEVAL_DISPATCH_BINARY_TARGET(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kLong, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kInt, __VA_ARGS__) AT_DISPATCH_CASE(at::kByte, __VA_ARGS__))

#define FASTEVAL_DISPATCH_SCORE_OR_LABEL_TYPES(TYPE, NAME, ...)                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)                     \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)               \
                                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                                                 AT_DISPATCH_CASE(at::kLong, __VA_ARGS__)           \
                                                     AT_DISPATCH_CASE(at::kInt, __VA_ARGS__)        \
                                                         AT_DISPATCH_CASE(at::kByte, __VA_ARGS__))

// Multiclass counting: the (C, C) confusion matrix (bins t * C + p) or the per-class counts (3 * C bins:
// hits, predictions, targets).
enum class Mode { kMatrix, kCounts };

// Adds sample (target t, prediction p) to the bins of mode M through acc.add(bin) (a CPU lane histogram or a
// CUDA block histogram).
template <Mode M, typename Acc>
FASTEVAL_HD void emit(const Acc& acc, int64_t t, int64_t p, int64_t C) {
  if constexpr (M == Mode::kMatrix) {
    acc.add(t * C + p);
  } else {
    acc.add(C + p);
    acc.add(2 * C + t);
    if (t == p) acc.add(t);
  }
}

// The same with the mode chosen at run time (counts_only: the evaluation ops' per-class counts).
template <typename Acc>
FASTEVAL_HD void emit(const Acc& acc, int64_t t, int64_t p, int64_t C, bool counts_only) {
  if (counts_only) {
    emit<Mode::kCounts>(acc, t, p, C);
  } else {
    emit<Mode::kMatrix>(acc, t, p, C);
  }
}

// An accumulator of plain int64 bins, for single-threaded host loops.
struct HostBins {
  int64_t* bins;
  void add(int64_t b) const { bins[b] += 1; }
};

// The bucket of score x among T ascending thresholds (NaN thresholds last): the number of thresholds <= x.
// A NaN x compares false everywhere: bucket 0; no thresholds: one bucket, nothing is read.
template <typename CT>
FASTEVAL_HD int64_t bucket_of(const CT* thr, int64_t T, CT x) {
  if (T == 0) return 0;
  int64_t base = 0, n = T;
  while (n > 1) {
    const int64_t half = n >> 1;
    base = (thr[base + half] <= x) ? base + half : base;
    n -= half;
  }
  return base + (thr[base] <= x);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                              const char* op) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

// The (C, C) matrix must be indexable with 32-bit bin numbers on every device.
inline void check_matrix_size(int64_t C, const char* op) {
  TORCH_CHECK_VALUE(C >= 1, op, ": num_classes must be positive, got ", C);
  TORCH_CHECK_VALUE(C <= kMaxMatrixClasses, op, ": a (", C, ", ", C, ") confusion matrix has more than 2^31 - 1 entries; use the "
              "per-class counts (fasteval.metrics with counts=..., or torch.ops.fasteval.class_counts) for this "
              "many classes");
}

struct MulticlassShape {
  bool from_scores;
  int64_t N;  // samples (rows of scores) or labels
  int64_t D;  // positions per sample (product of the trailing dims of scores), 1 for labels / (N, C)
};

// preds: integer labels with target's shape, or floating scores (N, C, d1, ...) with target (N, d1, ...).
inline MulticlassShape check_multiclass(const at::Tensor& preds, const at::Tensor& target, int64_t C,
                                        const char* op) {
  TORCH_CHECK_VALUE(C >= 1, op, ": num_classes must be positive, got ", C);
  check_same_device(preds, "preds", target, "target", op);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must hold class indices as int64 or int32, got ", target.scalar_type());
  if (at::isFloatingType(preds.scalar_type())) {
    check_kernel_float_type(preds.scalar_type(), "scores", op);
    TORCH_CHECK_VALUE(preds.dim() >= 2 && preds.size(1) == C, op, ": expected scores of shape (N, ", C,
                ", ...) for num_classes=", C, ", got ", preds.sizes());
    std::vector<int64_t> expected{preds.size(0)};
    for (int64_t d = 2; d < preds.dim(); ++d) expected.push_back(preds.size(d));
    TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(expected), op, ": expected target of shape ", at::IntArrayRef(expected),
                " for scores of shape ", preds.sizes(), ", got ", target.sizes());
    const int64_t D = preds.size(0) == 0 ? 1 : (preds.dim() == 2 ? 1 : target.numel() / preds.size(0));
    return {true, preds.size(0), D};
  }
  TORCH_CHECK_TYPE(preds.scalar_type() == at::kLong || preds.scalar_type() == at::kInt, op,
              ": preds must be int64 / int32 labels or float scores, got ", preds.scalar_type());
  TORCH_CHECK_VALUE(preds.sizes() == target.sizes(), op, ": preds ", preds.sizes(), " and target ", target.sizes(),
              " must have the same shape");
  return {false, target.numel(), 1};
}

// Scores as (N, C) with unit class stride, or (N, C, D) contiguous.
inline at::Tensor scores_view(const at::Tensor& preds, const MulticlassShape& s) {
  if (s.D == 1 && preds.dim() == 2) return preds.stride(1) == 1 ? preds : preds.contiguous();
  return preds.contiguous().view({s.N, preds.size(1), s.D});
}

inline bool is_binary_target_type(at::ScalarType t) { return t == at::kLong || t == at::kInt || t == at::kByte; }

inline void check_multilabel(const at::Tensor& preds, const at::Tensor& target, const char* op) {
  check_same_device(preds, "preds", target, "target", op);
  TORCH_CHECK_VALUE(preds.dim() == 2, op, ": expected preds of shape (N, L), got ", preds.sizes());
  TORCH_CHECK_VALUE(preds.sizes() == target.sizes(), op, ": preds ", preds.sizes(), " and target ", target.sizes(),
              " must have the same shape");
  TORCH_CHECK_TYPE(is_binary_target_type(target.scalar_type()), op, ": target must be int64, int32 or uint8 (0/1), got ",
              target.scalar_type());
  const auto st = preds.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(st) || is_binary_target_type(st), op,
              ": preds must be float scores or int64 / int32 / uint8 0/1 labels, got ", st);
}

// Returns whether target holds class labels (one-vs-rest over the columns of preds).
inline bool check_binned(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& thresholds,
                         const char* op) {
  check_same_device(preds, "preds", target, "target", op);
  check_same_device(preds, "preds", thresholds, "thresholds", op);
  TORCH_CHECK_VALUE(preds.dim() == 2, op, ": expected preds of shape (N, L), got ", preds.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(preds.scalar_type()), op, ": preds must be floating scores, got ", preds.scalar_type());
  TORCH_CHECK_VALUE(thresholds.dim() == 1, op, ": thresholds must be a 1-D tensor, got ", thresholds.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(thresholds.scalar_type()), op, ": thresholds must be floating, got ",
              thresholds.scalar_type());
  TORCH_CHECK_TYPE(is_binary_target_type(target.scalar_type()), op, ": target must be int64, int32 or uint8, got ",
              target.scalar_type());
  if (target.dim() == 1) {
    TORCH_CHECK_VALUE(target.size(0) == preds.size(0), op, ": target of shape ", target.sizes(),
                " does not match preds of shape ", preds.sizes());
    return true;
  }
  TORCH_CHECK_VALUE(target.sizes() == preds.sizes(), op, ": target of shape ", target.sizes(),
              " does not match preds of shape ", preds.sizes(), " (expected (N, L) 0/1 or (N,) class labels)");
  return false;
}

inline void check_topk(const at::Tensor& scores, const at::Tensor& target, const char* op) {
  check_same_device(scores, "scores", target, "target", op);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(1) >= 1, op, ": expected scores of shape (N, C) with C >= 1, got ",
              scores.sizes());
  check_kernel_float_type(scores.scalar_type(), "scores", op);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must hold class indices as int64 or int32, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == scores.size(0), op, ": expected target of shape (",
              scores.size(0), ",), got ", target.sizes());
}

// hist (L, T + 1, 2) [bucket][target] over the ascending thresholds -> out (L, T, 2, 2) [[tn, fp], [fn, tp]]:
// at the k-th smallest threshold, predicted positive <=> bucket > k; its counts go to out[:, order[k]],
// the threshold's position in the caller's order.
inline void binned_suffix_sums(const int64_t* hist, int64_t L, int64_t T, const int64_t* order, int64_t* out) {
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* h = hist + l * (T + 1) * 2;
    int64_t neg = 0, pos = 0;
    for (int64_t b = 0; b <= T; ++b) {
      neg += h[2 * b];
      pos += h[2 * b + 1];
    }
    int64_t fp = 0, tp = 0;
    for (int64_t k = T - 1; k >= 0; --k) {
      fp += h[2 * (k + 1)];
      tp += h[2 * (k + 1) + 1];
      int64_t* o = out + (l * T + order[k]) * 4;
      o[0] = neg - fp;
      o[1] = fp;
      o[2] = pos - tp;
      o[3] = tp;
    }
  }
}


namespace confusion {

using Counts = std::tuple<at::Tensor, at::Tensor>;  // (the counts, invalid)

// The kernels of device D, each given checked inputs: confusion_cpu.cpp and confusion_cuda.cu define
// Kernels<at::kCPU> and Kernels<at::kCUDA>.
template <c10::DeviceType D>
struct Kernels {
  // Adds the samples to out, the zeroed (C, C) matrix (M = kMatrix) or (3, C) per-class counts (M = kCounts);
  // returns `invalid`. op names the op in errors.
  template <Mode M>
  static at::Tensor multiclass(const at::Tensor& preds, const at::Tensor& target, const MulticlassShape& s,
                               std::optional<int64_t> ignore_index, const char* op, at::Tensor& out);
  static Counts multilabel(const at::Tensor& preds, const at::Tensor& target, double threshold,
                           std::optional<int64_t> ignore_index);
  static Counts binned(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& thresholds,
                       bool one_vs_rest, std::optional<int64_t> ignore_index);
  static Counts topk_rank(const at::Tensor& scores, const at::Tensor& target, std::optional<int64_t> ignore_index);
};

// The five ops as registered, one definition for every device: the op's checks, then the kernel of device
// K = Kernels<device>.
template <class K>
struct Entry {
  static Counts confusion_matrix(const at::Tensor& preds, const at::Tensor& target, int64_t num_classes,
                                 std::optional<int64_t> ignore_index) {
    check_matrix_size(num_classes, "fasteval.confusion_matrix");
    return multiclass<Mode::kMatrix>(preds, target, num_classes, ignore_index, "fasteval.confusion_matrix");
  }

  static Counts class_counts(const at::Tensor& preds, const at::Tensor& target, int64_t num_classes,
                             std::optional<int64_t> ignore_index) {
    return multiclass<Mode::kCounts>(preds, target, num_classes, ignore_index, "fasteval.class_counts");
  }

  static Counts multilabel_confusion_matrix(const at::Tensor& preds, const at::Tensor& target, double threshold,
                                            std::optional<int64_t> ignore_index) {
    check_multilabel(preds, target, "fasteval.multilabel_confusion_matrix");
    return K::multilabel(preds, target, threshold, ignore_index);
  }

  static Counts binned_confusion_matrix(const at::Tensor& preds, const at::Tensor& target,
                                        const at::Tensor& thresholds, std::optional<int64_t> ignore_index) {
    const bool one_vs_rest = check_binned(preds, target, thresholds, "fasteval.binned_confusion_matrix");
    return K::binned(preds, target, thresholds, one_vs_rest, ignore_index);
  }

  static Counts topk_rank(const at::Tensor& scores, const at::Tensor& target, std::optional<int64_t> ignore_index) {
    check_topk(scores, target, "fasteval.topk_rank");
    return K::topk_rank(scores, target, ignore_index);
  }

 private:
  template <Mode M>
  static Counts multiclass(const at::Tensor& preds, const at::Tensor& target, int64_t C,
                           std::optional<int64_t> ignore_index, const char* op) {
    const MulticlassShape s = check_multiclass(preds, target, C, op);
    at::Tensor out = at::zeros(M == Mode::kMatrix ? std::vector<int64_t>{C, C} : std::vector<int64_t>{3, C},
                               target.options().dtype(at::kLong));
    at::Tensor invalid = K::template multiclass<M>(preds, target, s, ignore_index, op, out);
    return {out, invalid};
  }
};

template <class K>
void register_ops(torch::Library& m) {
  m.impl("confusion_matrix", &Entry<K>::confusion_matrix);
  m.impl("class_counts", &Entry<K>::class_counts);
  m.impl("multilabel_confusion_matrix", &Entry<K>::multilabel_confusion_matrix);
  m.impl("binned_confusion_matrix", &Entry<K>::binned_confusion_matrix);
  m.impl("topk_rank", &Entry<K>::topk_rank);
}

}  // namespace confusion
}  // namespace fasteval
