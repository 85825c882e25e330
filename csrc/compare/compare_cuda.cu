// CUDA kernel of fasteval::compare_update, the fused logit comparison (the math is in registration.cpp,
// the per-class terms in compare/compare_common.h, shared with the CPU kernel).
//
// One warp per position, grid-stride over positions. A position's two rows (contiguous for (N, C),
// C values at stride S for (N, C, S)) are visited three times by the warp's lanes, at lane-strided
// indices (coalesced for (N, C)); the second and third visits mostly hit L2:
//   1. max a, max b and the first argmax of each (NaN above all, ties by index), max |a - b| where they
//      differ;
//   2. sum exp(a - max a), sum exp(b - max b) with the maxima broadcast;
//   3. the KL / reverse-KL / JS terms (add_class_terms) and the counts giving the rank of a's argmax in b.
// Warp reductions merge the lanes; lane 0 then accumulates the position into the block's shared
// accumulators (float64 sums, NaN-propagating maxima through compare-and-swap, int counters) and its two
// histogram bins straight into global memory with int64 atomics. At the end of the block, one thread
// flushes the shared accumulators with one global atomic each (float64 atomicAdd for the sums, int64
// atomics for the counts). No host synchronisation: bad targets cannot raise, so a first kernel counts
// them into counts[6] and a scratch flag, and the main kernel then leaves the state untouched and writes
// every position's row outputs (when given) as ignored: NaN statistics, argmaxes -1, as the reference.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/order.h"
#include "compare/compare_common.h"

namespace fasteval {
namespace {

using namespace compare;

constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / 32;

struct Params {
  int64_t C, S, P;
  int64_t stride_a, stride_b;  // elements between rows n (for (N, C, S): between the (C, S) blocks)
  bool has_target, has_ignore;
  int64_t ignore_index;
  int K;
  int64_t top_k[kMaxTopK];
  double* stats;       // (7, 3)
  int64_t* counts;     // (8 + K,)
  int64_t* kl_hist;
  int64_t* dp_hist;
  float* row_stats;    // (P, 4) or null
  int64_t* row_argmax; // (P, 2) or null
  const int64_t* bad;  // out-of-range targets of this batch (written by the check kernel)
};

__device__ __forceinline__ bool is_nan_f64(double x) {
  const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(x));
  return (b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull && (b & 0x000fffffffffffffull) != 0;
}

// *addr = max(*addr, v), NaN-propagating (a NaN, once stored, stays), via compare-and-swap.
__device__ __forceinline__ void atomic_nan_max(double* addr, double v) {
  unsigned long long* a = reinterpret_cast<unsigned long long*>(addr);
  unsigned long long old = *a, assumed;
  do {
    assumed = old;
    const double cur = __longlong_as_double(static_cast<long long>(assumed));
    if (is_nan_f64(cur) || !(is_nan_f64(v) || v > cur)) return;
    old = atomicCAS(a, assumed, static_cast<unsigned long long>(__double_as_longlong(v)));
  } while (old != assumed);
}

// The row outputs of a position that does not count: NaN statistics, argmaxes -1.
__device__ __forceinline__ void write_ignored_row(const Params& p, int64_t i) {
  if (p.row_stats) {
    for (int k = 0; k < 4; ++k) p.row_stats[4 * i + k] = cuda::quiet_nan();
  }
  if (p.row_argmax) p.row_argmax[2 * i] = p.row_argmax[2 * i + 1] = -1;
}

// The argmax and the rank counts merge across lanes in the order of common/order.h.
struct RankPartsOp {
  using Parts = order::RankParts<int64_t>;
  __device__ __forceinline__ Parts operator()(const Parts& a, const Parts& b) const { return Parts::merge(a, b); }
};

struct OrOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a | b; }
};

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t c, int64_t S) {
  return cuda::to_float(p[c * S]);
}

// Shared accumulators of a block.
struct BlockAcc {
  double sum[kStatRows], sq[kStatRows], mx[kStatRows];
  unsigned long long cnt[kCountNames];
  unsigned long long hits[kMaxTopK];
};

template <typename TA, typename TB, typename I>
__global__ void __launch_bounds__(kBlock) compare_kernel(const TA* __restrict__ xa, const TB* __restrict__ xb,
                                                         const I* __restrict__ target, Params p) {
  if (*p.bad != 0) {  // the batch is rejected (uniform over the grid): every position reads as ignored
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.P;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      write_ignored_row(p, i);
    }
    return;
  }
  __shared__ BlockAcc acc;
  for (int i = threadIdx.x; i < kStatRows; i += blockDim.x) {
    acc.sum[i] = 0.0;
    acc.sq[i] = 0.0;
    acc.mx[i] = -INFINITY;
  }
  for (int i = threadIdx.x; i < kCountNames; i += blockDim.x) acc.cnt[i] = 0;
  for (int i = threadIdx.x; i < p.K; i += blockDim.x) acc.hits[i] = 0;
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5);
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t C = p.C, S = p.S;
  for (int64_t i = warp; i < p.P; i += num_warps) {
    int64_t t = -1;
    if (p.has_target) {
      t = static_cast<int64_t>(target[i]);
      if (p.has_ignore && t == p.ignore_index) {  // uniform over the warp
        if (lane == 0) write_ignored_row(p, i);
        continue;
      }
    }
    const int64_t n = i / S, s = i % S;
    const TA* ra = xa + n * p.stride_a + s;
    const TB* rb = xb + n * p.stride_b + s;

    // 1. maxima and argmaxes, max |a - b|
    order::ArgMax ma = order::ArgMax::empty(), mb = order::ArgMax::empty();
    float md = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      const float a = load(ra, c, S), b = load(rb, c, S);
      ma.visit(a, c);
      mb.visit(b, c);
      md = cuda::nan_max(md, a == b ? 0.f : fabsf(a - b));
    }
    ma = cuda::warp_reduce(ma, order::ArgMaxOp{});
    mb = cuda::warp_reduce(mb, order::ArgMaxOp{});
    md = cuda::warp_reduce_max(md);
    const int64_t ia = ma.index(), ib = mb.index();
    const float amax = ma.v, bmax = mb.v;
    const bool finite = cuda::is_finite_bits(amax) && cuda::is_finite_bits(bmax);

    // 3 (rank part) and 2, 3 (divergences) for finite rows.
    const float bt = load(rb, ia, S);
    order::RankParts<int64_t> rp = order::RankParts<int64_t>::empty();  // the rank of b[ia] in b
    ClassTerms terms;
    float lra = 0.f, lrb = 0.f;  // log sum exp(x - max x) (pivoted: exact for logits of any magnitude)
    if (finite) {
      float sa = 0.f, sb = 0.f;
      for (int64_t c = lane; c < C; c += 32) {
        sa += cuda::fast_exp(load(ra, c, S) - amax);
        sb += cuda::fast_exp(load(rb, c, S) - bmax);
      }
      sa = cuda::warp_reduce_sum(sa);
      sb = cuda::warp_reduce_sum(sb);
      lra = log1pf(sa - 1.f);
      lrb = log1pf(sb - 1.f);
    }
    const LogShift D = finite ? log_shift(amax, bmax, lra, lrb) : LogShift{0.f, 0.f, 0.f};
    for (int64_t c = lane; c < C; c += 32) {
      const float a = load(ra, c, S), b = load(rb, c, S);
      rp.visit(b, c, bt, ia);
      if (finite) add_class_terms(a, b, amax, bmax, lra, lrb, D, terms);
    }
    rp = cuda::warp_reduce(rp, RankPartsOp{});
    float kl = cuda::warp_reduce_sum(terms.kl);
    float rkl = cuda::warp_reduce_sum(terms.rkl);
    const float js = cuda::warp_reduce_sum(terms.js);
    const int kl_inf = cuda::warp_reduce(static_cast<int>(terms.kl_inf), OrOp{});
    const int rkl_inf = cuda::warp_reduce(static_cast<int>(terms.rkl_inf), OrOp{});
    if (kl_inf) kl = INFINITY;
    if (rkl_inf) rkl = INFINITY;
    const int64_t rank = rp.rank(bt);

    if (lane == 0) {
      const int64_t y = t >= 0 ? t : ia;
      double vkl, vrkl, vjs, dp, nll_a, nll_b;
      if (finite) {
        // log p_y = (a_y - max a) - log sum exp(a - max a), in float64 as the CPU kernel
        const double lpy = (static_cast<double>(load(ra, y, S)) - amax) - static_cast<double>(lra);
        const double lqy = (static_cast<double>(load(rb, y, S)) - bmax) - static_cast<double>(lrb);
        vkl = kl;
        vrkl = rkl;
        vjs = js;
        dp = exp(lqy) - exp(lpy);
        nll_a = -lpy;
        nll_b = -lqy;
      } else {
        vkl = vrkl = vjs = dp = nll_a = nll_b = __longlong_as_double(0x7ff8000000000000ll);
      }
      const double vals[kStatRows] = {vkl, vrkl, vjs, dp, nll_a, nll_b, static_cast<double>(md)};
      for (int r = 0; r < kStatRows; ++r) {
        if (!p.has_target && (r == kNllA || r == kNllB)) continue;
        atomicAdd(&acc.sum[r], vals[r]);
        atomicAdd(&acc.sq[r], vals[r] * vals[r]);
        atomic_nan_max(&acc.mx[r], vals[r]);
      }
      atomicAdd(&acc.cnt[kCount], 1ull);
      if (ia == ib) atomicAdd(&acc.cnt[kAgree], 1ull);
      if (p.has_target) {
        const bool ca = ia == t, cb = ib == t;
        if (ca) atomicAdd(&acc.cnt[kRefCorrect], 1ull);
        if (cb) atomicAdd(&acc.cnt[kCandCorrect], 1ull);
        if (ca && !cb) atomicAdd(&acc.cnt[kC2W], 1ull);
        if (!ca && cb) atomicAdd(&acc.cnt[kW2C], 1ull);
        atomicAdd(&acc.cnt[kWithTarget], 1ull);
      }
      for (int k = 0; k < p.K; ++k) {
        if (rank < p.top_k[k]) atomicAdd(&acc.hits[k], 1ull);
      }
      cuda::atomic_add_i64(p.kl_hist + kl_bin(vkl), 1);
      cuda::atomic_add_i64(p.dp_hist + dp_bin(dp), 1);
      if (p.row_stats) {
        float* o = p.row_stats + 4 * i;
        o[0] = static_cast<float>(vkl);
        o[1] = static_cast<float>(vrkl);
        o[2] = static_cast<float>(vjs);
        o[3] = static_cast<float>(dp);
      }
      if (p.row_argmax) {
        p.row_argmax[2 * i] = ia;
        p.row_argmax[2 * i + 1] = ib;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (acc.cnt[kCount] == 0) return;
    for (int r = 0; r < kStatRows; ++r) {
      if (!p.has_target && (r == kNllA || r == kNllB)) continue;
      atomicAdd(p.stats + 3 * r, acc.sum[r]);
      atomicAdd(p.stats + 3 * r + 1, acc.sq[r]);
      atomic_nan_max(p.stats + 3 * r + 2, acc.mx[r]);
    }
    for (int c = 0; c < kCountNames; ++c) {
      if (acc.cnt[c]) cuda::atomic_add_i64(p.counts + c, static_cast<int64_t>(acc.cnt[c]));
    }
    for (int k = 0; k < p.K; ++k) {
      if (acc.hits[k]) cuda::atomic_add_i64(p.counts + kCountNames + k, static_cast<int64_t>(acc.hits[k]));
    }
  }
}

}  // namespace

namespace compare {

template <>
void Kernels<at::kCUDA>::update(const UpdateArgs& args) {
  const Shapes& sh = args.sh;
  const c10::cuda::CUDAGuard guard(args.reference.device());
  if (sh.positions == 0) return;
  const at::Tensor& target = args.target;
  const bool has_target = target.defined();
  const at::Tensor a = kernel_layout(args.reference), b = kernel_layout(args.candidate);

  Params p;
  p.C = sh.C;
  p.S = sh.S;
  p.P = sh.positions;
  p.stride_a = a.stride(0);
  p.stride_b = b.stride(0);
  p.has_target = has_target;
  p.has_ignore = args.ignore_index.has_value();
  p.ignore_index = args.ignore_index.value_or(0);
  p.K = static_cast<int>(args.top_k.size());
  for (int k = 0; k < p.K; ++k) p.top_k[k] = args.top_k[k];
  p.stats = args.stats.data_ptr<double>();
  p.counts = args.counts.data_ptr<int64_t>();
  p.kl_hist = args.kl_hist.data_ptr<int64_t>();
  p.dp_hist = args.dp_hist.data_ptr<int64_t>();
  p.row_stats = args.row_stats;
  p.row_argmax = args.row_argmax;
  at::Tensor bad = at::zeros({1}, args.counts.options());
  p.bad = bad.const_data_ptr<int64_t>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div<int64_t>(p.P, kWarpsPerBlock), 8 * sms);
  auto launch = [&](auto* tp) {
    using I = std::remove_const_t<std::remove_pointer_t<decltype(tp)>>;
    if (has_target) {
      const int64_t check_blocks = std::min<int64_t>(cuda::ceil_div<int64_t>(p.P, kBlock), 4 * sms);
      cuda::count_bad_targets_kernel<I><<<static_cast<unsigned>(check_blocks), kBlock, 0, stream>>>(
          tp, p.P, p.C, p.has_ignore, p.ignore_index, bad.data_ptr<int64_t>(), p.counts + kRejected);
      FASTEVAL_CUDA_LAUNCH_CHECK();
    }
    FASTEVAL_DISPATCH_LOGITS_TYPES(a.scalar_type(), "compare_update_cuda_a", [&] {
      using TA = scalar_t;
      FASTEVAL_DISPATCH_LOGITS_TYPES(b.scalar_type(), "compare_update_cuda_b", [&] {
        using TB = scalar_t;
        compare_kernel<TA, TB, I><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
            a.const_data_ptr<TA>(), b.const_data_ptr<TB>(), tp, p);
        FASTEVAL_CUDA_LAUNCH_CHECK();
      });
    });
  };
  if (has_target) {
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "compare_update_cuda_t",
                            [&] { launch(target.const_data_ptr<index_t>()); });
  } else {
    launch(static_cast<const int64_t*>(nullptr));
  }
}

}  // namespace compare

TORCH_LIBRARY_IMPL(fasteval, CUDA, m) { compare::register_ops<compare::Kernels<at::kCUDA>>(m); }

}  // namespace fasteval
