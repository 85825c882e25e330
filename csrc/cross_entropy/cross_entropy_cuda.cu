// CUDA kernels of fasteval::softmax_cross_entropy and fasteval::softmax_cross_entropy_backward.
//
// Forward, per row i of logits x (N, C) with target t = target[i], eps = label_smoothing,
// w = weight (w_c = 1 when weight is None) and W = sum_c w_c:
//   lse_i  = log(sum_c exp(x_c))          (one pass, online max / sum-exp, fp32; saved as m + log s in float64)
//   loss_i = (1 - eps) * w_t * (lse_i - x_t) + (eps / C) * (W * lse_i - sum_c w_c x_c)
// To keep the result accurate the kernel evaluates
//   lse_i - x_t               as (m - x_t) + log1p(s - 1)        m = row max, s = sum_c exp(x_c - m)
//   W * lse_i - sum_c w_c x_c as W * ((m - p) + log1p(s - 1)) - sum_c w_c (x_c - p)
// with the pivot p = x_t (0 if x_t is not finite): subtracting a value of the row before summing
// removes any common offset of the logits, which would otherwise cancel catastrophically.
//
// Special rows (no host synchronisation, no device assert):
//   t == ignore_index                    loss = 0,   lse = 0   (the row is not read)
//   t outside [0, C), not ignore_index   loss = NaN, lse = NaN (the row is not read; nothing is read or
//                                        written out of bounds). torch raises an error here, which needs
//                                        a host synchronisation; a NaN makes the bad target visible in
//                                        any reduction of the loss instead.
//   row max not finite (a NaN, +inf, or every logit -inf)   loss = NaN, lse = NaN (as in torch)
//
// Reductions and total_weight: the thread that finishes a row adds its loss and target weight to its slot of
// float64 sums in shared memory, each block adds its slots in a fixed order to one pair, and a one-block
// kernel adds the pairs in block order and writes total_weight and the reduced loss: two launches in all,
// no atomics (the result depends only on the grid, which depends only on N, C and the device), no host
// synchronisation. Per-row losses are written only for reduction none. total_weight counts every row whose
// target is not ignore_index, with w[t] (an out-of-range t is clamped into [0, C) for this; its row's loss
// is NaN anyway). The backward reads grad_loss per row (stride 0 for the reductions) and divides by
// total_weight itself for the mean.
//
// Backward, with p_c = exp(x_c - lse_i) and g = grad_loss[i]:
//   grad_c = g * ((1 - eps) * w_t + eps * W / C) * p_c - g * (eps / C) * w_c - [c == t] g (1 - eps) w_t
// and 0 on ignored rows and rows with an out-of-range target. One read of the row, one write of grad.
//
// Kernels
//   forward, row_bytes <= 4096: groups of G lanes (G a power of two <= 32, chosen so each lane reads
//     about four 16-byte vectors) per row, 256-thread blocks, reduction by warp shuffles. G = 1 (one
//     thread per row) for tiny C such as 10.
//   forward, larger rows: one block (128 / 256 / 512 threads) per row, two-level block reduction.
//   forward, a few larger rows (one block per row would fill less than half of the GPU): each row is cut
//     into segments read by one block each; a one-block kernel merges each row's partials in segment order,
//     finishes the rows and reduces them (it replaces the reduce kernel: still two launches).
//   reduce: one 256-thread block over the per-block sums of the forward.
//   backward: groups of G threads (G a power of two <= 256) per row, 256-thread blocks; no reduction. A few
//     rows of a block each are cut into segments along gridDim.y the same way.
// All kernels loop over rows (grid-stride), use 64-bit element offsets and 16-byte vector access
// whenever the row start allows it (a scalar head aligns it; see common/cuda_utils.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "cross_entropy/cross_entropy_common.h"

namespace fasteval {
namespace {

using cuda::ceil_div;
using cuda::fast_exp;
using cuda::for_each_vectorized;
using cuda::is_finite_bits;
using cuda::kVecWidth;
using cuda::MaxSumExp;
using cuda::quiet_nan;
using cuda::to_float;

constexpr int kGroupBlock = 256;     // threads per block, forward group path
constexpr int kMaxRowBlock = 512;    // most threads per block, forward block-per-row path
constexpr int kBackwardBlock = 256;  // threads per block, backward
constexpr int kReduceBlock = 256;    // threads of the one block that adds the forward's per-block sums
constexpr int64_t kGroupPathMaxRowBytes = 4096;

// Row status, decided from the target alone (uniform over the threads that share a row).
enum RowStatus : int { kValid = 0, kIgnored = 1, kBadTarget = 2, kPadding = 3 };

template <typename scalar_t, typename index_t>
struct ForwardParams {
  const scalar_t* __restrict__ logits;
  int64_t row_stride;  // elements between rows; classes are unit-stride
  const index_t* __restrict__ target;
  int64_t target_stride;
  const float* __restrict__ weight;      // (C,) contiguous, or nullptr
  const float* __restrict__ weight_sum;  // 0-dim sum of weight, or nullptr (then W = C)
  int64_t num_rows;
  int64_t num_classes;
  int64_t ignore_index;
  float one_minus_eps;  // 1 - eps
  float eps_over_c;     // eps / C
  float* __restrict__ loss;   // (N,) per-row losses, or nullptr (reductions keep only the sums)
  double* __restrict__ lse;   // max + log sum exp(x - max) in float64 (the backward splits it into two floats)
  double* __restrict__ block_sums;  // (gridDim.x, 2): each block's sum of row losses and of target weights
};

// Sums of row losses and of their target weights (total_weight), float64.
struct LossSums {
  double loss;
  double weight;
};

struct LossSumsOp {
  __device__ __forceinline__ LossSums operator()(const LossSums& a, const LossSums& b) const {
    return {a.loss + b.loss, a.weight + b.weight};
  }
};

// Running sums of a block's rows, in shared memory: slot r belongs to the one thread that finishes the rows
// of position r (a group's lane 0, or thread 0), which alone reads and writes it until the end of the row
// loop. Accessed through volatile pointers so that they are not kept in registers across the row loop: two
// float64 registers live through the hot loop would cost the row kernels a resident block per SM.
__device__ __forceinline__ void add_sums(double* loss, double* weight, const LossSums& row) {
  volatile double* l = loss;
  volatile double* w = weight;
  *l = *l + row.loss;
  *w = *w + row.weight;
}

// Thread 0 writes the sums of slots [0, n) (each slot's owner is done: call after a __syncthreads), added in
// slot order, as this block's entry of block_sums.
__device__ __forceinline__ void store_block_sums(double* __restrict__ block_sums, const double* loss,
                                                 const double* weight, int n) {
  if (threadIdx.x == 0) {
    double l = 0.0, w = 0.0;
    for (int i = 0; i < n; ++i) {
      l += static_cast<const volatile double*>(loss)[i];
      w += static_cast<const volatile double*>(weight)[i];
    }
    block_sums[2 * blockIdx.x] = l;
    block_sums[2 * blockIdx.x + 1] = w;
  }
}

// Per-thread partial result of one row: online (max, sum-exp) and, with label smoothing,
// sum_c w_c (x_c - pivot).
struct RowPartial {
  MaxSumExp mse;
  float smooth_sum;
};

struct RowPartialOp {
  __device__ __forceinline__ RowPartial operator()(const RowPartial& a, const RowPartial& b) const {
    return {MaxSumExp::merge(a.mse, b.mse), a.smooth_sum + b.smooth_sum};
  }
};

__device__ __forceinline__ RowPartial empty_partial() { return {MaxSumExp::empty(), 0.f}; }

__device__ __forceinline__ int row_status(int64_t t, int64_t ignore_index, int64_t num_classes) {
  if (t == ignore_index) return kIgnored;
  if (t < 0 || t >= num_classes) return kBadTarget;
  return kValid;
}

// Accumulates the elements this thread owns in x[0, n) into `acc`; weight (nullptr: none) is indexed like x
// (the split path passes a segment of a row and the matching segment of the weight).
template <bool kSmooth, typename scalar_t>
__device__ __forceinline__ void accumulate_row(const scalar_t* __restrict__ x, int64_t n,
                                               const float* __restrict__ weight, float pivot, int tid, int nthreads,
                                               RowPartial& acc) {
  constexpr int W = kVecWidth<scalar_t>;
  for_each_vectorized(
      x, n, tid, nthreads,
      [&](int64_t c0, const float(&v)[W]) {
        acc.mse.update(v);
        if (kSmooth) {
          if (weight != nullptr) {
#pragma unroll
            for (int k = 0; k < W; ++k) acc.smooth_sum += weight[c0 + k] * (v[k] - pivot);
          } else {
#pragma unroll
            for (int k = 0; k < W; ++k) acc.smooth_sum += v[k] - pivot;
          }
        }
      },
      [&](int64_t c, float v) {
        acc.mse.update(v);
        if (kSmooth) acc.smooth_sum += (weight != nullptr ? weight[c] : 1.f) * (v - pivot);
      });
}

// Writes lse[row] (and loss[row] for reduction none) from the reduced partial and returns the row's loss and
// target weight, for the sums (called by one thread per row).
template <bool kSmooth, typename scalar_t, typename index_t>
__device__ __forceinline__ LossSums finish_row(const ForwardParams<scalar_t, index_t>& p, int64_t row, int status,
                                               int64_t t, float x_t, float pivot, const RowPartial& r) {
  if (status == kIgnored) {
    if (p.loss != nullptr) p.loss[row] = 0.f;
    p.lse[row] = 0.0;
    return {0.0, 0.0};
  }
  // w[t] (t clamped into [0, C) for a bad target; no weight, or no classes: 1), the row's share of total_weight
  const int64_t t_in = status == kBadTarget ? (t < 0 ? 0 : p.num_classes - 1) : t;
  const float w_t = p.weight != nullptr && p.num_classes > 0 ? p.weight[t_in] : 1.f;
  const float m = r.mse.max;
  if (status == kBadTarget || !is_finite_bits(m)) {
    if (p.loss != nullptr) p.loss[row] = quiet_nan();
    p.lse[row] = static_cast<double>(quiet_nan());
    return {static_cast<double>(quiet_nan()), static_cast<double>(w_t)};
  }
  const float log_s = r.mse.log_sum();  // lse = m + log_s
  float loss = p.one_minus_eps * (w_t * ((m - x_t) + log_s));  // torch's order (0 * inf = NaN at eps = 1)
  if (kSmooth) {
    const float w_sum = p.weight != nullptr ? *p.weight_sum : static_cast<float>(p.num_classes);
    loss += p.eps_over_c * (w_sum * ((m - pivot) + log_s) - r.smooth_sum);
  }
  if (p.loss != nullptr) p.loss[row] = loss;
  p.lse[row] = static_cast<double>(m) + static_cast<double>(log_s);
  return {static_cast<double>(loss), static_cast<double>(w_t)};
}

// Forward for short rows: groups of `group` lanes (power of two <= 32) share a row; a 256-thread
// block handles 256 / group rows per step. The row loop is block-uniform (`base` depends on the block
// only) so every lane of a warp reaches the shuffles of warp_reduce, including lanes whose row is past
// the end, ignored or invalid (they contribute the empty partial).
template <bool kSmooth, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kGroupBlock)
    cross_entropy_forward_group_kernel(const ForwardParams<scalar_t, index_t> p, const int group) {
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  const int64_t rows_per_block = kGroupBlock / group;
  const int64_t row_in_block = threadIdx.x / group;
  __shared__ double sum_loss[kGroupBlock], sum_weight[kGroupBlock];  // slot row_in_block: its lane 0's
  if (lane == 0) {
    sum_loss[row_in_block] = 0.0;
    sum_weight[row_in_block] = 0.0;
  }
  for (int64_t base = blockIdx.x * rows_per_block; base < p.num_rows; base += gridDim.x * rows_per_block) {
    const int64_t row = base + row_in_block;
    RowPartial acc = empty_partial();
    int status = kPadding;
    int64_t t = 0;
    float x_t = 0.f, pivot = 0.f;
    if (row < p.num_rows) {
      t = static_cast<int64_t>(p.target[row * p.target_stride]);
      status = row_status(t, p.ignore_index, p.num_classes);
      if (status == kValid) {
        const scalar_t* __restrict__ x = p.logits + row * p.row_stride;
        x_t = to_float(x[t]);
        pivot = is_finite_bits(x_t) ? x_t : 0.f;
        accumulate_row<kSmooth>(x, p.num_classes, p.weight, pivot, lane, group, acc);
      }
    }
    acc = cuda::warp_reduce(acc, RowPartialOp{}, group);
    if (lane == 0 && status != kPadding) {
      add_sums(sum_loss + row_in_block, sum_weight + row_in_block,
               finish_row<kSmooth>(p, row, status, t, x_t, pivot, acc));
    }
  }
  __syncthreads();
  store_block_sums(p.block_sums, sum_loss, sum_weight, static_cast<int>(rows_per_block));
}

// Forward for long rows: one block per row (grid-stride over rows). The row status is block-uniform
// (all threads read the same target), so skipping the reduction for special rows is safe.
template <bool kSmooth, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kMaxRowBlock)
    cross_entropy_forward_block_kernel(const ForwardParams<scalar_t, index_t> p) {
  __shared__ RowPartial shared[33];
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  __shared__ double sum_loss[1], sum_weight[1];  // thread 0's
  if (tid == 0) {
    sum_loss[0] = 0.0;
    sum_weight[0] = 0.0;
  }
  for (int64_t row = blockIdx.x; row < p.num_rows; row += gridDim.x) {
    const int64_t t = static_cast<int64_t>(p.target[row * p.target_stride]);
    const int status = row_status(t, p.ignore_index, p.num_classes);
    if (status != kValid) {
      if (tid == 0) add_sums(sum_loss, sum_weight, finish_row<kSmooth>(p, row, status, t, 0.f, 0.f, empty_partial()));
      continue;
    }
    const scalar_t* __restrict__ x = p.logits + row * p.row_stride;
    const float x_t = to_float(x[t]);
    const float pivot = is_finite_bits(x_t) ? x_t : 0.f;
    RowPartial acc = empty_partial();
    accumulate_row<kSmooth>(x, p.num_classes, p.weight, pivot, tid, nthreads, acc);
    acc = cuda::block_reduce(acc, RowPartialOp{}, empty_partial(), shared);
    if (tid == 0) add_sums(sum_loss, sum_weight, finish_row<kSmooth>(p, row, status, t, x_t, pivot, acc));
  }
  store_block_sums(p.block_sums, sum_loss, sum_weight, 1);  // thread 0 wrote the slot: no barrier needed
}

// Forward for a few long rows (fewer than half the blocks the GPU holds at once, e.g. (8, 256000)): each
// row is cut into `segments` segments of seg_len classes (a multiple of the vector width, so that the
// segments of an aligned row start aligned; only the last is shorter) and block b reads segment
// b % segments of row b / segments, writing its partial (max, sum-exp, smoothing sum) to partials[b].
// cross_entropy_split_finish_kernel merges each row's partials in segment order. Rows that are ignored or
// have a bad target are not read (their blocks return at once: the status is block-uniform).
template <bool kSmooth, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kMaxRowBlock)
    cross_entropy_forward_split_kernel(const ForwardParams<scalar_t, index_t> p, const int segments,
                                       const int64_t seg_len, RowPartial* __restrict__ partials) {
  __shared__ RowPartial shared[33];
  const int64_t b = blockIdx.x;  // the grid is num_rows * segments blocks
  const int64_t row = b / segments;
  const int64_t c0 = (b % segments) * seg_len;
  const int64_t t = static_cast<int64_t>(p.target[row * p.target_stride]);
  if (row_status(t, p.ignore_index, p.num_classes) != kValid) return;
  const scalar_t* __restrict__ x = p.logits + row * p.row_stride;
  const float x_t = to_float(x[t]);
  const float pivot = is_finite_bits(x_t) ? x_t : 0.f;
  const int64_t n = c0 + seg_len <= p.num_classes ? seg_len : p.num_classes - c0;
  RowPartial acc = empty_partial();
  accumulate_row<kSmooth>(x + c0, n, p.weight != nullptr ? p.weight + c0 : nullptr, pivot,
                          static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), acc);
  acc = cuda::block_reduce(acc, RowPartialOp{}, empty_partial(), shared);
  if (threadIdx.x == 0) partials[b] = acc;
}

// Thread 0 writes total_weight and, for reduction mean (1) or sum (2), the loss: sum / total_weight or sum,
// in float32 as torch's (the float64 sums rounded first).
__device__ __forceinline__ void store_reduced(const LossSums& all, int reduction, bool smooth,
                                              float* __restrict__ loss, float* __restrict__ total_weight) {
  if (threadIdx.x == 0) {
    const float tw = static_cast<float>(all.weight);
    *total_weight = tw;
    const float sum = static_cast<float>(all.loss);
    if (reduction == 2) *loss = sum;
    // 0 / 0 = NaN when every row is ignored, as torch's; a zero total weight with smoothing is NaN too
    // (torch adds (1 - eps) * (0 / 0) to the smoothing term's s / 0).
    if (reduction == 1) *loss = tw == 0.f && smooth ? quiet_nan() : sum / tw;
  }
}

// The split path's second launch (one block of kReduceBlock threads): merges each row's partials in segment
// order, finishes the row (lse, per-row loss) and reduces the rows as cross_entropy_reduce_kernel does.
template <bool kSmooth, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kReduceBlock)
    cross_entropy_split_finish_kernel(const ForwardParams<scalar_t, index_t> p, const int segments,
                                      const RowPartial* __restrict__ partials, int reduction, float* __restrict__ loss,
                                      float* __restrict__ total_weight) {
  __shared__ LossSums shared[33];
  LossSums mine{0.0, 0.0};
  for (int64_t row = threadIdx.x; row < p.num_rows; row += blockDim.x) {
    const int64_t t = static_cast<int64_t>(p.target[row * p.target_stride]);
    const int status = row_status(t, p.ignore_index, p.num_classes);
    float x_t = 0.f, pivot = 0.f;
    RowPartial acc = empty_partial();
    if (status == kValid) {
      x_t = to_float(p.logits[row * p.row_stride + t]);
      pivot = is_finite_bits(x_t) ? x_t : 0.f;
      for (int s = 0; s < segments; ++s) acc = RowPartialOp{}(acc, partials[row * segments + s]);
    }
    mine = LossSumsOp{}(mine, finish_row<kSmooth>(p, row, status, t, x_t, pivot, acc));
  }
  store_reduced(cuda::block_reduce(mine, LossSumsOp{}, LossSums{0.0, 0.0}, shared), reduction, kSmooth, loss,
                total_weight);
}

// Adds the forward's per-block sums in block order (one block of kReduceBlock threads) and writes
// total_weight and the reduced loss (store_reduced).
__global__ void __launch_bounds__(kReduceBlock)
    cross_entropy_reduce_kernel(const double* __restrict__ block_sums, int num_blocks, int reduction, bool smooth,
                                float* __restrict__ loss, float* __restrict__ total_weight) {
  __shared__ LossSums shared[33];
  LossSums mine{0.0, 0.0};
  for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    mine.loss += block_sums[2 * b];
    mine.weight += block_sums[2 * b + 1];
  }
  store_reduced(cuda::block_reduce(mine, LossSumsOp{}, LossSums{0.0, 0.0}, shared), reduction, smooth, loss,
                total_weight);
}

template <typename scalar_t, typename index_t>
struct BackwardParams {
  const float* __restrict__ grad_loss;
  int64_t grad_stride;  // 0 for the reductions (one 0-dim grad_loss for every row)
  const float* __restrict__ total_weight;  // reduction mean: grad_loss is divided by it; else nullptr
  const scalar_t* __restrict__ logits;
  int64_t row_stride;
  const index_t* __restrict__ target;
  int64_t target_stride;
  const float* __restrict__ weight;
  const float* __restrict__ weight_sum;  // sum of weight when label smoothing is on, else nullptr (unused)
  const double* __restrict__ lse;
  int64_t lse_stride;
  int64_t num_rows;
  int64_t num_classes;
  int64_t ignore_index;
  float one_minus_eps;
  float eps_over_c;
  scalar_t* __restrict__ grad;  // (N, C) contiguous
};

// Groups of `group` threads (power of two <= kBackwardBlock) per row; no inter-thread communication. The
// classes are cut into gridDim.y segments of seg_len (a multiple of the vector width; seg_len = C with one
// segment): block (x, y) writes segment y of its rows, so that a few long rows still fill the GPU.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBackwardBlock)
    cross_entropy_backward_kernel(const BackwardParams<scalar_t, index_t> p, const int group, const int64_t seg_len) {
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  const int64_t rows_per_block = kBackwardBlock / group;
  const int64_t stride = gridDim.x * rows_per_block;
  const int64_t C = p.num_classes;
  const int64_t c0 = blockIdx.y * seg_len;
  const int64_t n = c0 + seg_len <= C ? seg_len : C - c0;  // this block's classes: [c0, c0 + n)
  for (int64_t row = blockIdx.x * rows_per_block + threadIdx.x / group; row < p.num_rows; row += stride) {
    scalar_t* __restrict__ out = p.grad + row * C + c0;
    const int64_t t = static_cast<int64_t>(p.target[row * p.target_stride]);
    if (row_status(t, p.ignore_index, C) != kValid) {
      cuda::fill_vectorized(out, n, lane, group, 0.f);
      continue;
    }
    const float g = p.total_weight != nullptr ? p.grad_loss[row * p.grad_stride] / *p.total_weight
                                              : p.grad_loss[row * p.grad_stride];
    // x - lse as (x - hi) - lo with lse = hi + lo in floats: x - hi is exact for the logits near the row max,
    // whatever their magnitude.
    const double row_lse = p.lse[row * p.lse_stride];
    const float lse_hi = static_cast<float>(row_lse);
    const float lse_lo = static_cast<float>(row_lse - static_cast<double>(lse_hi));
    const float w_t = p.weight != nullptr ? p.weight[t] : 1.f;
    // W only matters with label smoothing (it is multiplied by eps / C); the host computes weight_sum
    // only then, so it is read only when present.
    const float w_sum = p.weight_sum != nullptr ? *p.weight_sum : static_cast<float>(C);
    const float coef_p = g * (p.one_minus_eps * w_t + p.eps_over_c * w_sum);  // multiplies p_c
    const float coef_w = g * p.eps_over_c;                                     // multiplies w_c
    const float coef_t = g * p.one_minus_eps * w_t;                            // subtracted at c == t
    const scalar_t* __restrict__ x = p.logits + row * p.row_stride + c0;
    const auto minus_target_term = [&](float gc) { return gc - coef_t; };  // at c == t (index t - c0 here)
    if (p.weight != nullptr && coef_w != 0.f) {
      const float* __restrict__ weight = p.weight + c0;
      cuda::transform_vectorized(
          x, out, n, lane, group,
          [&](int64_t c, float v) { return coef_p * fast_exp((v - lse_hi) - lse_lo) - coef_w * weight[c]; }, t - c0,
          minus_target_term);
    } else {
      cuda::transform_vectorized(
          x, out, n, lane, group, [&](int64_t, float v) { return coef_p * fast_exp((v - lse_hi) - lse_lo) - coef_w; },
          t - c0, minus_target_term);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

template <typename F>
void dispatch_logits_type(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unexpected logits dtype ", st);
  }
}

template <typename F>
void dispatch_target_type(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kLong:
      f(int64_t{});
      break;
    case at::kInt:
      f(int32_t{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unexpected target dtype ", st);
  }
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// How the split paths cut rows into segments: `blocks` is the grid of one block per row, `resident` the
// blocks the GPU holds at once, `threads` the threads that share a segment. Rows are split only when the
// grid would fill less than half of the GPU, into at most enough segments to fill it, each with at least two
// 16-byte vectors per thread; seg_len is a multiple of the vector width `vec`. {1, C}: no split.
struct RowSplit {
  int segments;
  int64_t seg_len;
};

RowSplit split_rows(int64_t blocks, int64_t resident, int64_t C, int64_t threads, int64_t vec) {
  if (blocks == 0 || blocks * 2 > resident) return {1, C};
  const int64_t want = std::min<int64_t>(ceil_div(resident, blocks), ceil_div(C, threads * 2 * vec));
  if (want < 2) return {1, C};
  const int64_t seg_len = ceil_div(ceil_div(C, want), vec) * vec;
  return {static_cast<int>(ceil_div(C, seg_len)), seg_len};
}

// Sum of the (float32, contiguous) weight as a 0-dim device tensor; computed on the stream, no sync.
at::Tensor weight_sum_of(const at::Tensor& w) { return w.defined() ? at::sum(w) : at::Tensor(); }

// The forward kernels and the reduction (see the top of this file): returns (loss, lse, total_weight). The
// caller checked the inputs and set the device guard.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits,
                                                                          const at::Tensor& target,
                                                                          const at::Tensor& weight,
                                                                          int64_t ignore_index, double label_smoothing,
                                                                          int64_t reduction) {
  const int64_t N = logits.size(0);
  const int64_t C = logits.size(1);
  const bool smooth = label_smoothing > 0.0;
  const at::TensorOptions f32 = logits.options().dtype(at::kFloat);

  const int64_t elem_size = static_cast<int64_t>(logits.element_size());
  const int64_t vec = 16 / elem_size;
  const int64_t sms = sm_count();
  const bool group_path = C * elem_size <= kGroupPathMaxRowBytes;
  // About four 16-byte vectors per lane: G = 1 for C <= 4 * vec, 32 from C > 64 * vec.
  const int group = static_cast<int>(std::min<int64_t>(32, cuda::next_pow2(ceil_div(C, 4 * vec))));
  const int row_threads =
      static_cast<int>(std::clamp<int64_t>(cuda::next_pow2(ceil_div(C, 4 * vec)), 128, kMaxRowBlock));
  const int64_t blocks = N == 0 ? 0
                         : group_path
                             ? std::min<int64_t>(ceil_div(N, static_cast<int64_t>(kGroupBlock / group)),
                                                 sms * (2048 / kGroupBlock))
                             : std::min<int64_t>(N, sms * (2048 / row_threads));

  // A few long rows: split them (the split kernels above) so that the grid fills the GPU.
  const RowSplit split = group_path ? RowSplit{1, C} : split_rows(blocks, sms * (2048 / row_threads), C, row_threads, vec);
  at::Tensor partials;
  if (split.segments > 1) {
    static_assert(sizeof(RowPartial) == 3 * sizeof(float), "partials are stored as three floats per segment");
    partials = at::empty({N * split.segments, 3}, f32);
  }

  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kDouble));
  at::Tensor loss = reduction == 0 ? at::empty({N}, f32) : at::empty({}, f32);
  at::Tensor total_weight = at::empty({}, f32);
  at::Tensor block_sums = at::empty({std::max<int64_t>(blocks, 1), 2}, logits.options().dtype(at::kDouble));
  const at::Tensor weight_sum = smooth && N > 0 ? weight_sum_of(weight) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (N > 0) {
    dispatch_logits_type(logits.scalar_type(), [&](auto logits_tag) {
      using scalar_t = decltype(logits_tag);
      dispatch_target_type(target.scalar_type(), [&](auto target_tag) {
        using index_t = decltype(target_tag);
        ForwardParams<scalar_t, index_t> p;
        p.logits = logits.const_data_ptr<scalar_t>();
        p.row_stride = logits.stride(0);
        p.target = target.const_data_ptr<index_t>();
        p.target_stride = target.stride(0);
        p.weight = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
        p.weight_sum = weight_sum.defined() ? weight_sum.const_data_ptr<float>() : nullptr;
        p.num_rows = N;
        p.num_classes = C;
        p.ignore_index = ignore_index;
        p.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
        p.eps_over_c = C > 0 ? static_cast<float>(label_smoothing / static_cast<double>(C)) : 0.f;
        p.loss = reduction == 0 ? loss.mutable_data_ptr<float>() : nullptr;
        p.lse = lse.mutable_data_ptr<double>();
        p.block_sums = block_sums.mutable_data_ptr<double>();
        if (split.segments > 1) {
          RowPartial* part = reinterpret_cast<RowPartial*>(partials.mutable_data_ptr<float>());
          auto kernel = smooth ? cross_entropy_forward_split_kernel<true, scalar_t, index_t>
                               : cross_entropy_forward_split_kernel<false, scalar_t, index_t>;
          kernel<<<static_cast<unsigned>(N * split.segments), row_threads, 0, stream>>>(p, split.segments,
                                                                                      split.seg_len, part);
          FASTEVAL_CUDA_LAUNCH_CHECK();
          auto finish = smooth ? cross_entropy_split_finish_kernel<true, scalar_t, index_t>
                               : cross_entropy_split_finish_kernel<false, scalar_t, index_t>;
          finish<<<1, kReduceBlock, 0, stream>>>(p, split.segments, part, static_cast<int>(reduction),
                                                 reduction == 0 ? nullptr : loss.mutable_data_ptr<float>(),
                                                 total_weight.mutable_data_ptr<float>());
          FASTEVAL_CUDA_LAUNCH_CHECK();
        } else if (group_path) {
          auto kernel = smooth ? cross_entropy_forward_group_kernel<true, scalar_t, index_t>
                               : cross_entropy_forward_group_kernel<false, scalar_t, index_t>;
          kernel<<<static_cast<unsigned>(blocks), kGroupBlock, 0, stream>>>(p, group);
          FASTEVAL_CUDA_LAUNCH_CHECK();
        } else {
          auto kernel = smooth ? cross_entropy_forward_block_kernel<true, scalar_t, index_t>
                               : cross_entropy_forward_block_kernel<false, scalar_t, index_t>;
          kernel<<<static_cast<unsigned>(blocks), row_threads, 0, stream>>>(p);
          FASTEVAL_CUDA_LAUNCH_CHECK();
        }
      });
    });
  }
  if (split.segments > 1) return {loss, lse, total_weight};  // the finish kernel reduced the rows
  // With no rows: total_weight 0, and a sum of no terms (0; 0 / 0 = NaN for the mean).
  cross_entropy_reduce_kernel<<<1, kReduceBlock, 0, stream>>>(
      block_sums.const_data_ptr<double>(), static_cast<int>(blocks), static_cast<int>(reduction),
      smooth, reduction == 0 ? nullptr : loss.mutable_data_ptr<float>(), total_weight.mutable_data_ptr<float>());
  FASTEVAL_CUDA_LAUNCH_CHECK();
  return {loss, lse, total_weight};
}

}  // namespace

namespace cross_entropy {

template <>
std::tuple<at::Tensor, at::Tensor, at::Tensor> Kernels<at::kCUDA>::forward(const ForwardArgs& args) {
  const int64_t C = args.logits.size(1);
  c10::cuda::CUDAGuard guard(args.logits.device());
  const at::Tensor logits = class_contiguous(args.logits);
  auto [loss, lse, total_weight] = cross_entropy_forward_cuda(logits, args.target, args.weight, args.ignore_index,
                                                               args.label_smoothing, args.reduction);
  // No classes: torch's smoothing term is eps / C * (a sum of no terms) = NaN on every row, ignored or
  // not, and in any reduction (even of no rows).
  if (C == 0 && args.label_smoothing > 0.0) loss.fill_(std::numeric_limits<float>::quiet_NaN());
  return {loss, lse, total_weight};
}

template <>
at::Tensor Kernels<at::kCUDA>::backward(const BackwardArgs& args) {
  const int64_t N = args.logits.size(0);
  const int64_t C = args.logits.size(1);
  c10::cuda::CUDAGuard guard(args.logits.device());
  const at::Tensor logits = class_contiguous(args.logits);
  // The upstream gradient, float32 (no copy when it is): per row for reduction none, one value (read with
  // stride 0) for the reductions, divided by total_weight in the kernel for the mean.
  const at::Tensor g = args.grad_loss.to(at::kFloat);
  const at::Tensor total_weight = args.reduction == 1 ? args.total_weight.to(at::kFloat) : at::Tensor();
  const at::Tensor weight_sum = (args.label_smoothing > 0.0) ? weight_sum_of(args.weight) : at::Tensor();
  const at::Tensor lse_d = args.lse;  // float64 (checked)

  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0) return grad;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t vec = 16 / static_cast<int64_t>(logits.element_size());
  const int64_t sms = sm_count();
  const int group = static_cast<int>(std::min<int64_t>(kBackwardBlock, cuda::next_pow2(ceil_div(C, 4 * vec))));
  const int64_t rows_per_block = kBackwardBlock / group;
  const int64_t blocks = std::min<int64_t>(ceil_div(N, rows_per_block), sms * (2048 / kBackwardBlock));
  // A few long rows (a block each): split their classes over gridDim.y so that the grid fills the GPU.
  const RowSplit split = group == kBackwardBlock ? split_rows(blocks, sms * (2048 / kBackwardBlock), C, group, vec)
                                                 : RowSplit{1, C};

  dispatch_logits_type(logits.scalar_type(), [&](auto logits_tag) {
    using scalar_t = decltype(logits_tag);
    dispatch_target_type(args.target.scalar_type(), [&](auto target_tag) {
      using index_t = decltype(target_tag);
      BackwardParams<scalar_t, index_t> p;
      p.grad_loss = g.const_data_ptr<float>();
      p.grad_stride = args.reduction == 0 ? g.stride(0) : 0;
      p.total_weight = total_weight.defined() ? total_weight.const_data_ptr<float>() : nullptr;
      p.logits = logits.const_data_ptr<scalar_t>();
      p.row_stride = logits.stride(0);
      p.target = args.target.const_data_ptr<index_t>();
      p.target_stride = args.target.stride(0);
      p.weight = args.weight.defined() ? args.weight.const_data_ptr<float>() : nullptr;
      p.weight_sum = weight_sum.defined() ? weight_sum.const_data_ptr<float>() : nullptr;
      p.lse = lse_d.const_data_ptr<double>();
      p.lse_stride = lse_d.stride(0);
      p.num_rows = N;
      p.num_classes = C;
      p.ignore_index = args.ignore_index;
      p.one_minus_eps = static_cast<float>(1.0 - args.label_smoothing);
      p.eps_over_c = C > 0 ? static_cast<float>(args.label_smoothing / static_cast<double>(C)) : 0.f;
      p.grad = grad.mutable_data_ptr<scalar_t>();
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(split.segments));
      cross_entropy_backward_kernel<scalar_t, index_t><<<grid, kBackwardBlock, 0, stream>>>(p, group, split.seg_len);
      FASTEVAL_CUDA_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace cross_entropy

TORCH_LIBRARY_IMPL(fasteval, CUDA, m) { cross_entropy::register_ops<cross_entropy::Kernels<at::kCUDA>>(m); }

}  // namespace fasteval
