#pragma once
// Pieces of fasteval::compare_update shared by the CPU and CUDA kernels: the layout of the state, the
// histogram bins, the per-class divergence terms (scalar form), and the host-side input checks.
//
// Divergence terms. With t = log p_c - log q_c = (a_c - b_c) - (lse a - lse b), every class adds a
// NON-NEGATIVE term (the sums then have no cancellation, and an error in lse a - lse b changes them only
// to second order):
//   KL(p||q)  = sum_c q_c phi(t_c),   phi(t) = t e^t - e^t + 1   (= p log(p/q) - p + q, summed over c)
//   KL(q||p)  = sum_c p_c phi(-t_c)
//   JS        = sum_c q_c J(t_c),     J(t) = (e^t log(2 e^t / (1 + e^t)) + log(2 / (1 + e^t))) / 2
// For |t| < 0.5 phi and J come from their Taylor series (no cancellation near t = 0); otherwise
//   q phi(t) = q - p (1 - t),  p phi(-t) = p - q (1 + t),
//   q J(t) = (p (log p - log m) + q (log q - log m)) / 2,  m = (p + q) / 2.
// Classes with a_c or b_c = -inf are handled apart: both -inf adds 0; a_c = -inf alone adds q_c to KL,
// +inf to KL(q||p) and q_c log 2 / 2 to JS (and symmetrically).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "common/checks.h"

#if defined(__CUDACC__)
#define FASTEVAL_CMP_HD __host__ __device__ __forceinline__
#else
#define FASTEVAL_CMP_HD inline
#endif

namespace fasteval {
namespace compare {

constexpr const char* kOp = "fasteval.compare_update";

// Rows of stats (columns: sum, sum of squares, max).
enum Stat : int { kKL = 0, kRKL, kJS, kDP, kNllA, kNllB, kAbsDiff, kStatRows };
// Entries of counts before the top-k containment counts.
enum Count : int { kCount = 0, kAgree, kRefCorrect, kCandCorrect, kC2W, kW2C, kRejected, kWithTarget, kCountNames };

constexpr int kKlBinsPerDecade = 232;
constexpr int kKlDecades = 12;
constexpr int64_t kKlRegular = int64_t(kKlDecades) * kKlBinsPerDecade;
constexpr int64_t kKlBins = kKlRegular + 3;  // under, regular..., over (and +inf), NaN
constexpr int64_t kDpPerUnit = 10000;
constexpr int64_t kDpBins = 2 * kDpPerUnit + 1;  // [-1, 1] in steps of 1e-4, NaN
constexpr int kMaxTopK = 32;

FASTEVAL_CMP_HD int64_t kl_bin(double x) {
  if (x != x) return kKlRegular + 2;
  if (x < 1e-10) return 0;
  if (x >= 1e2) return kKlRegular + 1;
  double pos = floor((log10(x) + 10.0) * kKlBinsPerDecade);
  pos = pos < 0 ? 0 : (pos > kKlRegular - 1 ? kKlRegular - 1 : pos);
  return 1 + static_cast<int64_t>(pos);
}

FASTEVAL_CMP_HD int64_t dp_bin(double x) {
  if (x != x) return 2 * kDpPerUnit;
  double pos = floor((x + 1.0) * kDpPerUnit);
  pos = pos < 0 ? 0 : (pos > 2 * kDpPerUnit - 1 ? 2 * kDpPerUnit - 1 : pos);
  return static_cast<int64_t>(pos);
}

// Taylor coefficients (t^2 .. t^10) of phi and J.
#define FASTEVAL_PHI_EVEN 0.5f, 0.125f, 1.f / 144.f, 1.f / 5760.f, 1.f / 403200.f
#define FASTEVAL_PHI_ODD 1.f / 3.f, 1.f / 30.f, 1.f / 840.f, 1.f / 45360.f
#define FASTEVAL_J_EVEN 0.125f, 1.f / 64.f, 1.f / 2304.f, 1.f / 92160.f, -1.f / 38707200.f
#define FASTEVAL_J_ODD 1.f / 16.f, 1.f / 384.f, 1.f / 11520.f, -1.f / 3870720.f
constexpr float kSmallT = 0.5f;
constexpr float kHalfLog2 = 0.34657359027997264f;

// Even part E(t) and odd part O(t) of a series sum_{n=2..10} c_n t^n: f(t) = E + O, f(-t) = E - O.
FASTEVAL_CMP_HD void series_parts(float t, float e2, float e4, float e6, float e8, float e10, float o3, float o5,
                                  float o7, float o9, float& E, float& O) {
  const float u = t * t;
  E = u * (e2 + u * (e4 + u * (e6 + u * (e8 + u * e10))));
  O = t * u * (o3 + u * (o5 + u * (o7 + u * o9)));
}

// x - y = s + e exactly (TwoSum, round to nearest); e is NaN where x - y overflows (then so are the row's
// divergences).
FASTEVAL_CMP_HD float two_diff(float x, float y, float& e) {
  const float s = x - y;
  const float yv = s - x;
  e = (x - (s - yv)) - (y + yv);
  return s;
}

// D = lse a - lse b = (ma - mb) + (ra - rb) with ma - mb = hi + e exactly (hi = fl(ma - mb)) and r = ra - rb:
// with a - b = s + e_ab carried as exactly, t = (s - hi) + ((e_ab - e) - r). The first difference is exact for
// close a - b and ma - mb: a candidate whose logits are the reference's plus an offset c then keeps t to its
// own rounding instead of ulp(c) (an error d in t common to all classes still adds about d^2 / 2 to KL). The
// residuals are subtracted from each other before r is: where the maxima are far apart (one near the float32
// maximum, the other at 2^20) both are large and cancel, and r added to one of them first would lose its
// low bits (t off by up to ulp(2^20) / 2 = 0.06).
struct LogShift {
  float hi, e, r;
};

FASTEVAL_CMP_HD LogShift log_shift(float ma, float mb, float ra, float rb) {
  float e;
  const float hi = two_diff(ma, mb, e);
  return {hi, e, ra - rb};
}

FASTEVAL_CMP_HD float log_ratio(float a, float b, LogShift D) {
  float e;
  const float s = two_diff(a, b, e);
  return (s - D.hi) + ((e - D.e) - D.r);
}

// Terms of one class (scalar; the CPU kernel has a vector form of the same arithmetic). In the pivoted
// form (exact for logits of any magnitude): ma, mb the rows' maxima, ra = log sum exp(a - ma),
// rb = log sum exp(b - mb), so log p = (a - ma) - ra; D = log_shift(ma, mb, ra, rb) = lse a - lse b.
// kl_inf / rkl_inf are set where a term is +inf.
struct ClassTerms {
  float kl = 0.f, rkl = 0.f, js = 0.f;
  bool kl_inf = false, rkl_inf = false;
};

FASTEVAL_CMP_HD void add_class_terms(float a, float b, float ma, float mb, float ra, float rb, LogShift D,
                                     ClassTerms& acc) {
  const float ninf = -INFINITY;
  const bool ai = a == ninf, bi = b == ninf;
  if (ai && bi) return;
  const float la = (a - ma) - ra, lb = (b - mb) - rb;
  const float p = expf(la), q = expf(lb);
  if (ai) {
    acc.kl += q;
    acc.rkl_inf = true;
    acc.js += kHalfLog2 * q;
    return;
  }
  if (bi) {
    acc.rkl += p;
    acc.kl_inf = true;
    acc.js += kHalfLog2 * p;
    return;
  }
  const float t = log_ratio(a, b, D);
  if (fabsf(t) < kSmallT) {
    float E, O, EJ, OJ;
    series_parts(t, FASTEVAL_PHI_EVEN, FASTEVAL_PHI_ODD, E, O);
    series_parts(t, FASTEVAL_J_EVEN, FASTEVAL_J_ODD, EJ, OJ);
    acc.kl += q * (E + O);
    acc.rkl += p * (E - O);
    acc.js += q * (EJ + OJ);
  } else {
    acc.kl += q - p * (1.f - t);
    acc.rkl += p - q * (1.f + t);
    const float m = fmaxf(0.5f * (p + q), 1.17549435e-38f);
    const float lm = logf(m);
    acc.js += 0.5f * (p * (la - lm) + q * (lb - lm));
  }
}

struct Shapes {
  int64_t N, C, S, positions;
};


// Every check but the target values (the order and exception types of reference.check_compare_inputs).
inline Shapes check_inputs(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& target,
                           at::IntArrayRef top_k, const at::Tensor& stats, const at::Tensor& counts,
                           const at::Tensor& kl_hist, const at::Tensor& dp_hist,
                           const std::optional<at::Tensor>& row_stats, const std::optional<at::Tensor>& row_argmax) {
  TORCH_CHECK_VALUE(a.dim() == 2 || a.dim() == 3, kOp,
                    ": expected reference logits of shape (N, C) or (N, C, S), got ", a.sizes());
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), kOp, ": reference logits ", a.sizes(), " and candidate logits ",
                    b.sizes(), " must have the same shape");
  check_kernel_float_type(a.scalar_type(), "reference logits", kOp);
  check_kernel_float_type(b.scalar_type(), "candidate logits", kOp);
  TORCH_CHECK_VALUE(b.device() == a.device(), kOp, ": candidate logits are on ", b.device(),
                    " but reference logits are on ", a.device());
  Shapes s;
  s.N = a.size(0);
  s.C = a.size(1);
  s.S = a.dim() == 3 ? a.size(2) : 1;
  s.positions = s.N * s.S;
  TORCH_CHECK_VALUE(s.C > 0, kOp, ": the number of classes C must be positive, got logits of shape ", a.sizes());
  if (target.has_value() && target->defined()) {
    const at::Tensor& t = *target;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, kOp,
                     ": target must hold class indices as int64 or int32, got ", t.scalar_type());
    if (a.dim() == 2) {
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == s.N, kOp, ": expected target of shape (", s.N,
                        ",) to match logits ", a.sizes(), ", got ", t.sizes());
    } else {
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.S, kOp, ": expected target of shape (",
                        s.N, ", ", s.S, ") to match logits ", a.sizes(), ", got ", t.sizes());
    }
    TORCH_CHECK_VALUE(t.device() == a.device(), kOp, ": target is on ", t.device(), " but logits are on ",
                      a.device());
  }
  for (int64_t k : top_k) TORCH_CHECK_VALUE(k >= 1, kOp, ": every top_k must be >= 1, got ", top_k);
  TORCH_CHECK_VALUE(static_cast<int64_t>(top_k.size()) <= kMaxTopK, kOp, ": at most ", kMaxTopK,
                    " top_k values are supported, got ", top_k.size());
  const int64_t K = static_cast<int64_t>(top_k.size());
  check_state(stats, "stats", at::kDouble, {kStatRows, 3}, a, "logits are", kOp);
  check_state(counts, "counts", at::kLong, {kCountNames + K}, a, "logits are", kOp);
  check_state(kl_hist, "kl_hist", at::kLong, {kKlBins}, a, "logits are", kOp);
  check_state(dp_hist, "dp_hist", at::kLong, {kDpBins}, a, "logits are", kOp);
  if (row_stats.has_value() && row_stats->defined()) {
    check_state(*row_stats, "row_stats", at::kFloat, {s.positions, 4}, a, "logits are", kOp);
  }
  if (row_argmax.has_value() && row_argmax->defined()) {
    check_state(*row_argmax, "row_argmax", at::kLong, {s.positions, 2}, a, "logits are", kOp);
  }
  return s;
}

// The logits as the kernels read them: (N, C) with unit class stride, or (N, C, S) whose trailing (C, S)
// block is contiguous (a copy otherwise).
inline at::Tensor kernel_layout(const at::Tensor& x) {
  if (x.dim() == 2) return class_contiguous(x);
  if (x.stride(2) == 1 && x.stride(1) == x.size(2)) return x;
  return x.contiguous();
}

// The checked arguments of compare_update, as a device's kernel receives them.
struct UpdateArgs {
  Shapes sh;
  const at::Tensor& reference;
  const at::Tensor& candidate;
  at::Tensor target;                    // contiguous; undefined without targets
  std::optional<int64_t> ignore_index;  // None without targets
  at::IntArrayRef top_k;
  const at::Tensor& stats;
  const at::Tensor& counts;
  const at::Tensor& kl_hist;
  const at::Tensor& dp_hist;
  float* row_stats;     // (positions, 4), or null
  int64_t* row_argmax;  // (positions, 2), or null
};

// The kernel of device D: compare_cpu.cpp and compare_cuda.cu define Kernels<at::kCPU> and Kernels<at::kCUDA>.
template <c10::DeviceType D>
struct Kernels {
  static void update(const UpdateArgs& args);
};

// compare_update as registered, one definition for every device: the checks, then the kernel of device
// K = Kernels<device>.
template <class K>
void update(const at::Tensor& reference, const at::Tensor& candidate, const std::optional<at::Tensor>& target,
            std::optional<int64_t> ignore_index, at::IntArrayRef top_k, const at::Tensor& stats,
            const at::Tensor& counts, const at::Tensor& kl_hist, const at::Tensor& dp_hist,
            const std::optional<at::Tensor>& row_stats, const std::optional<at::Tensor>& row_argmax) {
  const Shapes sh =
      check_inputs(reference, candidate, target, top_k, stats, counts, kl_hist, dp_hist, row_stats, row_argmax);
  const bool has_target = target.has_value() && target->defined();
  K::update({sh, reference, candidate, has_target ? target->contiguous() : at::Tensor(),
             has_target ? ignore_index : std::nullopt, top_k, stats, counts, kl_hist, dp_hist,
             row_stats.has_value() && row_stats->defined() ? row_stats->data_ptr<float>() : nullptr,
             row_argmax.has_value() && row_argmax->defined() ? row_argmax->data_ptr<int64_t>() : nullptr});
}

template <class K>
void register_ops(torch::Library& m) {
  m.impl("compare_update", &update<K>);
}

}  // namespace compare
}  // namespace fasteval
