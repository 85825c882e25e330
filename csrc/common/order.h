#pragma once
// The one order of scores behind every argmax and every rank in fasteval, on the host and on CUDA: that of
// torch.sort(descending=True, stable=True). Larger scores first, NaN above every number, ties in index
// order. Hence
//   argmax(x)  = the first element in this order = torch.argmax(x) (first maximal index; the first NaN)
//   rank(x, t) = #{j : (x_j, j) comes before (x_t, t)}
//              = #{j : x_j > x_t} + #{j : isnan(x_j)} + #{j < t : x_j == x_t}   (x_t not NaN)
//              = #{j < t : isnan(x_j)}                                          (x_t NaN)
//   rank(x, t) == 0 <=> argmax(x) == t;   t is among the top k <=> rank(x, t) < k.
// torch.topk itself leaves the order of tied scores unspecified; this is the stable choice. Values are
// compared as float (bfloat16 / float16 convert exactly).
//
// The scalar definitions below (precedes, ArgMax, RankParts) are the reference every kernel uses: the CUDA
// kernels call them per element and merge them across lanes, except that eval_update's row kernel visits a
// 16-byte vector at a time (RowPartial::visit_vector in eval_update_cuda.cu, exact by the same formula);
// the CPU scalar paths call them per element.
// The vectorized CPU passes (row_rank_cpu.h, row_softmax_cpu.h, row_lanes_cpu.h, linear_ce_cpu.cpp) count
// the same quantities a vector at a time (#{x_j <= x_t} and #{x_j == x_t} per lane, the complement giving
// "larger or NaN") and end in RankParts' formula; the tests compare all of them with torch.argmax and the
// stable sort.
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace fasteval {
namespace order {

// NaN test on the bits: holds whatever floating-point flags a translation unit is compiled with.
FASTEVAL_HD bool is_nan(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
#endif
  return (u & 0x7fffffffu) > 0x7f800000u;
}

// Finite test on the bits (neither NaN nor +-inf), like is_nan.
FASTEVAL_HD bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
#endif
  return (u & 0x7f800000u) != 0x7f800000u;
}

FASTEVAL_HD float from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FASTEVAL_HD float neg_inf() { return from_bits(0xff800000u); }
FASTEVAL_HD float quiet_nan() { return from_bits(0x7fc00000u); }

// Whether (a, ia) comes before (b, ib) in the order.
FASTEVAL_HD bool precedes(float a, int64_t ia, float b, int64_t ib) {
  const bool an = is_nan(a), bn = is_nan(b);
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Running argmax: the first element in the order among those seen, in any order of visits and merges.
// Empty: (-inf, kNone), which every element precedes; index() is then 0, as torch.argmax of an all -inf row.
struct ArgMax {
  static constexpr int64_t kNone = INT64_MAX;
  float v;
  int64_t i;
  FASTEVAL_HD static ArgMax empty() { return {neg_inf(), kNone}; }
  FASTEVAL_HD void visit(float x, int64_t c) {
    if (precedes(x, c, v, i)) {
      v = x;
      i = c;
    }
  }
  FASTEVAL_HD static ArgMax merge(const ArgMax& a, const ArgMax& b) { return precedes(a.v, a.i, b.v, b.i) ? a : b; }
  FASTEVAL_HD int64_t index() const { return i == kNone ? 0 : i; }
};

// Merge functor of ArgMax for generic reductions (cuda::warp_reduce, block reductions).
struct ArgMaxOp {
  FASTEVAL_HD ArgMax operator()(const ArgMax& a, const ArgMax& b) const { return ArgMax::merge(a, b); }
};

// The counts that give rank(x, t) for a fixed target (x_t, t), mergeable across lanes and chunks. COUNT:
// the counter type (int on CUDA lanes, int64_t on the host).
template <typename COUNT>
struct RankParts {
  COUNT gt;          // #{j : x_j > x_t}
  COUNT eq_before;   // #{j < t : x_j == x_t}
  COUNT nan_total;   // #{j : isnan(x_j)}
  COUNT nan_before;  // #{j < t : isnan(x_j)}
  FASTEVAL_HD static RankParts empty() { return {0, 0, 0, 0}; }
  FASTEVAL_HD void visit(float x, int64_t j, float xt, int64_t t) {
    const bool xn = is_nan(x);
    gt += x > xt;
    nan_total += xn;
    if (j < t) {
      eq_before += x == xt;
      nan_before += xn;
    }
  }
  FASTEVAL_HD static RankParts merge(const RankParts& a, const RankParts& b) {
    return {static_cast<COUNT>(a.gt + b.gt), static_cast<COUNT>(a.eq_before + b.eq_before),
            static_cast<COUNT>(a.nan_total + b.nan_total), static_cast<COUNT>(a.nan_before + b.nan_before)};
  }
  FASTEVAL_HD int64_t rank(float xt) const {
    return is_nan(xt) ? static_cast<int64_t>(nan_before)
                      : static_cast<int64_t>(gt) + static_cast<int64_t>(nan_total) + static_cast<int64_t>(eq_before);
  }
};

}  // namespace order
}  // namespace fasteval
