// CUDA kernels of fasteval::eval_update, the fused evaluation pass (the math is in registration.cpp).
//
// (N, C) logits: one warp per row (8 rows per 256-thread block, grid-stride over rows). Each lane visits
// its share of the row once with 16-byte loads (common/cuda_utils.cuh: for_each_vectorized) and keeps an
// online (max, sum-exp) state, the first argmax, sum_c (x_c - x_t), and the counts that give the rank
// of the target's logit (#{x_c > x_t}, #{c < t : x_c == x_t}, NaNs), a vector at a time
// (RowPartial::visit_vector); one warp reduction merges them.
// (N, C, S) logits (class dim 1 with trailing dims): one thread per position, looping over the classes
// at stride S, so consecutive threads read consecutive addresses. The same kernel serves (N, C) rows of
// few classes (C <= cuda::kThreadPerRowMaxC, S = 1): one thread per row.
//
// Per-block accumulators live in shared memory (integer atomics for counts, one float64 atomic per row
// for the loss and confidence sums); the confusion matrix is a shared-memory histogram when its C*C
// (or 3C) int32 counters fit, else int64 atomics in global memory. Blocks flush their accumulators with
// one global atomic per non-zero counter at the end. No host synchronisation anywhere: a bad target
// cannot raise, so a first kernel counts out-of-range targets into count[1] and a scratch flag, and the
// main kernel then leaves the state untouched (the Python API raises when it reads the state).
//
// The order used for argmax and rank is that of common/order.h: larger first, NaN above every number,
// ties by index.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/order.h"
#include "confusion/confusion_common.h"
#include "evaluator/eval_update_common.h"

namespace fasteval {
namespace {

using cuda::MaxSumExp;

constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / 32;
constexpr int kMaxTopK = 32;
constexpr int kMaxBins = 1024;
constexpr int64_t kPositionBlock = 256;  // columns per partial sum in the (N, C, S) kernel
constexpr int64_t kSmemBudget = 44 * 1024;  // dynamic shared memory per block we allow ourselves

struct Params {
  int64_t N, C, S, P;  // P = N * S positions
  int64_t row_stride;  // elements between rows (between n for the (N, C, S) layout)
  bool has_ignore;     // ignore_index given
  int64_t ignore_index;
  bool smooth;         // label_smoothing > 0: add the smoothing term (never 0 * inf for -inf logits)
  float keep, eps_over_c;
  int K;
  int64_t top_k[kMaxTopK];
  int nb;
  const float* boundaries;
  bool counts_only;
  bool smem_confmat;
  int64_t cm_bins;
  // state
  double* loss_sum;
  int64_t* confmat;
  int64_t* topk_hits;
  int64_t* calib_count;
  double* calib_conf;
  int64_t* calib_correct;
  int64_t* count;
  const int64_t* bad;  // number of out-of-range targets in this batch (written by the check kernel)
};

// The partial state of (part of) a row, mergeable across lanes. The argmax and the counts that give the
// rank of the target follow common/order.h.
struct RowPartial {
  MaxSumExp mse;
  order::ArgMax am;           // first element in the order (NaN above all)
  order::RankParts<int> rp;  // counts giving the rank of x_t
  float sum_dx;               // sum_c (x_c - pivot), pivot = x_t if finite else 0

  __device__ __forceinline__ static RowPartial empty() {
    RowPartial r;
    r.mse = MaxSumExp::empty();
    r.am = order::ArgMax::empty();
    r.rp = order::RankParts<int>::empty();
    r.sum_dx = 0.f;
    return r;
  }

  // Everything but the (max, sum-exp) state, for element c with value x.
  __device__ __forceinline__ void visit(int64_t c, float x, float xt, float pivot, int64_t t) {
    am.visit(x, c);
    rp.visit(x, c, xt, t);
    sum_dx += x - pivot;
  }

  // Everything, for the W elements x of indices first .. first + W - 1 (vmax = cuda::vector_max(x)), all
  // after every element this lane has visited (for_each_vectorized visits a lane's elements in ascending
  // order). Adds what visit() and mse.update would add element by element, with per-vector work instead of
  // per-element work where the order allows:
  //  - argmax: an element after all those seen takes the argmax only when it is larger, a NaN over a number,
  //    or the first element seen (ties keep the earlier index). So only a vector whose max passes that test
  //    is searched, for its first element equal to the max (its first NaN when the max is NaN).
  //  - rank counts, when x_t is a number: rank = gt + nan_total + eq_before (order.h), so gt takes the
  //    elements above x_t or NaN, !(x <= x_t), nan_total none (only the sum enters the rank), and equal
  //    elements count only in vectors before t (one vector straddles t). A NaN x_t (rank = #{c < t : NaN})
  //    is visited element by element.
  //  - sum_c (x_c - pivot) only with label smoothing (finish reads it only then).
  template <bool kXtNan, int W>
  __device__ __forceinline__ void visit_vector(int64_t first, const float (&x)[W], float xt, float pivot, int64_t t,
                                               bool smooth) {
    const float vmax = cuda::vector_max(x);
    mse.update(x, vmax);
    const bool vmax_nan = cuda::is_nan_bits(vmax);
    if (vmax > am.v || (vmax_nan && !cuda::is_nan_bits(am.v)) || am.i == order::ArgMax::kNone) {
      int k0 = 0;
      float v0 = x[0];
#pragma unroll
      for (int k = W - 1; k >= 0; --k) {
        if (vmax_nan ? cuda::is_nan_bits(x[k]) : x[k] == vmax) {
          k0 = k;
          v0 = x[k];
        }
      }
      am.v = v0;
      am.i = first + k0;
    }
    if constexpr (kXtNan) {
#pragma unroll
      for (int k = 0; k < W; ++k) rp.visit(x[k], first + k, xt, t);
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        if (!(x[k] <= xt)) ++rp.gt;
      }
      const int64_t before = t - first;  // elements k < before come before t
      if (before >= W) {
#pragma unroll
        for (int k = 0; k < W; ++k) {
          if (x[k] == xt) ++rp.eq_before;
        }
      } else if (before > 0) {  // the vector holding t
#pragma unroll
        for (int k = 0; k < W; ++k) {
          if (k < before && x[k] == xt) ++rp.eq_before;
        }
      }
    }
    if (smooth) {
#pragma unroll
      for (int k = 0; k < W; ++k) sum_dx += x[k] - pivot;
    }
  }

  __device__ __forceinline__ static RowPartial merge(const RowPartial& a, const RowPartial& b) {
    RowPartial r;
    r.mse = MaxSumExp::merge(a.mse, b.mse);
    r.am = order::ArgMax::merge(a.am, b.am);
    r.rp = order::RankParts<int>::merge(a.rp, b.rp);
    r.sum_dx = a.sum_dx + b.sum_dx;
    return r;
  }
};

struct RowPartialOp {
  __device__ __forceinline__ RowPartial operator()(const RowPartial& a, const RowPartial& b) const {
    return RowPartial::merge(a, b);
  }
};

// Shared-memory accumulators of a block.
struct BlockAcc {
  double* loss;      // [1]
  double* conf;      // [nb]
  int* valid;        // [1]
  int* hits;         // [K]
  int* ccount;       // [nb]
  int* ccorrect;     // [nb]
  float* bnd;        // [nb] boundaries
  int* cm;           // [cm_bins] when smem_confmat

  __device__ static BlockAcc carve(char* smem, const Params& p) {
    BlockAcc a;
    double* d = reinterpret_cast<double*>(smem);
    a.loss = d;
    a.conf = d + 1;
    int* i = reinterpret_cast<int*>(d + 1 + p.nb);
    a.valid = i;
    a.hits = i + 1;
    a.ccount = a.hits + p.K;
    a.ccorrect = a.ccount + p.nb;
    a.bnd = reinterpret_cast<float*>(a.ccorrect + p.nb);
    a.cm = reinterpret_cast<int*>(a.bnd + p.nb);
    return a;
  }

  static int64_t bytes(const Params& p) {
    return static_cast<int64_t>(sizeof(double)) * (1 + p.nb) + static_cast<int64_t>(sizeof(int)) * (1 + p.K + 2 * p.nb) +
           static_cast<int64_t>(sizeof(float)) * p.nb + (p.smem_confmat ? static_cast<int64_t>(sizeof(int)) * p.cm_bins : 0);
  }

  __device__ void init(const Params& p) {
    if (threadIdx.x == 0) {
      *loss = 0.0;
      *valid = 0;
    }
    for (int i = threadIdx.x; i < p.nb; i += blockDim.x) {
      conf[i] = 0.0;
      ccount[i] = 0;
      ccorrect[i] = 0;
      bnd[i] = p.boundaries[i];
    }
    for (int i = threadIdx.x; i < p.K; i += blockDim.x) hits[i] = 0;
    if (p.smem_confmat) {
      for (int64_t i = threadIdx.x; i < p.cm_bins; i += blockDim.x) cm[i] = 0;
    }
    __syncthreads();
  }

  __device__ __forceinline__ void add_cm(const Params& p, int64_t bin) {
    if (p.smem_confmat) {
      atomicAdd(cm + bin, 1);
    } else {
      cuda::atomic_add_i64(p.confmat + bin, 1);
    }
  }

  // The confusion bins as confusion_common.h's emit adds to them.
  struct CmBins {
    BlockAcc* acc;
    const Params* p;
    __device__ __forceinline__ void add(int64_t bin) const { acc->add_cm(*p, bin); }
  };

  // One valid position: its loss, confidence (NaN when undefined), prediction, target and rank.
  __device__ __forceinline__ void add(const Params& p, float l, float cf, int64_t pred, int64_t t, int64_t rank) {
    atomicAdd(loss, static_cast<double>(l));
    atomicAdd(valid, 1);
    for (int k = 0; k < p.K; ++k) {
      if (rank < p.top_k[k]) atomicAdd(hits + k, 1);
    }
    if (!cuda::is_nan_bits(cf)) {
      const int64_t b = evaluator::calib_bin(bnd, p.nb, cf);
      atomicAdd(ccount + b, 1);
      atomicAdd(conf + b, static_cast<double>(cf));
      if (pred == t) atomicAdd(ccorrect + b, 1);
    }
    emit(CmBins{this, &p}, t, pred, p.C, p.counts_only);
  }

  __device__ void flush(const Params& p) {
    __syncthreads();
    if (threadIdx.x == 0) {
      if (*valid) {
        atomicAdd(p.loss_sum, *loss);
        cuda::atomic_add_i64(p.count, *valid);
      }
    }
    for (int i = threadIdx.x; i < p.nb; i += blockDim.x) {
      if (ccount[i]) {
        cuda::atomic_add_i64(p.calib_count + i, ccount[i]);
        atomicAdd(p.calib_conf + i, conf[i]);
      }
      if (ccorrect[i]) cuda::atomic_add_i64(p.calib_correct + i, ccorrect[i]);
    }
    for (int i = threadIdx.x; i < p.K; i += blockDim.x) {
      if (hits[i]) cuda::atomic_add_i64(p.topk_hits + i, hits[i]);
    }
    if (p.smem_confmat) {
      for (int64_t i = threadIdx.x; i < p.cm_bins; i += blockDim.x) {
        if (cm[i]) cuda::atomic_add_i64(p.confmat + i, cm[i]);
      }
    }
  }
};

// The pivot of the smoothing sum: x_t, or 0 when x_t is not finite (a class masked with -inf: x_c - x_t
// would be -inf - -inf = NaN for the other masked classes).
__device__ __forceinline__ float smoothing_pivot(float xt) { return cuda::is_finite_bits(xt) ? xt : 0.f; }

// Loss, confidence and rank of a position from its merged partial state.
__device__ __forceinline__ void finish(const Params& p, const RowPartial& r, float xt, float pivot, int64_t t, float* l,
                                      float* cf, int64_t* rank) {
  const float m = r.mse.max;
  if (cuda::is_finite_bits(m)) {
    // lse - x_t = (m - x_t) + log(s); C * lse - sum_c x_c = C * ((m - pivot) + log(s)) - sum_c (x_c - pivot).
    // The smoothing term only when eps > 0: with a -inf logit, sum_c x_c is -inf and 0 * inf is NaN.
    const float log_s = r.mse.log_sum();
    *l = p.keep * ((m - xt) + log_s);
    if (p.smooth) *l += p.eps_over_c * (static_cast<float>(p.C) * ((m - pivot) + log_s) - r.sum_dx);
    *cf = __frcp_rn(r.mse.sum);  // softmax of the max: exp(0) / s
  } else {  // a NaN, +inf, or only -inf: loss and confidence are NaN, as torch's
    *l = cuda::quiet_nan();
    *cf = cuda::quiet_nan();
  }
  *rank = r.rp.rank(xt);
}

template <typename T, typename I>
__global__ void __launch_bounds__(kBlock) eval_rows_kernel(const T* __restrict__ x, const I* __restrict__ target,
                                                           Params p) {
  if (*p.bad != 0) return;  // the batch is rejected (uniform over the grid)
  extern __shared__ __align__(16) char smem[];
  BlockAcc acc = BlockAcc::carve(smem, p);
  acc.init(p);
  const int lane = threadIdx.x & 31;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5);
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = warp; i < p.N; i += num_warps) {
    const int64_t t = static_cast<int64_t>(target[i]);
    if (p.has_ignore && t == p.ignore_index) continue;  // uniform over the warp
    const T* row = x + i * p.row_stride;
    const float xt = cuda::to_float(row[t]);
    const float pivot = smoothing_pivot(xt);
    RowPartial r = RowPartial::empty();
    // Two instances of the row loop: a NaN x_t (rare) counts the rank element by element.
    const auto sweep = [&](auto xt_nan) {
      cuda::for_each_vectorized<T, 2>(
          row, p.C, lane, 32,
          [&](int64_t first, const float(&v)[cuda::kVecWidth<T>]) {
            r.visit_vector<decltype(xt_nan)::value>(first, v, xt, pivot, t, p.smooth);
          },
          [&](int64_t c, float v) {
            r.mse.update(v);
            r.visit(c, v, xt, pivot, t);
          });
    };
    if (cuda::is_nan_bits(xt)) {
      sweep(std::true_type{});
    } else {
      sweep(std::false_type{});
    }
    r = cuda::warp_reduce(r, RowPartialOp{});
    if (lane == 0) {
      float l, cf;
      int64_t rank;
      finish(p, r, xt, pivot, t, &l, &cf, &rank);
      acc.add(p, l, cf, r.am.index(), t, rank);
    }
  }
  acc.flush(p);
}

template <typename T, typename I>
__global__ void __launch_bounds__(kBlock) eval_positions_kernel(const T* __restrict__ x, const I* __restrict__ target,
                                                                Params p) {
  if (*p.bad != 0) return;
  extern __shared__ __align__(16) char smem[];
  BlockAcc acc = BlockAcc::carve(smem, p);
  acc.init(p);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.P;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = static_cast<int64_t>(target[i]);
    if (p.has_ignore && t == p.ignore_index) continue;
    const int64_t n = i / p.S, s = i % p.S;
    const T* col = x + n * p.row_stride + s;
    const float xt = cuda::to_float(col[t * p.S]);
    const float pivot = smoothing_pivot(xt);
    RowPartial r = RowPartial::empty();
    // The sums over C run in blocks of kPositionBlock columns, each block's partial (max, sum of exp) and
    // sum of x - pivot then added to the running ones: one sequential sum over a large C loses about
    // C * 2^-24 relative when values repeat (the roundings correlate), as torch's own (N, C, d) reduction does.
    for (int64_t c0 = 0; c0 < p.C; c0 += kPositionBlock) {
      const int64_t c1 = c0 + kPositionBlock < p.C ? c0 + kPositionBlock : p.C;
      MaxSumExp block = MaxSumExp::empty();
      const float dx_before = r.sum_dx;
      r.sum_dx = 0.f;
      for (int64_t c = c0; c < c1; ++c) {
        const float v = cuda::to_float(col[c * p.S]);
        block.update(v);
        r.visit(c, v, xt, pivot, t);
      }
      r.mse = MaxSumExp::merge(r.mse, block);
      r.sum_dx += dx_before;
    }
    float l, cf;
    int64_t rank;
    finish(p, r, xt, pivot, t, &l, &cf, &rank);
    acc.add(p, l, cf, r.am.index(), t, rank);
  }
  acc.flush(p);
}

}  // namespace

namespace evaluator {

template <>
void Kernels<at::kCUDA>::update(const UpdateArgs& args) {
  const Shapes& sh = args.sh;
  TORCH_CHECK_VALUE(static_cast<int64_t>(args.top_k.size()) <= kMaxTopK, kOp, ": at most ", kMaxTopK,
              " top_k values are supported on CUDA, got ", args.top_k.size());
  TORCH_CHECK_VALUE(args.boundaries.numel() <= kMaxBins, kOp, ": at most ", kMaxBins,
              " calibration boundaries are supported on CUDA, got ", args.boundaries.numel());
  // A row's rank counts are 32-bit (RowPartial): a class count past that would wrap a rank into a hit.
  TORCH_CHECK_VALUE(sh.C <= INT32_MAX, kOp, ": at most ", INT32_MAX, " classes are supported on CUDA, got ", sh.C);
  const c10::cuda::CUDAGuard guard(args.logits.device());
  const at::Tensor logits = evaluator::kernel_layout(args.logits);
  const at::Tensor target = args.target.contiguous();
  const at::Tensor bnd = args.boundaries.contiguous();
  if (sh.positions == 0) return;

  Params p;
  p.N = sh.N;
  p.C = sh.C;
  p.S = sh.S;
  p.P = sh.positions;
  p.row_stride = logits.stride(0);
  p.has_ignore = args.ignore_index.has_value();
  p.ignore_index = args.ignore_index.value_or(0);
  p.smooth = args.label_smoothing > 0.0;
  p.keep = 1.f - static_cast<float>(args.label_smoothing);
  p.eps_over_c = static_cast<float>(args.label_smoothing) / static_cast<float>(sh.C);
  p.K = static_cast<int>(args.top_k.size());
  for (int k = 0; k < p.K; ++k) p.top_k[k] = args.top_k[k];
  p.nb = static_cast<int>(bnd.numel());
  p.boundaries = bnd.const_data_ptr<float>();
  p.counts_only = args.counts_only;
  p.cm_bins = args.counts_only ? 3 * sh.C : sh.C * sh.C;
  p.smem_confmat = false;  // sized without the matrix first
  p.smem_confmat = BlockAcc::bytes(p) + static_cast<int64_t>(sizeof(int)) * p.cm_bins <= kSmemBudget;
  p.loss_sum = args.state.loss_sum.data_ptr<double>();
  p.confmat = args.state.confmat.data_ptr<int64_t>();
  p.topk_hits = args.state.topk_hits.data_ptr<int64_t>();
  p.calib_count = args.state.calib_count.data_ptr<int64_t>();
  p.calib_conf = args.state.calib_conf.data_ptr<double>();
  p.calib_correct = args.state.calib_correct.data_ptr<int64_t>();
  p.count = args.state.count.data_ptr<int64_t>();
  at::Tensor bad = at::zeros({1}, args.state.count.options());
  p.bad = bad.const_data_ptr<int64_t>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t smem = static_cast<size_t>(BlockAcc::bytes(p));
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "eval_update_cuda_target", [&] {
    const int64_t check_blocks = std::min<int64_t>(cuda::ceil_div<int64_t>(p.P, kBlock), 4 * sms);
    cuda::count_bad_targets_kernel<index_t><<<static_cast<unsigned>(check_blocks), kBlock, 0, stream>>>(
        target.const_data_ptr<index_t>(), p.P, p.C, p.has_ignore, p.ignore_index, bad.data_ptr<int64_t>(), p.count + 1);
    FASTEVAL_CUDA_LAUNCH_CHECK();
    FASTEVAL_DISPATCH_LOGITS_TYPES(logits.scalar_type(), "eval_update_cuda", [&] {
      using T = scalar_t;
      if (p.S == 1 && p.C > cuda::kThreadPerRowMaxC) {
        const int64_t blocks = std::min<int64_t>(cuda::ceil_div<int64_t>(p.N, kWarpsPerBlock), 8 * sms);
        eval_rows_kernel<T, index_t><<<static_cast<unsigned>(blocks), kBlock, smem, stream>>>(
            logits.const_data_ptr<T>(), target.const_data_ptr<index_t>(), p);
      } else {
        const int64_t blocks = std::min<int64_t>(cuda::ceil_div<int64_t>(p.P, kBlock), 8 * sms);
        eval_positions_kernel<T, index_t><<<static_cast<unsigned>(blocks), kBlock, smem, stream>>>(
            logits.const_data_ptr<T>(), target.const_data_ptr<index_t>(), p);
      }
      FASTEVAL_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace evaluator

TORCH_LIBRARY_IMPL(fasteval, CUDA, m) { evaluator::register_ops<evaluator::Kernels<at::kCUDA>>(m); }

}  // namespace fasteval
